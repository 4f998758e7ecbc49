"""Training throughput on one GPU: each SmolHub model against the transformers model of the same shape.

Both sides: bf16 autocast over fp32 weights, fused AdamW, torch.compile, the same random tokens,
~32k tokens per step in one micro-batch. Ours is compiled as the trainer compiles it at one
micro-batch per step on one GPU (--cuda_graphs auto: mode 'reduce-overhead'), the baselines with
--compile_mode. Reports the median step time over --steps timed steps after --warmup steps, each
step synchronized (the GPU idles while the CPU launches the next step's first kernels), tokens/s,
MFU (PaLM/nanoGPT estimate: 6 x params + 12 x layers x d_model x T FLOPs per token, the params
without lookup-only tables such as learned positions, over --peak_tflops) and peak memory; then the
mean step over --steps more without synchronizing between steps ("pipelined", as the trainer runs
between log lines). The ratio ours/baseline is the figure that counts. --profile N then profiles N
more steps of each side and prints where the CUDA time goes, and how long the GPU sat idle.

    python -m benchmarks.train_throughput --models StoryLlama --json out.json
"""
from __future__ import annotations

import argparse
import json
import re
import time

import torch

from benchmarks.common import free, nanogpt_like, pairs


# Kernel-name patterns for --profile, tried in order: the first that matches a kernel takes it.
# inductor names its fused kernels after the ops inside (triton_red_fused__log_softmax_..., ...); a
# kernel fusing several concerns counts for the first listed.
TRITON_MOE_KERNELS = r"_rows_kernel|_weight_grad_kernel"  # smolhub.kernels.moe (--experts_kernel triton)
KERNEL_CATEGORIES = [
    ("attention", r"flash|fmha|sdpa|attention|cudnn"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|matmul|_mm_|grouped_mm|" + TRITON_MOE_KERNELS),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("norm", r"rms_norm|layer_norm|rsqrt|var_mean"),
    ("cross-entropy", r"log_softmax|nll_loss|logsumexp|cross_entropy"),
    ("activation", r"silu|sigmoid|gelu|tanh|erf"),
    ("rotary", r"rotary|cos|sin|neg"),
    ("embedding", r"embedding"),
]


def kernel_category(name: str) -> str:
    return next((cat for cat, pattern in KERNEL_CATEGORIES if re.search(pattern, name, re.I)), "other")


def idle_time(spans: list[tuple[float, float]]) -> float:
    """Time between the first start and the last end of these (start, end) intervals that none covers."""
    spans = sorted(spans)
    idle, covered_to = 0.0, spans[0][0]
    for start, end in spans:
        idle += max(0.0, start - covered_to)
        covered_to = max(covered_to, end)
    return idle


def kernel_profile(step, steps: int) -> dict:
    """CUDA kernel time per step over `steps` steps, summed by KERNEL_CATEGORIES, plus the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    per_step = {e.key: e.device_time_total / steps / 1e3 for e in kernels}
    categories: dict[str, float] = {}
    for name, ms in per_step.items():
        category = kernel_category(name)
        categories[category] = categories.get(category, 0.0) + ms
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:25]
    # The steps run back to back, as in the pipelined measurement: time between the first kernel's
    # start and the last one's end in which no kernel runs is the GPU left idle (launch gaps, waits
    # on the CPU), the part of a step that faster kernels cannot win back.
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
    return {"cuda_ms_per_step": sum(per_step.values()), "gpu_idle_ms_per_step": idle_time(spans) / steps / 1e3,
            "kernels_per_step": len(spans) / steps,
            "categories_ms": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": [[name[:160], ms] for name, ms in top]}


def time_training(model: torch.nn.Module, hf: bool, batch: int, seq_len: int, vocab: int, steps: int,
                  warmup: int, compile_mode: str | None, profile_steps: int = 0) -> dict:
    model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model, mode=compile_mode) if compile_mode else model
    g = torch.Generator(device="cuda").manual_seed(0)
    # contiguous inputs and targets, as a data loader yields them (nanoGPT's loss .view()s its targets)
    data = [torch.randint(0, vocab, (batch, seq_len + 1), device="cuda", generator=g) for _ in range(4)]
    data = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in data]

    def step(i):
        inputs, targets = data[i % len(data)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if hf:  # transformers shifts the labels itself
                loss = fwd(input_ids=inputs, labels=inputs).loss
            else:
                _, loss = fwd(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(model, "after_optimizer_step"):  # ours: StoryKimi's bias update and QK-clip, as the trainer
            model.after_optimizer_step()
        return loss

    # the peak counts the warmup: CUDA graphs are recorded there, into memory that replays reuse
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup):
        loss = step(i)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    med = times[len(times) // 2]
    # As the trainer runs: no synchronize between steps, so the CPU launches ahead of the GPU.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        loss = step(i)
    end.record()
    torch.cuda.synchronize()
    pipelined_ms = start.elapsed_time(end) / steps
    result = {"step_ms": med, "step_ms_spread": [times[0], times[-1]], "tok_per_s": batch * seq_len / med * 1e3,
              "pipelined_step_ms": pipelined_ms, "pipelined_tok_per_s": batch * seq_len / pipelined_ms * 1e3,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "warmup_s": warm_s, "loss": loss.item()}
    if profile_steps:
        result["profile"] = kernel_profile(step, profile_steps)
    return result


def measure_pair(name: str, args) -> dict:
    pair = pairs()[name]
    batch = args.tokens_per_step // pair.seq_len
    torch.manual_seed(0)
    model = pair.build_ours()
    cfg = model.config
    flops_tok = model.flops_per_token(pair.seq_len)
    row = {"model": name, "seq_len": pair.seq_len, "batch": batch, "params_M": model.num_params() / 1e6}

    def measure(m: torch.nn.Module, hf: bool, compile_mode: str) -> dict:
        """Time one side; MFU counts our model's FLOPs, so every side is judged on the same work."""
        result = time_training(m, hf, batch, pair.seq_len, cfg.vocab_size, args.steps, args.warmup,
                               compile_mode, args.profile)
        result["mfu"] = flops_tok * result["tok_per_s"] / (args.peak_tflops * 1e12)
        return result

    row["ours"] = measure(model, False, args.ours_compile_mode)
    del model
    free()
    if pair.build_baseline is not None and not args.no_baseline:
        row["baseline_name"] = pair.baseline_name
        row["baseline"] = measure(pair.build_baseline(cfg), True, args.compile_mode)
        row["ratio"] = row["ours"]["tok_per_s"] / row["baseline"]["tok_per_s"]
        row["pipelined_ratio"] = row["ours"]["pipelined_tok_per_s"] / row["baseline"]["pipelined_tok_per_s"]
        free()
    if args.nanogpt_dir and name == "SmolTransformer-124M":
        row["nanogpt"] = measure(nanogpt_like(args.nanogpt_dir, pair.seq_len, cfg.vocab_size), False, args.compile_mode)
        row["ratio_vs_nanogpt"] = row["ours"]["tok_per_s"] / row["nanogpt"]["tok_per_s"]
        row["pipelined_ratio_vs_nanogpt"] = (row["ours"]["pipelined_tok_per_s"]
                                             / row["nanogpt"]["pipelined_tok_per_s"])
        free()
    print(json.dumps(row), flush=True)
    return row


def print_table(results: list[dict]) -> None:
    """Synchronized steps first (tok/s, MFU, ratio), then the pipelined ratio."""
    print(f"\n{'model':<22}{'T':>6}{'ours tok/s':>13}{'MFU':>7}{'GiB':>7}   {'baseline':<22}{'tok/s':>10}"
          f"{'GiB':>7}{'ratio':>8}{'pipelined':>11}")

    def against(name: str, side: dict, ratio: float, pipelined_ratio: float) -> str:
        return f"   {name:<22}{side['tok_per_s']:>10,.0f}{side['peak_gib']:>7.1f}{ratio:>8.2f}x{pipelined_ratio:>10.2f}x"

    for r in results:
        o, b = r["ours"], r.get("baseline")
        line = f"{r['model']:<22}{r['seq_len']:>6}{o['tok_per_s']:>13,.0f}{o['mfu']:>7.1%}{o['peak_gib']:>7.1f}"
        if b:
            line += against(r["baseline_name"], b, r["ratio"], r["pipelined_ratio"])
        print(line)
        if "nanogpt" in r:
            print(f"{'':<55}" + against("nanoGPT GPT", r["nanogpt"], r["ratio_vs_nanogpt"],
                                         r["pipelined_ratio_vs_nanogpt"]))


def profile_summary(prof: dict) -> str:
    """One line of a kernel_profile: CUDA time per step by category, then the GPU's idle time."""
    cats = ", ".join(f"{c} {ms:.1f}" for c, ms in prof["categories_ms"].items())
    return (f"{prof['cuda_ms_per_step']:.1f} ms CUDA/step = {cats}; GPU idle {prof['gpu_idle_ms_per_step']:.2f} "
            f"ms/step between {prof['kernels_per_step']:.0f} kernels")


def print_profiles(results: list[dict]) -> None:
    for r in results:
        for side in ("ours", "baseline", "nanogpt"):
            prof = r.get(side, {}).get("profile")
            if prof:
                print(f"{r['model']} {side}: {profile_summary(prof)}")
                for name, ms in prof["top_kernels_ms"][:12]:
                    print(f"    {ms:6.2f} ms  {name[:110]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(pairs()))
    p.add_argument("--tokens_per_step", type=int, default=32768)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, default=989.5)
    p.add_argument("--compile_mode", default="default", help="torch.compile mode of the baselines "
                   "(default, reduce-overhead, max-autotune-no-cudagraphs, ...); '' = eager")
    p.add_argument("--ours_compile_mode", default="reduce-overhead", help="torch.compile mode of ours; the "
                   "default is the trainer's at one micro-batch per step on one GPU; 'default' = --cuda_graphs false")
    p.add_argument("--no_baseline", action="store_true")
    p.add_argument("--nanogpt_dir", default="", help="A checkout of karpathy/nanoGPT: adds its GPT (bias=True, "
                   "as it ships) beside SmolTransformer-124M.")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="After timing, profile this many steps of each side and print CUDA time per kernel category.")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    for name in args.models:
        try:
            results.append(measure_pair(name, args))
        except Exception as e:  # one model failing (e.g. a compile error) must not hide the others
            print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            free()
    print_table(results)
    print_profiles(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
