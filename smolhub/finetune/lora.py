"""LoRA through peft on our own modules: which weights each architecture adapts, adding adapters in
place, saving and loading them in peft's format, switching them off (DPO's reference) and folding
them into the weights.

The adapters are injected into the model object itself (`peft.inject_adapter_in_model`), so the
engine keeps training, sampling and checkpointing one of our `CausalLM`s: only the `lora_A` /
`lora_B` matrices require gradients, so only they reach the optimizer. The 3-D expert stacks of
the MoE models are adapted through peft's `target_parameters` (one rank-r update per expert).

Tokens the run added to the vocabulary (the chat tokens, whose rows fit_embeddings set to the mean
row) would stay identical and untrained in a frozen embedding, so a tied head could never tell
them apart. Their rows get a trainable delta (`NewRows`, a parametrization of the weight, which the
tied head shares), saved next to the adapters and folded in with them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from smolhub.checkpoint import ADAPTER_WEIGHTS
from smolhub.errors import UserError
from smolhub.layers import GroupedExperts

PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every key
NEW_ROWS = "new_token_rows"  # the adapter file's keys <table>.new_token_rows.ids / .delta
TABLES = ("tok_emb", "lm_head")

# The attention and feed-forward projections of each architecture (nn.Linear module names); the
# routers stay as they are, since the choice of experts is the pretrained model's.
LORA_TARGETS = {
    "SmolTransformer": ["qkv", "out", "up", "down"],
    "StoryLlama": ["qkv", "out", "gate_up", "down"],
    "SmolMixtral": ["qkv", "out"],
    "StoryMixtral": ["qkv", "out"],
    "StoryKimi": ["wq", "wkv_a", "wkv_b", "wo", "gate_up", "down"],  # gate_up/down: dense and shared FFNs
}
EXPERT_PARAMETERS = ["experts.gate_up", "experts.down"]  # GroupedExperts' (experts, in, out) stacks


def has_experts(model: nn.Module) -> bool:
    return any(name.endswith(tuple(EXPERT_PARAMETERS)) for name, _ in model.named_parameters())


def lora_config(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], experts: bool):
    """The peft LoraConfig of a run (alpha 0 = 2 x rank)."""
    from peft import LoraConfig

    if experts and dropout:
        raise UserError("--lora_dropout must be 0 with --lora_experts (peft's LoRA on expert weights has no "
                        "dropout); drop one of them")
    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=list(targets),
                      target_parameters=EXPERT_PARAMETERS if experts and has_experts(model) else None)


def _mark_expert_layout(model: nn.Module) -> None:
    """GroupedExperts store each expert as (in, out), the layout peft calls transposed."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.is_transposed = True


def add_adapter(model: nn.Module, config) -> None:
    """Inject fresh LoRA adapters into `model` in place; every other weight is frozen."""
    from peft import inject_adapter_in_model

    _mark_expert_layout(model)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: no module matches the targets
        why = str(e).splitlines()[0].rstrip(".")
        raise UserError(f"--lora_targets {' '.join(sorted(config.target_modules))}: {why}; "
                        f"{model.architecture}'s projections are {' '.join(LORA_TARGETS[model.architecture])}")


class NewRows(nn.Module):
    """A parametrization of a token table: its weight with `delta` added to the rows `rows`. The delta
    starts at zero, so the model starts as the base; peft's trainable tokens would patch the
    modules' forward, which the training loss bypasses (it reads lm_head.weight)."""

    def __init__(self, rows: list[int], weight: torch.Tensor):
        super().__init__()
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.long, device=weight.device), persistent=False)
        self.delta = nn.Parameter(weight.new_zeros(len(rows), weight.size(1)))
        self.enabled = True  # off with the adapters: DPO's reference is the base

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight.index_add(0, self.rows, self.delta.to(weight.dtype))


def train_new_rows(model: nn.Module, ids: list[int]) -> None:
    """Make the rows `ids` of the token embedding and of the head trainable (one delta when the head
    is tied, so it stays tied); every other row stays frozen."""
    tied = model.lm_head.weight is model.tok_emb.weight
    for name in TABLES[:1] if tied else TABLES:
        rows = NewRows(sorted(ids), getattr(model, name).weight)
        for table in TABLES if tied else [name]:
            parametrize.register_parametrization(getattr(model, table), "weight", rows)


