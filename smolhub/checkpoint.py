"""Checkpoints: one folder per save, written under a temporary name and renamed when complete.

    out_dir/ckpt-0001000/
        model.safetensors   weights (a tied embedding stored once)
        config.json         {"architecture": "StoryLlama", "model": {...}, "meta": {step, val_loss, ...}}
        tokenizer.json ...  the tokenizer, loadable with AutoTokenizer
        trainer_state.pt    optimizer, scheduler, step, RNG states of every rank, data position

A LoRA fine-tune saves its adapter instead of model.safetensors (smolhub/finetune):

        adapter_model.safetensors, adapter_config.json   peft's format (PeftModel.save_pretrained)
        config.json         as above, plus "finetune": {method, lora_rank, ..., "base": the base checkpoint}

and loading it rebuilds the base, adds the chat format as the run did, and folds the adapter in.

Only names matching ckpt-NNNNNNN that hold config.json and weights count as checkpoints, and rename
is atomic, so a save cut short by a kill leaves at most a `.tmp-*` folder that nothing ever loads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_into
from safetensors.torch import save_model as save_safetensors_from

from smolhub.errors import UserError
from smolhub.hub_download import REPO_ID, download_checkpoint

CKPT_PATTERN = re.compile(r"^ckpt-(\d{7,})$")
WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # a LoRA run's checkpoint (finetune/lora.py writes it)


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def weights_file(folder: Path) -> Path:
    """The weights of a checkpoint folder: the model's, or a LoRA run's adapter."""
    plain = folder / WEIGHTS
    return plain if plain.is_file() or not (folder / ADAPTER_WEIGHTS).is_file() else folder / ADAPTER_WEIGHTS


def is_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and (folder / "config.json").is_file() and weights_file(folder).is_file()


def list_checkpoints(out_dir: str | Path, resumable: bool = True) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first; with resumable, only those holding trainer state."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir()
             if (m := CKPT_PATTERN.match(p.name)) and is_checkpoint(p)
             and (not resumable or (p / "trainer_state.pt").is_file())]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path, resumable: bool = True) -> Path | None:
    ckpts = list_checkpoints(out_dir, resumable)
    return ckpts[-1] if ckpts else None


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, tokenizer, meta: dict,
                    trainer_state: dict | None = None, keep_last: int = 0, record: dict | None = None) -> Path:
    """Write a complete checkpoint folder atomically; then keep the newest keep_last (0 keeps all)
    of this run's checkpoints (those whose meta has the same run_id), never another run's.
    `record`: more entries of config.json (a fine-tune's "finetune", naming its base); a model
    with LoRA adapters saves only them, in peft's format.

    A write that fails (a full disk, say) removes its partial folder and leaves the earlier
    checkpoints as they were."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        from smolhub.finetune.lora import has_adapter, save_adapter

        if has_adapter(model):
            save_adapter(model, tmp, base=record["finetune"]["base"])
        else:
            save_safetensors_from(model, str(tmp / WEIGHTS))
        config = {"architecture": model.architecture, "model": model.config.to_dict(), "meta": meta,
                  **(record or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # saving the same step twice (e.g. a signal right after a periodic save)
        old = out_dir / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep_last > 0:
        for stale in run_checkpoints(out_dir, meta.get("run_id"))[:-keep_last]:
            shutil.rmtree(stale)
    return final


def run_checkpoints(out_dir: str | Path, run_id: str | None) -> list[Path]:
    """The resumable checkpoints of run `run_id` in out_dir, oldest first."""
    return [p for p in list_checkpoints(out_dir) if read_meta(p).get("run_id") == run_id]


def read_meta(folder: Path) -> dict:
    """A checkpoint's meta (step, val_loss, run_id, ...); empty where its config.json is unreadable."""
    try:
        return json.loads((folder / "config.json").read_text()).get("meta", {})
    except (OSError, ValueError):
        return {}


def _fsync_tree(folder: Path) -> None:
    """Flush file contents before the rename publishes them, so a power cut cannot publish empty files."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def resolve_checkpoint(path_or_repo: str) -> Path:
    """A checkpoint folder, an out_dir (its newest checkpoint) or a Hub repo id -> a local checkpoint folder."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if is_checkpoint(p):
            return p
        newest = latest_checkpoint(p, resumable=False)
        if newest is not None:
            return newest
        raise UserError(f"{path_or_repo} is not a SmolHub checkpoint (no config.json + model.safetensors, "
                        "and no ckpt-* folders inside); pass a checkpoint folder or the run's out_dir")
    if REPO_ID.fullmatch(path_or_repo):
        return download_checkpoint(path_or_repo)
    raise UserError(f"checkpoint {path_or_repo!r} not found: pass a checkpoint folder, a run's out_dir "
                    "or a Hub repo id like user/StoryLlama")


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / 'config.json'} is corrupt ({e}); use another checkpoint")
    if "architecture" not in config or "model" not in config:
        if "model_type" in config or "architectures" in config:  # what `python -m smolhub_hub export` writes
            raise UserError(f"{folder} is a transformers model folder, not a SmolHub checkpoint: convert it with "
                            f"`python -m smolhub_hub import {folder} CHECKPOINT_DIR` and use CHECKPOINT_DIR")
        raise UserError(f"{folder / 'config.json'} is not a SmolHub config (no architecture/model keys)")
    return config


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    tokenizer: object
    config: dict
    path: Path

    @property
    def meta(self) -> dict:
        return self.config.get("meta", {})


def load_checkpoint(path_or_repo: str, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild any of the five models from a checkpoint folder alone (no pickle is loaded)."""
    from smolhub.modeling import model_class
    from smolhub.tokenizer import load_tokenizer

    folder = resolve_checkpoint(path_or_repo)
    config = read_config(folder)
    cls = model_class(config["architecture"])
    model = cls(cls.config_class.for_inference(config["model"]))
    if weights_file(folder).name == ADAPTER_WEIGHTS:
        model.load_state_dict(merged_adapter(folder, config).state_dict())
    else:
        load_weights(model, folder)
    tokenizer = load_tokenizer(folder)
    return LoadedCheckpoint(model.to(device).eval(), tokenizer, config, folder)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Put a checkpoint's weights into `model`: the whole model's, or a LoRA run's adapter into the
    adapters `model` already has."""
    path = weights_file(folder)
    if path.name == ADAPTER_WEIGHTS:
        from smolhub.finetune.lora import load_adapter_state

        load_adapter_state(model, folder)
        return
    try:
        missing, unexpected = load_safetensors_into(model, str(path), strict=False)
    except Exception as e:  # safetensors raises plain exceptions for truncated or mismatched files
        raise UserError(f"{path} cannot be loaded into {model.architecture} ({str(e).splitlines()[0]}); the file is "
                        "corrupt or belongs to another config")
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not match config.json (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")


def fine_tuning_base(folder: Path, config: dict) -> LoadedCheckpoint:
    """The checkpoint a fine-tune started from, as the run prepared it: with the chat format added to
    its tokenizer and the embeddings grown to fit (the rows of new tokens initialised the same way)."""
    from smolhub.chat import add_chat_format, fit_embeddings

    base_path = config.get("finetune", {}).get("base")
    if base_path is None:
        raise UserError(f"{folder}: config.json names no base checkpoint for its adapter (no finetune.base)")
    try:
        base = load_checkpoint(base_path)
    except UserError as e:
        raise UserError(f"{folder} is a LoRA adapter of {base_path}, which cannot be loaded ({e}); an adapter needs "
                        "its base: put it back there (`finetune.py --merge` next to both makes one that stands alone)")
    fit_embeddings(base.model, add_chat_format(base.tokenizer))
    return base


def merged_adapter(folder: Path, config: dict) -> torch.nn.Module:
    """The base of a LoRA checkpoint with its adapter folded into the weights: a plain model."""
    from smolhub.finetune.lora import merged

    base = fine_tuning_base(folder, config)
    rows, expected = base.model.config.vocab_size, config["model"]["vocab_size"]
    if rows != expected:
        raise UserError(f"{folder}: its base {base.path} no longer fits it (vocabulary of {rows} rows, the adapter's "
                        f"model has {expected}); use the base it was trained on")
    return merged(base.model, folder)


def load_trainer_state(folder: Path) -> dict:
    try:
        return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{folder / 'trainer_state.pt'} is unreadable ({str(e).splitlines()[0]})")


def resume_point(spec: str, out_dir: Path) -> tuple[Path, dict, list[str]]:
    """The checkpoint that --resume continues, its trainer state, and a line for each checkpoint
    passed over. spec "latest" takes the newest one of out_dir that loads, setting aside (renamed
    `<name>.corrupt`) those that do not; a path names a checkpoint folder, or an out_dir to take
    the newest loadable one of."""
    named = Path(spec).expanduser() if spec != "latest" else None
    if named is not None and is_checkpoint(named):
        step = CKPT_PATTERN.match(named.name)
        newer = [p.name for p in list_checkpoints(named.parent, resumable=False)
                 if step and int(CKPT_PATTERN.match(p.name)[1]) > int(step[1])]
        if newer and named.parent.resolve() == out_dir.resolve():
            raise UserError(f"--resume {spec}: its run went on to {', '.join(newer)}, which continuing in "
                            f"{out_dir} would overwrite; give the branch another --out_dir")
        return named, _resumable_state(named), []
    folder = named or out_dir
    candidates = list_checkpoints(folder)
    if not candidates:
        where = f"--resume {spec}" if named is not None else f"--resume: {out_dir}"
        raise UserError(f"{where} holds no complete checkpoint; drop --resume to start a new run")
    notes = []
    for ckpt in reversed(candidates):
        try:
            return ckpt, _resumable_state(ckpt), notes
        except UserError as e:
            aside = ckpt.with_name(f"{ckpt.name}.corrupt")
            ckpt.rename(aside)
            notes.append(f"{e}: set aside as {aside.name}")
    raise UserError(f"no checkpoint in {folder} can be loaded ({'; '.join(notes)}); start a new run")


def _resumable_state(folder: Path) -> dict:
    """The trainer state of a checkpoint whose weights file is whole (its header covers the file,
    checked without reading the tensors, which restore then reads once) and whose state loads."""
    from safetensors import safe_open

    try:
        with safe_open(weights_file(folder), "pt"):
            pass
    except Exception as e:  # safetensors raises plain exceptions for truncated files
        raise UserError(f"{weights_file(folder)} is unreadable ({str(e).splitlines()[0]})")
    return load_trainer_state(folder)
