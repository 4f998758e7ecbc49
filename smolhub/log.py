"""Metrics: metrics.jsonl (the record), tqdm, wandb, and the loss-curve PNG, all from the same numbers."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from tqdm import tqdm

from smolhub.config import TrainConfig
from smolhub.run_dir import unwritable


class MetricsLogger:
    """Rank 0 writes; the other ranks get a logger that does nothing, so call sites need no checks."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, run_config: dict, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.png = Path(out_dir) / "loss_curve.png"
        self.wandb = None
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        # A resumed run continues the record from its checkpoint: steps logged after that checkpoint
        # by the interrupted run are dropped, since they are about to be trained again.
        kept = [r for r in self.records() if r["step"] <= start_step] if start_step else []
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise unwritable(self.path, e)
        if cfg.wandb_mode != "disabled":
            self.wandb = _start_wandb(cfg, run_config, out_dir, resumed=start_step > 0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise unwritable(self.path, e)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self) -> None:
        """Redraw loss_curve.png from metrics.jsonl (so a resumed run's curve is whole)."""
        if not self.enabled:
            return
        records = self.records()
        if not records:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bpb_ax) = plt.subplots(1, 2, figsize=(11, 4))
        train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
        bpb = [(r["tokens"], r["val_bpb"]) for r in records if "val_bpb" in r]
        if train:
            ax.plot(*zip(*train), label="train", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val", markersize=3)
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        if bpb:  # the tokenizer-independent scale, comparable across models
            bpb_ax.plot(*zip(*bpb), "o-", color="C1", markersize=3)
        bpb_ax.set_ylabel("val bits per byte")
        for a in (ax, bpb_ax):
            a.set_xlabel("tokens")
            a.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.png.with_suffix(".tmp.png")
        try:
            fig.savefig(tmp, dpi=100)
            os.replace(tmp, self.png)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise unwritable(self.png, e)
        finally:
            plt.close(fig)

    def finish(self) -> None:
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: TrainConfig, run_config: dict, out_dir: Path, resumed: bool):
    import wandb

    mode = cfg.wandb_mode
    if mode == "online" and not _wandb_has_key():
        tqdm.write("wandb: no API key configured (run `wandb login` or set WANDB_API_KEY); logging offline "
                   f"to {out_dir}/wandb, upload later with `wandb sync`")
        mode = "offline"
    run_id_file = Path(out_dir) / "wandb_run_id"
    run_id = run_id_file.read_text().strip() if resumed and run_id_file.exists() else uuid.uuid4().hex[:8]
    run_id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb_project, name=cfg.run_name or None, config=run_config, dir=str(out_dir),
                      mode=mode, id=run_id, resume="allow")


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in h for h in hosts)