def _new_rows(model: nn.Module) -> dict[str, NewRows]:
    """Each table's NewRows, the tied head's left out (it shares the embedding's)."""
    found = {}
    for name in TABLES:
        table = getattr(model, name)
        if parametrize.is_parametrized(table, "weight"):
            rows = table.parametrizations.weight[0]
            if all(rows is not other for other in found.values()):
                found[name] = rows
    return found


def _new_rows_state(model: nn.Module) -> dict:
    state = {}
    for name, rows in _new_rows(model).items():
        state[f"{name}.{NEW_ROWS}.ids"] = rows.rows
        state[f"{name}.{NEW_ROWS}.delta"] = rows.delta
    return state


def saved_new_rows(folder: Path) -> list[int]:
    """The token ids whose rows the adapter in `folder` trained (none for a base that had them)."""
    ids = _saved_state(folder).get(f"tok_emb.{NEW_ROWS}.ids")
    return [] if ids is None else ids.tolist()


def _load_new_rows(model: nn.Module, saved: dict, folder: Path) -> None:
    own = _new_rows_state(model)
    if saved.keys() != own.keys() or any(not torch.equal(saved[k], own[k].cpu()) for k in own if k.endswith(".ids")):
        raise UserError(f"{folder / ADAPTER_WEIGHTS} does not fit its base model (trained token rows "
                        f"{sorted(saved)[:2]}, the model's {sorted(own)[:2]})")
    with torch.no_grad():
        for key, delta in own.items():
            if key.endswith(".delta"):
                delta.copy_(saved[key])


def _fold_new_rows(model: nn.Module) -> None:
    """Write the trained rows into the weights and drop the parametrizations; a tied head stays tied."""
    tables = [getattr(model, name) for name in TABLES if parametrize.is_parametrized(getattr(model, name), "weight")]
    values = [table.weight.detach().clone() for table in tables]
    for table in tables:
        parametrize.remove_parametrizations(table, "weight", leave_parametrized=False)
    with torch.no_grad():
        for table, value in zip(tables, values):
            table.weight.copy_(value)


def has_adapter(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")  # what inject_adapter_in_model sets


def save_adapter(model: nn.Module, folder: Path, base: str) -> None:
    """adapter_model.safetensors + adapter_config.json, as PeftModel.save_pretrained writes them."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {**get_peft_model_state_dict(model, save_embedding_layers=False), **_new_rows_state(model)}
    save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in state.items()}, str(folder / ADAPTER_WEIGHTS))
    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))


def _saved_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    try:
        saved = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises plain exceptions for truncated files
        raise UserError(f"{folder / ADAPTER_WEIGHTS} is unreadable ({str(e).splitlines()[0]})")
    return {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}


def load_adapter_state(model: nn.Module, folder: Path) -> None:
    """Put the adapter weights saved in `folder` into the adapters of `model` (made with its config,
    and its new token rows, if any)."""
    from peft import set_peft_model_state_dict

    state = _saved_state(folder)
    _load_new_rows(model, {k: state.pop(k) for k in list(state) if f".{NEW_ROWS}." in k}, folder)
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UserError(f"{folder / ADAPTER_WEIGHTS} does not fit its base model (missing {missing[:3]}, "
                        f"unexpected {list(result.unexpected_keys)[:3]})")


def saved_config(folder: Path):
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = False
    return config


def load_adapter(model: nn.Module, folder: Path) -> None:
    """Add the adapter saved in `folder` to `model`, unmerged."""
    add_adapter(model, saved_config(folder))
    _add_saved_new_rows(model, folder)
    load_adapter_state(model, folder)


def _add_saved_new_rows(model: nn.Module, folder: Path) -> None:
    ids = saved_new_rows(folder)
    if ids:
        train_new_rows(model, ids)


def merged(model: nn.Module, folder: Path) -> nn.Module:
    """`model` with the adapter saved in `folder` folded into its weights: a plain model again."""
    from peft.tuners.lora import LoraModel

    _mark_expert_layout(model)
    tuner = LoraModel(model, saved_config(folder), "default")
    _add_saved_new_rows(model, folder)
    load_adapter_state(model, folder)
    plain = tuner.merge_and_unload()
    _fold_new_rows(plain)
    for module in plain.modules():
        module.__dict__.pop("is_transposed", None)
    return plain


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model, without a second copy of its weights: DPO's reference under LoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    new_rows = _new_rows(model).values()
    for layer in layers:
        layer.enable_adapters(False)
    for rows in new_rows:
        rows.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for rows in new_rows:
            rows.enabled = True
