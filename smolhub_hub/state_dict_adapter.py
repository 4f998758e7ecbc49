"""What a model's `<Model>/state_dict_adapter.py` defines, and the pieces several of them share.

Each model folder maps its own weights to transformers' (as torchtitan keeps a state_dict_adapter.py
in each model folder); export.py finds the module from the model. An adapter defines
    REMOTE_CODE               True when the export carries its own modelling code
    model_class()             the transformers class that loads the export
    hf_config(cfg, ids)       the transformers config for a SmolHub config (ids: special tokens)
    to_hf(state_dict, cfg)    our weights -> the in-memory layout of model_class()
    from_hf(state_dict, cfg)  the inverse
and transformers' own save_pretrained decides the file layout (Mixtral's per-expert keys, say).

Below: the Llama layout that StoryLlama, StoryMixtral and StoryKimi share, the capacity check of the
MoE models, and the bundled modelling code that SmolTransformer and SmolMixtral export with.
"""
from __future__ import annotations

import torch

from smolhub.errors import UserError


# --- Llama layout: our fused Linears <-> transformers' separate ones -----------------------------
def attention_to_hf(sd: dict, ours: str, theirs: str, cfg) -> dict:
    """Our qkv Linear holds query heads, then key heads, then value heads."""
    q, k, v = sd[f"{ours}.qkv.weight"].split(
        [cfg.n_head * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim])
    return {f"{theirs}.q_proj.weight": q, f"{theirs}.k_proj.weight": k, f"{theirs}.v_proj.weight": v,
            f"{theirs}.o_proj.weight": sd[f"{ours}.out.weight"]}


def attention_from_hf(sd: dict, theirs: str, ours: str) -> dict:
    qkv = torch.cat([sd[f"{theirs}.{p}_proj.weight"] for p in "qkv"])
    return {f"{ours}.qkv.weight": qkv, f"{ours}.out.weight": sd[f"{theirs}.o_proj.weight"]}


def swiglu_to_hf(sd: dict, ours: str, theirs: str) -> dict:
    """Our SwiGLU computes gate and up in one Linear, gate first."""
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


# --- MoE ---------------------------------------------------------------------------------------
def layers_to_hf(sd: dict, cfg, block_to_hf) -> dict:
    """The layout every Llama-family export shares: the embeddings, then for each layer its two
    norms and what `block_to_hf(sd, ours, theirs, layer)` maps (its attention and feed-forward)."""
    out = embeddings_to_hf(sd)
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"model.layers.{i}"
        out.update(norms_to_hf(sd, ours, theirs))
        out.update(block_to_hf(sd, ours, theirs, i))
    return out


def layers_from_hf(sd: dict, cfg, block_from_hf) -> dict:
    """layers_to_hf's inverse, with `block_from_hf(sd, theirs, ours, layer)`."""
    out = embeddings_from_hf(sd)
    for i in range(cfg.n_layer):
        theirs, ours = f"model.layers.{i}", f"blocks.{i}"
        out.update(norms_from_hf(sd, theirs, ours))
        out.update(block_from_hf(sd, theirs, ours, i))
    return out


def check_no_capacity(cfg) -> None:
    """transformers' MoE layers never drop tokens; ours do when capacity_factor > 0, in inference too."""
    if cfg.capacity_factor > 0:
        raise UserError(f"this checkpoint drops tokens over expert capacity (capacity_factor "
                        f"{cfg.capacity_factor}), which transformers cannot reproduce; set \"capacity_factor\": 0 "
                        "in its config.json to export it (inference then routes every token)")


# --- bundled modelling code: configuration_smolhub.py + modeling_smolhub.py ---------------------
def bundled_model_class():
    """modeling_smolhub.SmolHubForCausalLM, for the architectures transformers has no exact class for.
    The export loads with trust_remote_code=True and uses our parameter names, up to a few renames."""
    from smolhub_hub.configuration_smolhub import SmolHubConfig
    from smolhub_hub.modeling_smolhub import SmolHubForCausalLM

    # save_pretrained then copies both files into the folder and writes config.json's auto_map
    SmolHubConfig.register_for_auto_class()
    SmolHubForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return SmolHubForCausalLM


def bundled_config(architecture: str, cfg, ids: dict, **fields):
    """The SmolHubConfig of `architecture`: the fields every bundled model has, plus its own."""
    from smolhub_hub.configuration_smolhub import SmolHubConfig

    return SmolHubConfig(architecture=architecture, vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                         n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, norm_eps=cfg.norm_eps,
                         tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, **fields, **ids)


def renamed(sd: dict, pairs: list[tuple[str, str]]) -> dict:
    """sd with each (old, new) substring of its keys replaced, in order."""
    out = {}
    for key, value in sd.items():
        for old, new in pairs:
            key = key.replace(old, new)
        out[key] = value
    return out


def bundled_from_hf(sd: dict, cfg, renames: list[tuple[str, str]]) -> dict:
    """The inverse of renamed(sd, renames) for a bundled export."""
    out = renamed(sd, [(new, old) for old, new in renames])
    if cfg.tie_embeddings:  # save_pretrained stores a tied head once, as the embedding
        out.setdefault("lm_head.weight", out["tok_emb.weight"])
    return out
