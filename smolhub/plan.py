"""How a run is laid out before it starts: the micro-batch `--batch_size auto` picks, the plan lines
every run begins with (tokens per step, steps, tokens, epochs), and the estimate of its time.

`--batch_size auto` (TrainConfig stores it as 0) is the largest micro-batch that fits the device's
memory among the divisors of the sequences each process trains per step, so that gradient
accumulation makes up --tokens_per_step exactly. It is found once at start, by trial steps of a copy
of the run's model (the copy, because MoE layers count the tokens they route):
- CUDA: a forward and backward under the run's autocast, eager; its peak is
  torch.cuda.max_memory_allocated, and it fits within 75% of the memory this process can have on
  the card (what it holds plus what is free); a trial that runs out of memory does not fit. The 25%
  covers what one trial step does not show: the caching allocator's fragmentation over many steps
  (an eager SmolTransformer run on an H100 whose trial peaked at 69.4 of 70.8 GiB ran out of memory
  in its first step, 12.6 GiB reserved but unallocated) and the CUDA graphs' pool.
- CPU: the same search within half of the machine's RAM, a trial's bytes counted rather than taken
  from the allocator: the weights, their gradients, and every tensor the forward keeps for backward
  (saved_tensors_hooks). The count depends only on the model and the shapes, so the pick is the same
  on every run on the machine.
On both, the optimizer's state, which a trial cannot allocate without stepping, is added as two fp32
numbers per parameter (AdamW's two moments; Muon keeps one for its matrices).
"""
from __future__ import annotations

import copy
import functools
import math
import os
from typing import Callable

import torch
import torch.nn as nn

from smolhub.config import TrainConfig
from smolhub.errors import UserError
from smolhub.runtime import Runtime, autocast, max_over_ranks

GiB = 2**30
CUDA_HEADROOM = 0.75  # of the memory this process can have on the card
CPU_SHARE = 0.5  # of the machine's RAM
FEW_EPOCHS, MANY_EPOCHS = 0.1, 20  # outside these a run says what to change


def sequences_per_process(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    """The sequences each process trains per optimizer step (--tokens_per_step, which TrainConfig
    requires with --batch_size auto), which --batch_size auto divides into micro-batches."""
    per_sequence = block_size * world_size
    if cfg.tokens_per_step % per_sequence:
        raise UserError(f"--tokens_per_step {cfg.tokens_per_step} must be a multiple of block_size x processes = "
                        f"{block_size} x {world_size} = {per_sequence}")
    return cfg.tokens_per_step // per_sequence


def largest_micro_batch(sequences: int, budget: float, measure: Callable[[int], float],
                        limit: int | None = None) -> tuple[int, float]:
    """The largest divisor of `sequences` (up to `limit`) whose trial step's bytes (`measure`) fit in
    `budget`, and those bytes. Memory grows with the micro-batch, so a bisection over the divisors
    needs a few trials."""
    top = sequences if limit is None else max(1, min(sequences, limit))
    divisors = [b for b in range(1, top + 1) if sequences % b == 0]
    lo, hi = 0, len(divisors) - 1
    best, smallest = None, math.inf
    while lo <= hi:
        mid = (lo + hi) // 2
        peak = measure(divisors[mid])
        if peak <= budget:
            best, lo = (divisors[mid], peak), mid + 1
        else:
            smallest, hi = peak, mid - 1
    if best is None:
        took = "ran out of memory" if smallest == math.inf else f"took {smallest / GiB:.2f} GiB"
        raise UserError(f"--batch_size auto: not even one sequence per micro-batch fits in {budget / GiB:.2f} GiB (a "
                        f"trial step {took}): use --grad_checkpointing, a shorter --block_size or a smaller model")
    return best


def memory_budget(device: torch.device) -> tuple[float, str]:
    """The bytes a trial step may take on `device`, and how to say what they are a share of."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device)
        return CUDA_HEADROOM * available, f"{available / GiB:.1f} GiB"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return CPU_SHARE * ram, f"half of this machine's {ram / GiB:.1f} GiB of RAM"


def trial_bytes(model: nn.Module, objective, micro_batch: int, amp_dtype: torch.dtype) -> float:
    """The peak bytes of a training step of `micro_batch` sequences of random tokens on `model` (already
    on its device; see the module's docstring for how each device counts them); inf when it runs out of
    memory. Its gradients are dropped again."""
    device = next(model.parameters()).device
    tokens = torch.randint(model.config.vocab_size, (micro_batch, model.config.block_size + 1),
                           generator=torch.Generator().manual_seed(0))
    batch = (tokens[:, :-1].to(device), tokens[:, 1:].to(device))
    n_params = sum(p.numel() for p in model.parameters())
    optimizer_state = 2 * 4 * n_params
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws no run's numbers
        if device.type == "cuda":
            peak = _cuda_peak(model, objective, batch, amp_dtype)
        else:
            param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            peak = 2 * param_bytes + _saved_bytes(model, objective, batch, amp_dtype)
    model.zero_grad(set_to_none=True)
    return peak + optimizer_state


def _cuda_peak(model: nn.Module, objective, batch, amp_dtype: torch.dtype) -> float:
    device = batch[0].device

    def step() -> None:  # its tensors are gone once it returns or raises
        with autocast(device, amp_dtype):
            loss, _ = objective(model, batch)
        loss.backward()

    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step()
    except torch.cuda.OutOfMemoryError:
        peak = math.inf
    else:
        peak = torch.cuda.max_memory_allocated(device)
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    return peak


def _saved_bytes(model: nn.Module, objective, batch, amp_dtype: torch.dtype) -> int:
    """The bytes of the tensors the forward keeps for backward, weights left out (counted apart)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()  # views of one storage count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(batch[0].device, amp_dtype):
        objective(model, batch)
    return sum(saved.values())


def auto_batch_size(model: nn.Module, make_objective: Callable[[nn.Module], object], cfg: TrainConfig, rt: Runtime,
                    amp_dtype: torch.dtype, data_tokens: int) -> tuple[int, str]:
    """--batch_size auto: the micro-batch for `model` (not yet on the device) on this run's device,
    the same on every process (the smallest pick of any), and the line that says so. `data_tokens`,
    the smaller of the training and validation splits, must hold a batch of every process."""
    block_size = model.config.block_size
    sequences = sequences_per_process(cfg, block_size, rt.world_size)
    rows = max(data_tokens - 1, 0) // block_size // rt.world_size
    budget, of = memory_budget(rt.device)
    picked, peak = _search(model, make_objective, sequences, budget, rows, amp_dtype, rt)
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)  # the run logs its own peak
    share = f"{CUDA_HEADROOM:.0%} of {of}" if rt.device.type == "cuda" else of
    held = f"; the data holds batches of at most {rows}" if rows < sequences else ""
    return picked, (f"--batch_size auto: {plural(picked, 'sequence')} per micro-batch (peak {peak / GiB:.2f} GiB in a "
                    f"trial step, within {share}{held}), {plural(sequences // picked, 'micro-batch')} per step")


def _search(model: nn.Module, make_objective: Callable[[nn.Module], object], sequences: int, budget: float,
            rows: int, amp_dtype: torch.dtype, rt: Runtime) -> tuple[int, float]:
    """The pick of every process and its bytes here, from trial steps of a copy of the model that is
    freed on return."""
    trial = copy.deepcopy(model).to(rt.device).train()
    objective = make_objective(trial)
    measure = functools.cache(lambda b: trial_bytes(trial, objective, b, amp_dtype))
    picked, _ = largest_micro_batch(sequences, budget, measure, limit=rows)
    picked = -max_over_ranks(torch.tensor(-picked, device=rt.device), rt)
    return picked, measure(picked)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith(("h", "s")) else "s")


