"""StoryKimi <-> transformers' DeepseekV3ForCausalLM (see smolhub_hub/state_dict_adapter.py for the interface).

MLA maps one to one (wq | wq_a, q_norm, wq_b -> q_proj | q_a_proj, q_a_layernorm, q_b_proj;
wkv_a, kv_norm, wkv_b, wo -> kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), with the same
per-head [nope | rope] and [nope | v] layouts. Our RoPE is rotate-half, so the export sets
`rope_interleave=False` instead of permuting the rotary dims. The sigmoid router's balancing bias is
transformers' `e_score_correction_bias`; one expert group (n_group = topk_group = 1) makes its
group-limited routing plain top-k. Routed experts are fused 3-D parameters in both, transposed:
ours gate_up (E, dim, 2*hidden) and down (E, hidden, dim), theirs gate_up_proj (E, 2*hidden, dim)
and down_proj (E, dim, hidden), gate before up in both.

transformers hard-codes eps 1e-6 in the q/kv latent norms where ours use `norm_eps`: logits differ
by ~1e-6 relative at the default 1e-5 (the export check and tests bound it).
"""
from __future__ import annotations

from smolhub_hub.state_dict_adapter import layers_from_hf, layers_to_hf, swiglu_from_hf, swiglu_to_hf

REMOTE_CODE = False

ATTENTION = [("wq", "q_proj"), ("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj"),
             ("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"), ("wo", "o_proj")]


def model_class():
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM


def hf_config(cfg, ids: dict):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_interleave=False,
        intermediate_size=cfg.ffn_hidden, first_k_dense_replace=cfg.first_k_dense,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        moe_intermediate_size=cfg.expert_hidden, num_experts_per_tok=cfg.top_k, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=cfg.routed_scaling_factor,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu", attention_bias=False, initializer_range=cfg.init_std, num_mtp_layers=0, **ids)


def _moe_to_hf(sd: dict, ours: str, theirs: str, cfg) -> dict:
    out = {f"{theirs}.gate.weight": sd[f"{ours}.router.gate.weight"],
           f"{theirs}.gate.e_score_correction_bias": sd[f"{ours}.router.balance_bias"],
           f"{theirs}.experts.gate_up_proj": sd[f"{ours}.experts.gate_up"].transpose(1, 2).contiguous(),
           f"{theirs}.experts.down_proj": sd[f"{ours}.experts.down"].transpose(1, 2).contiguous()}
    if cfg.n_shared_experts:
        out.update(swiglu_to_hf(sd, f"{ours}.shared", f"{theirs}.shared_experts"))
    else:  # transformers always builds the shared expert: zero-width, it adds exactly nothing
        empty = sd[f"{ours}.router.gate.weight"].new_zeros(0, cfg.n_embd)
        shared = f"{theirs}.shared_experts"
        out.update({f"{shared}.gate_proj.weight": empty, f"{shared}.up_proj.weight": empty,
                    f"{shared}.down_proj.weight": empty.T})
    return out


def _moe_from_hf(sd: dict, theirs: str, ours: str, cfg) -> dict:
    out = {f"{ours}.router.gate.weight": sd[f"{theirs}.gate.weight"],
           f"{ours}.router.balance_bias": sd[f"{theirs}.gate.e_score_correction_bias"],
           f"{ours}.experts.gate_up": sd[f"{theirs}.experts.gate_up_proj"].transpose(1, 2),
           f"{ours}.experts.down": sd[f"{theirs}.experts.down_proj"].transpose(1, 2)}
    if cfg.n_shared_experts:
        out.update(swiglu_from_hf(sd, f"{theirs}.shared_experts", f"{ours}.shared"))
    return out


def _block_to_hf(sd: dict, ours: str, theirs: str, i: int, cfg) -> dict:
    out = {f"{theirs}.self_attn.{b}.weight": sd[f"{ours}.attn.{a}.weight"] for a, b in ATTENTION
           if f"{ours}.attn.{a}.weight" in sd}
    if i < cfg.first_k_dense:
        return {**out, **swiglu_to_hf(sd, f"{ours}.ffn", f"{theirs}.mlp")}
    return {**out, **_moe_to_hf(sd, f"{ours}.ffn", f"{theirs}.mlp", cfg)}


def _block_from_hf(sd: dict, theirs: str, ours: str, i: int, cfg) -> dict:
    out = {f"{ours}.attn.{a}.weight": sd[f"{theirs}.self_attn.{b}.weight"] for a, b in ATTENTION
           if f"{theirs}.self_attn.{b}.weight" in sd}
    if i < cfg.first_k_dense:
        return {**out, **swiglu_from_hf(sd, f"{theirs}.mlp", f"{ours}.ffn")}
    return {**out, **_moe_from_hf(sd, f"{theirs}.mlp", f"{ours}.ffn", cfg)}


def to_hf(sd: dict, cfg) -> dict:
    return layers_to_hf(sd, cfg, lambda sd, ours, theirs, i: _block_to_hf(sd, ours, theirs, i, cfg))


def from_hf(sd: dict, cfg) -> dict:
    return layers_from_hf(sd, cfg, lambda sd, theirs, ours, i: _block_from_hf(sd, theirs, ours, i, cfg))
