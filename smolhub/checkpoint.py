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
    """Write a complete checkpoint folder atomically; then keep the newest keep_last (0 keeps all)
    of this run's checkpoints (those whose meta has the same run_id), never another run's.

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
        save_safetensors_from(model, str(tmp / "model.safetensors"))
        config = {"architecture": model.architecture, "model": model.config.to_dict(), "meta": meta}
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
        with safe_open(folder / "model.safetensors", "pt"):
            pass
    except Exception as e:  # safetensors raises plain exceptions for truncated files
        raise UserError(f"{folder / 'model.safetensors'} is unreadable ({str(e).splitlines()[0]})")
    return load_trainer_state(folder)
