"""SmolTransformer <-> modeling_smolhub.SmolHubForCausalLM, shipped inside the export
(see smolhub_hub/state_dict_adapter.py for the interface).

transformers has no GPT with RMSNorm and no biases, so the export carries its own modelling code,
which uses our parameter names except the feed-forward's.
"""
from __future__ import annotations

from smolhub_hub.state_dict_adapter import bundled_config, bundled_from_hf, bundled_model_class, renamed

REMOTE_CODE = True

# (ours, theirs) substrings of the parameter names
RENAMES = [(".mlp_norm.", ".ffn_norm."), (".mlp.", ".ffn.")]


def model_class():
    return bundled_model_class()


def hf_config(cfg, ids: dict):
    return bundled_config("SmolTransformer", cfg, ids, norm="rmsnorm", positions=cfg.positions, ffn="gelu",
                          ffn_hidden=cfg.ffn_hidden)


def to_hf(sd: dict, cfg) -> dict:
    return renamed(sd, RENAMES)


def from_hf(sd: dict, cfg) -> dict:
    return bundled_from_hf(sd, cfg, RENAMES)
