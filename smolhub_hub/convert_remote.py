"""SmolTransformer and SmolMixtral <-> modeling_smolhub.SmolHubForCausalLM, shipped inside the export.

transformers has no exact class for either (an RMSNorm GPT without biases; a LayerNorm, multi-head
Mixtral with a noisy router), so the export carries configuration_smolhub.py and modeling_smolhub.py
(copied by save_pretrained, named in config.json's auto_map) and loads with trust_remote_code=True.
The modelling code uses our parameter names; only the feed-forward's are unified across the two.
"""
from __future__ import annotations

from smolhub_hub.convert_mixtral import check_no_capacity

REMOTE_CODE = True

# (ours, theirs) substrings of the parameter names
RENAMES = {
    "SmolTransformer": [(".mlp_norm.", ".ffn_norm."), (".mlp.", ".ffn.")],
    "SmolMixtral": [(".moe.router.", ".ffn.router."), (".moe.experts.", ".ffn.")],
}


def model_class():
    from smolhub_hub.configuration_smolhub import SmolHubConfig
    from smolhub_hub.modeling_smolhub import SmolHubForCausalLM

    # save_pretrained then copies both files into the folder and writes config.json's auto_map
    SmolHubConfig.register_for_auto_class()
    SmolHubForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return SmolHubForCausalLM


def hf_config(architecture: str, cfg, ids: dict):
    from smolhub_hub.configuration_smolhub import SmolHubConfig

    common = dict(architecture=architecture, vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                  n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, **ids)
    if architecture == "SmolTransformer":
        return SmolHubConfig(norm="rmsnorm", positions="learned", ffn="gelu", ffn_hidden=cfg.ffn_hidden, **common)
    check_no_capacity(cfg)
    return SmolHubConfig(norm="layernorm", positions="rope", rope_theta=cfg.rope_theta, ffn="moe",
                         n_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, expert_hidden=cfg.expert_hidden,
                         noisy_routing=cfg.noisy_routing, **common)


def _architecture(cfg) -> str:
    return type(cfg).__name__.removesuffix("Config")


def _rename(sd: dict, pairs: list[tuple[str, str]]) -> dict:
    out = {}
    for key, value in sd.items():
        for old, new in pairs:
            key = key.replace(old, new)
        out[key] = value
    return out


def to_hf(sd: dict, cfg) -> dict:
    return _rename(sd, RENAMES[_architecture(cfg)])


def from_hf(sd: dict, cfg) -> dict:
    out = _rename(sd, [(new, old) for old, new in RENAMES[_architecture(cfg)]])
    if cfg.tie_embeddings:  # save_pretrained stores a tied head once, as the embedding
        out.setdefault("lm_head.weight", out["tok_emb.weight"])
    return out
