"""SmolMixtral <-> modeling_smolhub.SmolHubForCausalLM, shipped inside the export
(see smolhub_hub/state_dict_adapter.py for the interface).

transformers has no Mixtral with LayerNorm, multi-head attention and a noisy router, so the export
carries its own modelling code, which uses our parameter names except the feed-forward's.
"""
from __future__ import annotations

from smolhub_hub.state_dict_adapter import (bundled_config, bundled_from_hf, bundled_model_class, check_no_capacity,
                                            renamed)

REMOTE_CODE = True

# (ours, theirs) substrings of the parameter names
RENAMES = [(".moe.router.", ".ffn.router."), (".moe.experts.", ".ffn.")]


def model_class():
    return bundled_model_class()


def hf_config(cfg, ids: dict):
    check_no_capacity(cfg)
    return bundled_config("SmolMixtral", cfg, ids, norm="layernorm", positions="rope", rope_theta=cfg.rope_theta,
                          ffn="moe", n_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                          expert_hidden=cfg.expert_hidden, noisy_routing=cfg.noisy_routing)


def to_hf(sd: dict, cfg) -> dict:
    return renamed(sd, RENAMES)


def from_hf(sd: dict, cfg) -> dict:
    return bundled_from_hf(sd, cfg, RENAMES)
