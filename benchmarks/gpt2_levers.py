"""Where SmolTransformer's step goes at the GPT-2 124M shape, and what the remaining levers buy.

The one missed training target (1.2x nanoGPT, 50% MFU) needs the rest of the step measured, not
guessed. One process, one GPU, 32 x 1024 tokens per step:

1. matmuls: every matmul of a training step alone (bf16, triton.testing.do_bench median), oriented
   as autograd runs them, plus the weight gradients transposed and, where the torch build has
   torch.mm(..., out_dtype=torch.float32), written straight to fp32: TFLOP/s each, and their sum
   per step;
2. training, timed as benchmarks.train_throughput times it (median synchronized step, pipelined
   mean, peak memory): ours as the trainer compiles it, profiled (CUDA time by kernel category, GPU
   idle time between kernels); ours with SDPA restricted to the flash backend (the default choice on
   an H100 is cuDNN's); ours with inductor's max_autotune_gemm (Triton matmul templates, which can
   fuse the GELU and norms into their epilogues, against cuBLAS); and nanoGPT with --nanogpt_dir.

    python -m benchmarks.gpt2_levers --nanogpt_dir path/to/nanoGPT --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch

from benchmarks.common import free, nanogpt_like, pairs
from benchmarks.train_throughput import profile_summary, time_training

N_TOKENS, WIDTH, VOCAB, LAYERS, SEQ_LEN = 32768, 768, 50304, 12, 1024
VARIANTS = ("ours", "ours flash attention", "ours max-autotune-gemm", "nanoGPT")


def time_matmuls() -> dict:
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    rows, per_step_ms = [], 0.0
    for name, out_f, in_f, per_step in [("qkv", 3 * WIDTH, WIDTH, LAYERS), ("attn out", WIDTH, WIDTH, LAYERS),
                                        ("mlp up", 4 * WIDTH, WIDTH, LAYERS), ("mlp down", WIDTH, 4 * WIDTH, LAYERS),
                                        ("head", VOCAB, WIDTH, 1)]:
        x, w, dy = randn(N_TOKENS, in_f), randn(out_f, in_f), randn(N_TOKENS, out_f)
        cases = {"forward x @ W.T": lambda: x @ w.t(), "input grad dy @ W": lambda: dy @ w,
                 "weight grad dy.T @ x": lambda: dy.t() @ x, "weight grad (x.T @ dy).T": lambda: (x.t() @ dy).t()}
        try:
            torch.mm(dy.t(), x, out_dtype=torch.float32)
            cases["weight grad, fp32 out"] = lambda: torch.mm(dy.t(), x, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch builds without mm's out_dtype
            pass
        flop = 2 * N_TOKENS * in_f * out_f
        for case, fn in cases.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            rows.append({"matmul": name, "case": case, "ms": ms, "tflops": flop / ms / 1e9, "per_step": per_step})
            if case in ("forward x @ W.T", "input grad dy @ W", "weight grad dy.T @ x"):
                per_step_ms += ms * per_step
            print(f"{name:<10}{case:<27}{ms:8.3f} ms {flop / ms / 1e9:6.0f} TFLOP/s   x{per_step}/step", flush=True)
        del x, w, dy
    print(f"one step's matmuls, as autograd orients them: {per_step_ms:.1f} ms", flush=True)
    return {"rows": rows, "ms_per_step": per_step_ms}


def build(variant: str, nanogpt_dir: str) -> tuple[torch.nn.Module, str]:
    """(model, torch.compile mode): ours as the trainer compiles it, nanoGPT as train_throughput does."""
    if variant == "nanoGPT":
        return nanogpt_like(nanogpt_dir, SEQ_LEN, VOCAB), "default"
    return pairs()["SmolTransformer-124M"].build_ours(), "reduce-overhead"


def time_variant(variant: str, args, flops_per_token: float) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch._dynamo.reset()
    free()
    torch.manual_seed(0)
    torch._inductor.config.max_autotune_gemm = variant == "ours max-autotune-gemm"
    model, mode = build(variant, args.nanogpt_dir)
    backend = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if variant == "ours flash attention" else contextlib.nullcontext()
    with backend:
        result = time_training(model, False, N_TOKENS // SEQ_LEN, SEQ_LEN, VOCAB, args.steps, args.warmup, mode,
                               args.profile if variant.startswith("ours") else 0)
    result.update(variant=variant, mfu=flops_per_token * result["tok_per_s"] / (args.peak_tflops * 1e12))
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--nanogpt_dir", default="", help="a checkout of karpathy/nanoGPT (needed for the nanoGPT row)")
    p.add_argument("--no_matmuls", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", type=int, default=3, metavar="STEPS", help="profile our variants over this many steps")
    p.add_argument("--peak_tflops", type=float, default=989.5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if "nanoGPT" in args.variants and not args.nanogpt_dir:
        p.error("the nanoGPT row needs --nanogpt_dir (or leave it out of --variants)")
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.device("meta"):
        flops_per_token = pairs()["SmolTransformer-124M"].build_ours().flops_per_token(SEQ_LEN)
    results = {"matmuls": None if args.no_matmuls else time_matmuls(),
               "training": [time_variant(v, args, flops_per_token) for v in args.variants]}
    nano = next((r for r in results["training"] if r["variant"] == "nanoGPT"), None)
    print(f"\n{'variant':<24}{'tok/s':>10}{'MFU':>7}{'pipelined':>11}{'GiB':>6}{'compile s':>10}{'vs nanoGPT':>12}")
    for r in results["training"]:
        ratio = f"{r['tok_per_s'] / nano['tok_per_s']:.3f}x" if nano else "-"
        print(f"{r['variant']:<24}{r['tok_per_s']:>10,.0f}{r['mfu']:>7.1%}{r['pipelined_tok_per_s']:>11,.0f}"
              f"{r['peak_gib']:>6.1f}{r['warmup_s']:>10.0f}{ratio:>12}")
        if r.get("profile"):
            print(f"    {profile_summary(r['profile'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
