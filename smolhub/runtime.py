"""Where a training process runs: its rank and device, precision, RNG state and stop signals.

One process or many under torchrun (DDP: NCCL on GPUs, gloo on CPU). Nothing here knows about
models or objectives; the engine in train.py builds on it.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from smolhub.config import TrainConfig
from smolhub.errors import UserError


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Read torchrun's environment; start the process group when there are several processes."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif cfg.device == "cuda" and world_size > 1:
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: CUDA is not available here; use --device cpu")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(rank, local_rank, world_size, device)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's autocast context; fp32 runs without one."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(rt: Runtime) -> list[dict]:
    """Every rank's RNG state, in rank order (a checkpoint restores each rank's own)."""
    if not rt.distributed:
        return [rng_state(rt.device)]
    states = [None] * rt.world_size
    dist.all_gather_object(states, rng_state(rt.device))
    return states


class Interrupted(KeyboardInterrupt):
    """A stop signal ended the run; the process exits with 128 + the signal's number, as the shell
    reports a process killed by it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignal:
    """SIGTERM/SIGINT for the whole run. During setup (tokenizer training, data preparation) a
    signal interrupts at once, as Ctrl-C normally does; once `defer()`ed (the training loop) it
    asks the loop to save and stop at the end of the current step. Either way it is remembered, so
    a library that swallows the KeyboardInterrupt (tokenizers' BPE trainer, a __del__ it lands in)
    cannot lose it: `raise_if_stopped()` raises it again at the next boundary."""

    active: "StopSignal | None" = None

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        StopSignal.active = self

    def _handle(self, signum, frame):
        self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)

    def defer(self) -> None:
        self.deferred = True

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        StopSignal.active = None

    def agreed(self, rt: Runtime) -> bool:
        """All ranks stop together: one rank's signal stops every rank."""
        if not rt.distributed:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def raise_if_stopped() -> None:
    """Raise the stop signal that arrived during this run's setup, if one did (call it before
    keeping a result that an interrupted computation may have cut short)."""
    stop = StopSignal.active
    if stop is not None and stop.requested:
        raise Interrupted(stop.signum)


def on_main_first(rt: Runtime, fn):
    """Run fn on rank 0 first (it fills a cache), then on the others (they read it)."""
    if rt.is_main:
        result = fn()
    if rt.distributed:
        dist.barrier()
    if not rt.is_main:
        result = fn()
    return result


def mean_over_ranks(value: torch.Tensor, rt: Runtime) -> float:
    if rt.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if rt.device.type == "cuda" else dist.ReduceOp.SUM)
        if rt.device.type != "cuda":  # gloo has no AVG
            value /= rt.world_size
    return value.item()


def max_over_ranks(value: torch.Tensor, rt: Runtime) -> int:
    if rt.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
