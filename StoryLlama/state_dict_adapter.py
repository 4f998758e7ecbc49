"""StoryLlama <-> transformers' LlamaForCausalLM (see smolhub_hub/state_dict_adapter.py for the interface).

Our attention projects q, k, v with one fused Linear and SwiGLU computes gate and up in one Linear;
Llama keeps them as separate Linears. Our RoPE already uses Llama's rotate-half pairing, so q and k
need no permutation.
"""
from __future__ import annotations

from smolhub_hub.state_dict_adapter import (attention_from_hf, attention_to_hf, layers_from_hf, layers_to_hf,
                                            swiglu_from_hf, swiglu_to_hf)

REMOTE_CODE = False


def model_class():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def hf_config(cfg, ids: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=cfg.init_std, **ids)


def to_hf(sd: dict, cfg) -> dict:
    return layers_to_hf(sd, cfg, lambda sd, ours, theirs, i: {
        **attention_to_hf(sd, f"{ours}.attn", f"{theirs}.self_attn", cfg),
        **swiglu_to_hf(sd, f"{ours}.ffn", f"{theirs}.mlp")})


def from_hf(sd: dict, cfg) -> dict:
    return layers_from_hf(sd, cfg, lambda sd, theirs, ours, i: {
        **attention_from_hf(sd, f"{theirs}.self_attn", f"{ours}.attn"),
        **swiglu_from_hf(sd, f"{theirs}.mlp", f"{ours}.ffn")})