def count(n: float) -> str:
    """1,234 / 524.3M / 3.15B: token counts as a reader takes them in."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_lines(tokens_per_step: int, micro_batch: int, accum: int, world_size: int, block_size: int, max_steps: int,
               step: int, train_tokens: int) -> list[str]:
    """What the run will train, said before it starts: tokens per step and how they are made up, steps,
    tokens, and epochs over its prepared training tokens; a line with what to change when that is
    under a tenth of an epoch or over ~20 epochs."""
    total = tokens_per_step * max_steps
    epochs = total / train_tokens
    resuming = f", resuming at step {step:,}" if step else ""
    lines = [f"plan: {tokens_per_step:,} tokens/step ({plural(micro_batch, 'sequence')} x {block_size} tokens x "
             f"{plural(accum, 'micro-batch')} x {plural(world_size, 'process')}), {max_steps:,} steps{resuming}: "
             f"{count(total)} tokens = {epochs:,.{2 if epochs < 100 else 0}f} epochs of the {count(train_tokens)} "
             "training tokens"]
    if epochs < FEW_EPOCHS:
        one = math.ceil(train_tokens / tokens_per_step)
        lines.append(f"note: this run sees {epochs:.1%} of one pass over its training data; --max_steps {one:,} makes "
                     "one epoch (or prepare less with --max_tokens)")
    elif epochs > MANY_EPOCHS:
        steps = MANY_EPOCHS * train_tokens // tokens_per_step
        lines.append(f"note: {epochs:.0f} epochs repeat the same data past the ~{MANY_EPOCHS} where a model learns it "
                     f"by heart; --max_steps {steps:,} makes {MANY_EPOCHS}, or train on more data (--dataset)")
    return lines


def eta_line(step: int, max_steps: int, tokens_per_step: int, tok_per_s: float, max_seconds: float = 0.0,
             train_seconds: float = 0.0) -> str:
    """The time left to max_steps at the measured speed, training steps only (evaluation, samples and
    saves add theirs), and where --max_seconds stops the run first."""
    left = (max_steps - step) * tokens_per_step / tok_per_s
    rate = f"{tok_per_s / 1e3:,.0f}k" if tok_per_s >= 1e4 else f"{tok_per_s:,.0f}"
    line = f"~{duration(left)} to step {max_steps:,} at {rate} tok/s"
    if max_seconds and train_seconds + left > max_seconds:
        stop = step + (max_seconds - train_seconds) * tok_per_s / tokens_per_step
        line += f"; --max_seconds {max_seconds:g} stops it near step {max(step, round(stop)):,}"
    return line
