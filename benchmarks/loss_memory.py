"""Peak memory and time of the eager loss: SmolHub's fused head + cross-entropy against F.linear then
F.cross_entropy(logits.float()), forward and backward from bf16 hidden states of N tokens x C to V classes.

On CUDA the peak is the allocator's; on CPU it is the process's peak resident memory, so each
variant runs in a process of its own there (--variant).

    python -m benchmarks.loss_memory --tokens 32768 --dim 768 --vocab 50304
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from smolhub.loss import linear_cross_entropy, reference_linear_cross_entropy

VARIANTS = {"F.cross_entropy": reference_linear_cross_entropy, "smolhub fused": linear_cross_entropy}


def measure(variant: str, tokens: int, dim: int, vocab: int, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, dim, dtype=torch.bfloat16, device=device, generator=g).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss = VARIANTS[variant](hidden, weight, targets)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "tokens": tokens, "vocab": vocab, "device": device, "loss": loss.item(),
            "seconds": time.perf_counter() - start, "logits_gib": tokens * vocab * 2 / 2**30,
            "peak_growth_gib": peak / 2**30}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", choices=list(VARIANTS), help="Measure this one only, in this process.")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.variant:
        rows = [measure(args.variant, args.tokens, args.dim, args.vocab, args.device)]
    elif args.device == "cuda":
        rows = [measure(v, args.tokens, args.dim, args.vocab, "cuda") for v in VARIANTS]
    else:  # a process's peak resident memory never falls, so each variant gets a fresh process
        rows = [json.loads(subprocess.run(
            [sys.executable, "-m", "benchmarks.loss_memory", "--tokens", str(args.tokens), "--dim", str(args.dim),
             "--vocab", str(args.vocab),
             "--device", "cpu", "--variant", v, "--json", "-"], check=True, capture_output=True, text=True,
        ).stdout.splitlines()[-1])[0] for v in VARIANTS]
    if args.json == "-":
        print(json.dumps(rows))
        return rows
    for r in rows:
        print(f"{r['variant']:<18} loss {r['loss']:.6f}  peak growth {r['peak_growth_gib']:6.2f} GiB "
              f"({r['peak_growth_gib'] / r['logits_gib']:.1f}x the bf16 logits)  {r['seconds']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
