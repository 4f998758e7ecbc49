"""A run's output folder: one trainer at a time, one run per folder, nothing half-written left.

    out_dir/
        .lock           held (flock) by the trainer writing here; the kernel releases it when that
                        process ends, however it ends, so a killed trainer never blocks the next one
        run.json        {"run_id": ...}: the run this folder holds
        ckpt-NNNNNNN/   its checkpoints (config.json's meta.run_id names their run)
        metrics.jsonl, loss_curve.png, wandb_run_id, wandb/

A new run refuses a folder that holds another run unless told to replace it, and pruning only
touches the checkpoints of the run that is writing.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from smolhub.checkpoint import CKPT_PATTERN
from smolhub.errors import UserError

RUN_FILES = ("metrics.jsonl", "loss_curve.png", "wandb_run_id", "wandb", "run.json")
LEFTOVERS = (".tmp-ckpt-*", "*.tmp", "*.tmp.png")  # what a write cut short by a kill leaves behind


def unwritable(path: Path, e: OSError) -> UserError:
    why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return UserError(f"cannot write to {path} ({why}): free space or choose another --out_dir")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None
        self._created = False

    def claim(self) -> None:
        """Create the folder if needed and lock it against a second trainer, then clear what a
        killed run left half-written."""
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "a+")
        except OSError as e:
            raise unwritable(self.path, e)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise UserError(f"another trainer (pid {owner}) is writing to {self.path}: wait for it to end, "
                            "or give this run another --out_dir")
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock
        self._clean_leftovers()

    def release(self) -> None:
        """Unlock; a folder this run created and saved nothing in goes again."""
        if self._lock is None:
            return
        self._lock.close()
        self._lock = None
        if self._created and {p.name for p in self.path.iterdir()} <= {".lock", "run.json"}:
            shutil.rmtree(self.path, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        for old in self.path.glob(".old-ckpt-*"):  # a same-step re-save killed between its two renames
            final = self.path / old.name.removeprefix(".old-").rsplit("-", 1)[0]
            if final.exists():
                shutil.rmtree(old)
            else:
                old.rename(final)
        for pattern in LEFTOVERS:
            for leftover in self.path.glob(pattern):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()

    def run_id(self) -> str | None:
        try:
            return json.loads((self.path / "run.json").read_text())["run_id"]
        except (OSError, ValueError, KeyError):
            return None

    def earlier_run(self) -> list[str]:
        """The checkpoints and records that some run left here."""
        ckpts = sorted(p.name for p in self.path.iterdir() if CKPT_PATTERN.match(p.name))
        return ckpts + [name for name in RUN_FILES if (self.path / name).exists()]

    def start_new(self, overwrite: bool) -> str:
        """Make this folder hold a new run and return its id. Another run's files are refused, or
        deleted with overwrite."""
        earlier = self.earlier_run()
        if earlier and not overwrite:
            shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise UserError(f"{self.path} holds another run ({shown}): continue it with --resume, choose another "
                            "--out_dir, or pass --overwrite to delete it and start again")
        for name in earlier:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        return self._record(uuid.uuid4().hex[:12])

    def continue_run(self, run_id: str | None, checkpoint: Path) -> str:
        """Make this folder hold the run that `checkpoint` belongs to (an id is given to a run saved
        before runs had one)."""
        here = self.run_id()
        if run_id is not None and here not in (None, run_id):
            raise UserError(f"{self.path} holds another run than {checkpoint}'s: resume into the folder it was "
                            "trained in, or give this run another --out_dir")
        return self._record(run_id or here or uuid.uuid4().hex[:12])

    def _record(self, run_id: str) -> str:
        tmp = self.path / "run.json.tmp"
        try:
            tmp.write_text(json.dumps({"run_id": run_id}) + "\n")
            os.replace(tmp, self.path / "run.json")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise unwritable(self.path, e)
        return run_id

