"""StoryMixtral <-> transformers' MixtralForCausalLM (see smolhub_hub/state_dict_adapter.py for the interface).

Attention as StoryLlama's (fused qkv split into q/k/v_proj; rotate-half RoPE as Mixtral's). Both
windows count the query itself (a key is visible when q - k < sliding_window). Experts are fused 3-D
parameters in both, transposed: ours gate_up (E, dim, 2*hidden) and down (E, hidden, dim), theirs
gate_up_proj (E, 2*hidden, dim) and down_proj (E, dim, hidden), gate before up in both; transformers'
save_pretrained then writes the Hub's per-expert w1/w2/w3 files.
"""
from __future__ import annotations

from smolhub_hub.state_dict_adapter import (attention_from_hf, attention_to_hf, check_no_capacity, layers_from_hf,
                                            layers_to_hf)

REMOTE_CODE = False


def model_class():
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM


def hf_config(cfg, ids: dict):
    from transformers import MixtralConfig

    check_no_capacity(cfg)
    return MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.expert_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        sliding_window=cfg.sliding_window or None, num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0, router_aux_loss_coef=cfg.aux_loss_weight / cfg.top_k,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", initializer_range=cfg.init_std, **ids)


def to_hf(sd: dict, cfg) -> dict:
    return layers_to_hf(sd, cfg, lambda sd, ours, theirs, i: {
        **attention_to_hf(sd, f"{ours}.attn", f"{theirs}.self_attn", cfg),
        f"{theirs}.mlp.gate.weight": sd[f"{ours}.moe.router.gate.weight"],
        f"{theirs}.mlp.experts.gate_up_proj": sd[f"{ours}.moe.experts.gate_up"].transpose(1, 2).contiguous(),
        f"{theirs}.mlp.experts.down_proj": sd[f"{ours}.moe.experts.down"].transpose(1, 2).contiguous()})


def from_hf(sd: dict, cfg) -> dict:
    return layers_from_hf(sd, cfg, lambda sd, theirs, ours, i: {
        **attention_from_hf(sd, f"{theirs}.self_attn", f"{ours}.attn"),
        f"{ours}.moe.router.gate.weight": sd[f"{theirs}.mlp.gate.weight"],
        f"{ours}.moe.experts.gate_up": sd[f"{theirs}.mlp.experts.gate_up_proj"].transpose(1, 2),
        f"{ours}.moe.experts.down": sd[f"{theirs}.mlp.experts.down_proj"].transpose(1, 2)})
