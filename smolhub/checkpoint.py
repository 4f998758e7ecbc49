"""Checkpoints: one folder per save, written under a temporary name and renamed when complete.

    out_dir/ckpt-0001000/
        model.safetensors   weights (a tied embedding stored once)
        config.json         {"architecture": "StoryLlama", "model": {...}, "meta": {step, val_loss, ...}}
        tokenizer.json ...  the tokenizer, loadable with AutoTokenizer
        trainer_state.pt    optimizer, scheduler, step, RNG states of every rank, data position

Only names matching ckpt-NNNNNNN that hold all of these count as checkpoints, and rename is atomic,
so a save cut short by a kill leaves at most a `.tmp-*` folder that nothing ever loads.
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
REQUIRED_FILES = ("model.safetensors", "config.json")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:07d}"


def is_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in REQUIRED_FILES)


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
                    trainer_state: dict | None = None, keep_last: int = 0) -> Path:
    """Write a complete checkpoint folder atomically; prune to the newest keep_last (0 keeps all)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors_from(model, str(tmp / "model.safetensors"))
    config = {"architecture": model.architecture, "model": model.config.to_dict(), "meta": meta}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(tmp))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    _fsync_tree(tmp)
    if final.exists():  # saving the same step twice (e.g. a signal right after a periodic save)
        old = out_dir / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    if keep_last > 0:
        for stale in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(stale)
    return final


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
    model = cls(cls.config_class.from_dict(config["model"]))
    try:
        missing, unexpected = load_safetensors_into(model, str(folder / "model.safetensors"), strict=False)
    except Exception as e:  # safetensors raises plain exceptions for truncated or mismatched files
        raise UserError(f"{folder / 'model.safetensors'} cannot be loaded into {config['architecture']} "
                        f"({str(e).splitlines()[0]}); the file is corrupt or belongs to another config")
    if missing or unexpected:
        raise UserError(f"{folder}: weights do not match config.json (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    tokenizer = load_tokenizer(folder)
    return LoadedCheckpoint(model.to(device).eval(), tokenizer, config, folder)


def load_trainer_state(folder: Path) -> dict:
    try:
        return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{folder / 'trainer_state.pt'} is unreadable ({str(e).splitlines()[0]}); "
                        "delete that checkpoint folder to resume from the one before it")
