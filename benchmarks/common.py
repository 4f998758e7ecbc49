"""Model pairs for the GPU benchmarks: each SmolHub model at its default size and the transformers
model of the same shape that a user would pick instead."""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import torch

from smolhub.modeling import model_class


def ours(name: str, vocab_size: int, **overrides) -> Callable[[], torch.nn.Module]:
    def build():
        cls = model_class(name)
        return cls(cls.config_class(vocab_size=vocab_size, **overrides))
    return build


def hf_llama_like(cfg) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True, attn_implementation="sdpa"))


def nanogpt_like(nanogpt_dir: str, block_size: int, vocab_size: int) -> torch.nn.Module:
    """karpathy/nanoGPT's GPT as it ships (bias=True), loaded from a checkout's model.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", f"{nanogpt_dir}/model.py")
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    return nano.GPT(nano.GPTConfig(block_size=block_size, vocab_size=vocab_size))


def hf_gpt2_like(cfg) -> torch.nn.Module:
    """GPT2Config's dropouts default to 0.1: set to ours (0 by default), as every other twin has."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.ffn_hidden, layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=True, attn_implementation="sdpa"))


def gpt2_as_smoltransformer(twin: torch.nn.Module, eps: float) -> torch.nn.Module:
    """GPT2LMHeadModel computing SmolTransformer's function: its LayerNorms become RMSNorms (torch's, gains
    kept under the same names) and its biases stay zero (frozen, so no optimizer moves them). Given our
    weights (load_ours_into_twin), the pair then differs in kernels and numerics only, not in architecture."""
    width = twin.config.n_embd
    for block in twin.transformer.h:
        block.ln_1, block.ln_2 = torch.nn.RMSNorm(width, eps=eps), torch.nn.RMSNorm(width, eps=eps)
    twin.transformer.ln_f = torch.nn.RMSNorm(width, eps=eps)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
                p.requires_grad_(False)
    return twin


def hf_mixtral_like(cfg) -> torch.nn.Module:
    """transformers' balancing loss counts top_k assignments per token, top_k times the Switch loss
    we use, so its coefficient is ours divided by top_k."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.expert_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=getattr(cfg, "n_kv_heads", cfg.n_head), max_position_embeddings=cfg.block_size,
        rope_theta=cfg.rope_theta, sliding_window=getattr(cfg, "sliding_window", None),
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, rms_norm_eps=cfg.norm_eps,
        router_aux_loss_coef=cfg.aux_loss_weight / cfg.top_k, output_router_logits=True, tie_word_embeddings=True,
        attn_implementation="sdpa"))


def hf_deepseek_like(cfg) -> torch.nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        moe_intermediate_size=cfg.expert_hidden, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head, n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.top_k, first_k_dense_replace=cfg.first_k_dense, kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank or None, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=cfg.routed_scaling_factor, max_position_embeddings=cfg.block_size,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True, attn_implementation="sdpa"))


def load_ours_into_twin(name: str, ours: torch.nn.Module, twin: torch.nn.Module) -> Callable[[dict], dict]:
    """Give the transformers twin our model's weights: through the export adapter, or for GPT2LMHeadModel
    (SmolTransformer's twin, which has LayerNorms and biases where ours has RMSNorms and none) our
    matrices transposed into its Conv1Ds, unit LayerNorm gains and zero biases. Returns the map of
    the twin's tensors (its gradients, say) back to our parameter names."""
    sd, cfg = ours.state_dict(), ours.config
    if name != "SmolTransformer":
        from smolhub_hub.export import adapter_for

        adapter = adapter_for(name)
        twin.load_state_dict(adapter.to_hf(sd, cfg))

        def to_ours(tensors: dict) -> dict:  # a tied head appears once, as the embedding
            return adapter.from_hf({"lm_head.weight": tensors["model.embed_tokens.weight"], **tensors}, cfg)
        return to_ours
    names = {"transformer.wte.weight": ("tok_emb.weight", False), "transformer.ln_f.weight": ("norm.weight", False)}
    if "pos_emb.weight" in sd:
        names["transformer.wpe.weight"] = ("pos_emb.weight", False)
    for i in range(cfg.n_layer):
        ours_block, theirs = f"blocks.{i}", f"transformer.h.{i}"
        names.update({f"{theirs}.ln_1.weight": (f"{ours_block}.attn_norm.weight", False),
                      f"{theirs}.attn.c_attn.weight": (f"{ours_block}.attn.qkv.weight", True),
                      f"{theirs}.attn.c_proj.weight": (f"{ours_block}.attn.out.weight", True),
                      f"{theirs}.ln_2.weight": (f"{ours_block}.mlp_norm.weight", False),
                      f"{theirs}.mlp.c_fc.weight": (f"{ours_block}.mlp.up.weight", True),
                      f"{theirs}.mlp.c_proj.weight": (f"{ours_block}.mlp.down.weight", True)})
    with torch.no_grad():
        for theirs, p in twin.named_parameters():
            if theirs in names:
                mine, transposed = names[theirs]
                p.copy_(sd[mine].t() if transposed else sd[mine])
            elif theirs.endswith(".bias"):
                p.zero_()

    def gpt2_to_ours(tensors: dict) -> dict:
        return {names[k][0]: (t.t() if names[k][1] else t) for k, t in tensors.items() if k in names}
    return gpt2_to_ours


@dataclass
class Pair:
    name: str
    seq_len: int
    build_ours: Callable[[], torch.nn.Module]
    build_baseline: Callable[[torch.nn.Module], torch.nn.Module] | None
    baseline_name: str


def pairs() -> dict[str, Pair]:
    models = {
        "SmolTransformer": Pair("SmolTransformer", 1024, ours("SmolTransformer", 50304), hf_gpt2_like,
                                "HF GPT2LMHeadModel"),
        "SmolTransformer-124M": Pair("SmolTransformer-124M", 1024, ours("SmolTransformer", 50304, n_layer=12),
                                     hf_gpt2_like, "HF GPT2LMHeadModel"),
        "StoryLlama": Pair("StoryLlama", 512, ours("StoryLlama", 50304), hf_llama_like, "HF LlamaForCausalLM"),
        "SmolMixtral": Pair("SmolMixtral", 1024, ours("SmolMixtral", 32000), hf_mixtral_like, "HF MixtralForCausalLM"),
        "StoryMixtral": Pair("StoryMixtral", 1024, ours("StoryMixtral", 32000), hf_mixtral_like,
                             "HF MixtralForCausalLM"),
        "StoryKimi": Pair("StoryKimi", 512, ours("StoryKimi", 32000), hf_deepseek_like, "HF DeepseekV3ForCausalLM"),
    }
    # the MoE models with their experts in smolhub.kernels.moe's Triton kernels (--experts_kernel triton)
    for name in ("SmolMixtral", "StoryMixtral", "StoryKimi"):
        moe = models[name]
        models[f"{name}-triton"] = Pair(f"{name}-triton", moe.seq_len, ours(name, 32000, experts_kernel="triton"),
                                        moe.build_baseline, moe.baseline_name)
    return models


def free() -> None:
    """Release what a finished model held, so the next measurement starts from an empty cache."""
    gc.collect()
    torch.cuda.empty_cache()
