"""Decode speed on one GPU: SmolHub's KV-cache generation against transformers' generate().

Greedy, bf16 weights, a 64-token prompt, 256 new tokens (EOS ignored so every run makes all 256),
batch 1 and 16. Warm figures are the median of --repeats calls after one untimed full-length call;
the first call in the process is reported separately. SmolHub runs its default decoder (the eager
step captured as a CUDA graph) and the compiled one (load_model(compile=True)); peak memory is
that of the default decoder's calls: weights, the whole-context KV cache and the graph's buffers.
transformers runs with its default dynamic cache and with cache_implementation="static" (which
compiles the decode step).

    python -m benchmarks.decode_speed --models StoryLlama --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import free, pairs
from smolhub.generate import Engine, SamplingConfig


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(fn, tokens: int, repeats: int) -> dict:
    first = timed(fn)
    warm = statistics.median(timed(fn) for _ in range(repeats))
    return {"first_tok_per_s": tokens / first, "tok_per_s": tokens / warm}


def print_table(rows: list[dict]) -> None:
    """One line per model and batch; '-' where a decoder or baseline was not run."""
    def cell(value: float, width: int, spec: str = ",.0f") -> str:
        return f"{value:>{width}{spec}}" if value == value else f"{'-':>{width}}"

    print(f"\n{'model':<16}{'B':>4}{'ours':>9}{'(first)':>9}{'GiB':>6}{'compiled':>10}{'(first)':>9}"
          f"{'hf dyn':>9}{'hf static':>11}{'vs static':>11}")
    nan = {"tok_per_s": float("nan"), "first_tok_per_s": float("nan"), "peak_gib": float("nan")}
    for r in rows:
        o, c = r.get("ours", nan), r.get("ours_compiled", nan)
        dyn, static = r.get("hf_dynamic", nan)["tok_per_s"], r.get("hf_static", nan)["tok_per_s"]
        best = max(x["tok_per_s"] for x in (o, c) if x is not nan)  # --decoders runs at least one
        print(f"{r['model']:<16}{r['batch']:>4}{cell(o['tok_per_s'], 9)}{cell(o['first_tok_per_s'], 9)}"
              f"{cell(o['peak_gib'], 6, '.2f')}{cell(c['tok_per_s'], 10)}{cell(c['first_tok_per_s'], 9)}"
              f"{cell(dyn, 9)}{cell(static, 11)}{cell(best / static, 10, '.2f')}"
              f"{'x' if static == static else ''}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(pairs()))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decoders", nargs="+", choices=["default", "compiled"], default=["default", "compiled"],
                   help="SmolHub decoders to time (compiled = load_model(compile=True)).")
    p.add_argument("--baselines", nargs="*", choices=["dynamic", "static"], default=["dynamic", "static"],
                   help="transformers generate() caches to time; none (--baselines with no value) times SmolHub only.")
    p.add_argument("--json", default="")
    args = p.parse_args()
    rows = []
    for name in args.models:
        pair = pairs()[name]
        torch.manual_seed(0)
        model = pair.build_ours().cuda().to(torch.bfloat16).eval()
        engine, compiled = Engine(model), Engine(model, compile=True)  # load_model(path) / (path, compile=True)
        weights = torch.cuda.memory_allocated()
        hf = None
        if args.baselines:
            hf = pair.build_baseline(model.config).cuda().to(torch.bfloat16).eval()
            # the training-time balancing loss is no part of decoding, and transformers' Mixtral
            # fails computing it inside generate() for a batch of more than one row
            if hasattr(hf.config, "output_router_logits"):
                hf.config.output_router_logits = False
        for batch in args.batches:
            prompt = torch.randint(0, 1000, (batch, args.prompt_len), device="cuda")
            n = batch * args.new_tokens
            cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0)
            torch.cuda.reset_peak_memory_stats()
            others = torch.cuda.memory_allocated() - weights  # the transformers twin, when loaded
            row = {"model": name, "batch": batch}
            if "default" in args.decoders:
                row["ours"] = measure(lambda: list(engine.generate_ids(prompt, cfg)), n, args.repeats)
                row["ours"]["peak_gib"] = (torch.cuda.max_memory_allocated() - others) / 2**30
            if "compiled" in args.decoders:
                row["ours_compiled"] = measure(lambda: list(compiled.generate_ids(prompt, cfg)), n, args.repeats)
            if hf is not None:
                for impl in args.baselines:
                    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
                    if impl == "static":
                        kwargs["cache_implementation"] = "static"
                    row[f"hf_{impl}"] = measure(lambda: hf.generate(prompt, **kwargs), n, args.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, engine, compiled, hf
        free()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
