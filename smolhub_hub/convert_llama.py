"""StoryLlama <-> transformers' LlamaForCausalLM.

Our attention projects q, k, v with one fused Linear (query heads, then key heads, then value heads)
and SwiGLU computes gate and up in one Linear (gate first); Llama keeps them as separate Linears.
Our RoPE already uses Llama's rotate-half pairing, so q and k need no permutation.
"""
from __future__ import annotations

import torch

REMOTE_CODE = False


def model_class():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def hf_config(architecture: str, cfg, ids: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=cfg.init_std, **ids)


def attention_to_hf(sd: dict, ours: str, theirs: str, cfg) -> dict:
    q, k, v = sd[f"{ours}.qkv.weight"].split(
        [cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim])
    return {f"{theirs}.q_proj.weight": q, f"{theirs}.k_proj.weight": k, f"{theirs}.v_proj.weight": v,
            f"{theirs}.o_proj.weight": sd[f"{ours}.out.weight"]}


def attention_from_hf(sd: dict, theirs: str, ours: str) -> dict:
    qkv = torch.cat([sd[f"{theirs}.{p}_proj.weight"] for p in "qkv"])
    return {f"{ours}.qkv.weight": qkv, f"{ours}.out.weight": sd[f"{theirs}.o_proj.weight"]}


def swiglu_to_hf(sd: dict, ours: str, theirs: str) -> dict:
    gate, up = sd[f"{ours}.gate_up.weight"].chunk(2)
    return {f"{theirs}.gate_proj.weight": gate, f"{theirs}.up_proj.weight": up,
            f"{theirs}.down_proj.weight": sd[f"{ours}.down.weight"]}


def swiglu_from_hf(sd: dict, theirs: str, ours: str) -> dict:
    gate_up = torch.cat([sd[f"{theirs}.gate_proj.weight"], sd[f"{theirs}.up_proj.weight"]])
    return {f"{ours}.gate_up.weight": gate_up, f"{ours}.down.weight": sd[f"{theirs}.down_proj.weight"]}


def norms_to_hf(sd: dict, ours: str, theirs: str) -> dict:
    """A pre-norm block's two norms, as Llama, Mixtral and DeepseekV3 name them."""
    return {f"{theirs}.input_layernorm.weight": sd[f"{ours}.attn_norm.weight"],
            f"{theirs}.post_attention_layernorm.weight": sd[f"{ours}.ffn_norm.weight"]}


def norms_from_hf(sd: dict, theirs: str, ours: str) -> dict:
    return {f"{ours}.attn_norm.weight": sd[f"{theirs}.input_layernorm.weight"],
            f"{ours}.ffn_norm.weight": sd[f"{theirs}.post_attention_layernorm.weight"]}


def embeddings_to_hf(sd: dict) -> dict:
    return {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}


def embeddings_from_hf(sd: dict) -> dict:
    return {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}


def to_hf(sd: dict, cfg) -> dict:
    out = embeddings_to_hf(sd)
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        out.update(norms_to_hf(sd, ours, theirs))
        out.update(attention_to_hf(sd, f"{ours}.attn", f"{theirs}.self_attn", cfg))
        out.update(swiglu_to_hf(sd, f"{ours}.ffn", f"{theirs}.mlp"))
    return out


def from_hf(sd: dict, cfg) -> dict:
    out = embeddings_from_hf(sd)
    for i in range(cfg.n_layer):
        theirs, ours = f"model.layers.{i}", f"blocks.{i}"
        out.update(norms_from_hf(sd, theirs, ours))
        out.update(attention_from_hf(sd, f"{theirs}.self_attn", f"{ours}.attn"))
        out.update(swiglu_from_hf(sd, f"{theirs}.mlp", f"{ours}.ffn"))
    return out
