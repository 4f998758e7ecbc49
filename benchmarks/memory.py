"""Training memory on one GPU: the largest micro-batch each SmolHub model trains at within a memory
budget (by default a 24 GB and an 80 GB card), run as the trainer runs it: bf16 autocast over fp32
weights, fused AdamW, torch.compile.

A budget is enforced on the lent card with torch.cuda.set_per_process_memory_fraction, less the
memory the CUDA context and libraries hold outside PyTorch's allocator (a card of that size holds
it too). The batch dimension is compiled dynamic, so one compile serves every probed size. A probe
runs two optimizer steps (the second holds the optimizer state too); the search doubles the batch
until a probe runs out of memory, then bisects. Also reported: the weights + gradients + AdamW
floor, and the peak at the trainer's default micro-batch.

    python -m benchmarks.memory --models StoryLlama --json out.json
"""
from __future__ import annotations

import argparse
import json
from typing import Callable

import torch

from benchmarks.common import free, pairs
from smolhub.config import TrainConfig

GIB = 2**30


class Prober:
    """Trains one model at any micro-batch size and reports the peak memory, or None when it runs out."""

    def __init__(self, model: torch.nn.Module, seq_len: int, compile: bool):
        model.cuda().train()
        self.seq_len, self.vocab = seq_len, model.config.vocab_size
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.fwd = torch.compile(model) if compile else model

    def peak_gib(self, batch: int, budget_gib: float | None) -> float | None:
        self.opt.zero_grad(set_to_none=True)
        free()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total) if budget_gib else 1.0)
        torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(2):
                data = torch.randint(0, self.vocab, (batch, self.seq_len + 1), device="cuda")
                inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
                torch._dynamo.mark_dynamic(inputs, 0)
                torch._dynamo.mark_dynamic(targets, 0)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = self.fwd(inputs, targets)
                loss.backward()
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / GIB
        except torch.OutOfMemoryError:
            return None
        finally:
            self.opt.zero_grad(set_to_none=True)
            loss = inputs = targets = data = None
            free()
            torch.cuda.set_per_process_memory_fraction(1.0)

    def largest_batch(self, budget_gib: float, start: int, cap: int) -> tuple[int, float | None]:
        return largest_fitting(lambda batch: self.peak_gib(batch, budget_gib), start, cap)


def largest_fitting(peak_of: Callable[[int], float | None], start: int, cap: int) -> tuple[int, float | None]:
    """The largest batch <= cap for which peak_of(batch) is not None (it fits), and that peak; (0, None)
    if none does. Doubles from `start` until a batch fails, then bisects; assumes a larger batch
    never needs less memory."""
    good, good_peak, bad = 0, None, None
    batch = start
    while batch <= cap:
        peak = peak_of(batch)
        if peak is None:
            bad = batch
            break
        good, good_peak, batch = batch, peak, batch * 2
    if bad is None:  # every doubling fitted: search between the last one and the cap
        if good == cap or good == 0:
            return good, good_peak
        bad = cap + 1
    lo, hi = good, bad
    while hi - lo > 1:  # lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        peak = peak_of(mid)
        if peak is None:
            hi = mid
        else:
            lo, good_peak = mid, peak
    return lo, good_peak


def outside_allocator_gib() -> float:
    """Device memory in use that PyTorch's caching allocator does not hold (context, cuBLAS, cuDNN)."""
    free_b, total_b = torch.cuda.mem_get_info()
    return (total_b - free_b - torch.cuda.memory_reserved()) / GIB


def measure(name: str, args, compile: bool) -> dict:
    pair = pairs()[name]
    torch.manual_seed(0)
    model = pair.build_ours()
    n_params = sum(p.numel() for p in model.parameters())
    prober = Prober(model, pair.seq_len, compile)
    default_batch = TrainConfig().batch_size
    row = {"model": name, "seq_len": pair.seq_len, "params_M": n_params / 1e6, "compiled": compile,
           # fp32 weights + fp32 gradients + AdamW's two fp32 moments
           "weights_grads_adam_gib": 16 * n_params / GIB}
    row["default_batch"] = default_batch
    row["default_batch_peak_gib"] = prober.peak_gib(default_batch, None)
    row["outside_allocator_gib"] = outside_allocator_gib()
    for card in args.cards:
        batch, peak = prober.largest_batch(card - row["outside_allocator_gib"], default_batch, args.cap)
        row[f"max_batch_{card:g}gb"] = batch
        row[f"max_batch_{card:g}gb_tokens"] = batch * pair.seq_len
        row[f"max_batch_{card:g}gb_peak_gib"] = peak
    print(json.dumps(row), flush=True)
    del prober, model
    free()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[n for n in pairs() if n != "SmolTransformer-124M"])
    p.add_argument("--cards", nargs="+", type=float, default=[24, 80], help="Memory budgets in GiB.")
    p.add_argument("--cap", type=int, default=4096, help="Largest micro-batch (sequences) to try.")
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for name in args.models:
        for compile in ([False] if args.no_compile else [True, False]):
            try:
                rows.append(measure(name, args, compile))
                break
            except Exception as e:  # one model failing must not hide the others; eager after a compile error
                print(f"{name} (compile={compile}): FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                      flush=True)
                torch._dynamo.reset()
                free()
    print(f"\n{'model':<16}{'T':>6}{'compiled':>9}{'floor GiB':>10}{'B=16 GiB':>10}" +
          "".join(f"{f'max B @{c:g}GB':>14}{'tokens':>9}" for c in args.cards))
    for r in rows:
        print(f"{r['model']:<16}{r['seq_len']:>6}{str(r['compiled']):>9}{r['weights_grads_adam_gib']:>10.2f}"
              f"{r['default_batch_peak_gib'] or float('nan'):>10.2f}" +
              "".join(f"{r[f'max_batch_{c:g}gb']:>14}{r[f'max_batch_{c:g}gb_tokens']:>9,}" for c in args.cards))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
