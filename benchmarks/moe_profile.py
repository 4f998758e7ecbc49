"""Where the milliseconds of an MoE model's training step go: router, top-k, permutation, grouped
matmuls, combine, balancing losses, shared expert, attention, the dense rest, the optimizer.

One training step as the trainer takes it (forward and backward under bf16 autocast on CUDA, the
auxiliary losses, gradient clipping, the recipe's optimizer, the model's after-step update) on
random tokens, at the model's default config (or --preset), profiled with torch.profiler over
--steps steps after --warmup. Time is device (kernel) time on CUDA and CPU time on CPU.

How a row is derived (eager). The benchmark, and nothing in the model, labels regions with
torch.profiler.record_function: forward hooks on submodules (attention, the norms, the token
embedding, each MoE layer, its router, its experts, StoryKimi's shared expert and dense SwiGLU),
and for the parts inside MoE code that are functions rather than modules, the functions themselves,
replaced for the duration of the profile by labelled wrappers (top_k_indices, the balancing losses,
permute_rows and inverse_permutation, the grouped-mm kernel, the experts' SwiGLU). Every operator's
self time (its kernels' time less that of the operators it calls) goes to the innermost label
around it; a backward operator goes to the label of the forward operator that created its autograd
node (matched by sequence number). So nested rows never double count and the rows sum to the
profiled time. Then:
  router          the router module less top-k and balancing: scores (gate matmul, softmax/sigmoid,
                  noise), weight renormalisation, the per-expert counts
  top-k           top_k_indices
  permutation     the experts module's own ops outside the matmuls and the combine: sort of the
                  assignments, offsets, repeat_interleave, permute_rows there and back
  grouped matmuls the two grouped-mm (or per-expert loop) matmuls, the SwiGLU between them and the
                  casts of inputs and weights to the compute dtype; with --experts_kernel triton, the
                  Triton kernels, which also do the gathers and scatters of the permutation
  combine         the experts' final weighting and sum over the k slots, and what the MoE layer does
                  around its router and experts (reshapes, adding the shared expert, dropout)
  balancing       switch/z-loss/sequence balance loss, StoryKimi's load counts, model.aux_loss() and
                  the after-step bias update
  shared expert   StoryKimi's always-on SwiGLU
  dense FFN       StoryKimi's first_k_dense SwiGLU blocks
  attention, norms, embedding, head + loss (the fused linear cross-entropy), optimizer (clipping,
  step, zero_grad)
  other           everything else: residual adds, RoPE tables, the loss's backward seed, gradient
                  accumulation into .grad
With --compile, inductor fuses across these regions and the labels do not survive, so the table is
by kernel name pattern instead (it says so).

    python -m benchmarks.moe_profile --model SmolMixtral --batch 32 --seq_len 1024 --json out.json
    python -m benchmarks.moe_profile --model SmolMixtral --batch 32 --seq_len 1024 --compile --experts_kernel triton
    python -m benchmarks.moe_profile --model SmolMixtral --device cpu --preset tiny
"""
from __future__ import annotations

import argparse
import contextlib
import re
import time

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.train_throughput import TRITON_MOE_KERNELS, kernel_category
from smolhub.config import EXPERTS_KERNELS
from smolhub.files import write_json

MOE_MODELS = ("SmolMixtral", "StoryMixtral", "StoryKimi")
PREFIX = "moe_profile::"
PARTS = ("router", "top-k", "permutation", "grouped matmuls", "combine", "balancing", "shared expert", "dense FFN",
         "attention", "norms", "embedding", "head + loss", "optimizer", "other")
# Ops left directly in the experts module (outside the labelled functions) that weight and sum the
# k expert outputs; casts there feed the matmuls; the rest (sort, offsets, repeat_interleave) permutes.
COMBINE_OPS = re.compile(r"^aten::(mul|sum)$|: (Mul|Sum)Backward\d$")
CAST_OPS = re.compile(r"^aten::(to|_to_copy|copy_)$|: ToCopyBackward\d$")
# Kernel-name patterns of the MoE layer, tried before train_throughput's KERNEL_CATEGORIES.
MOE_KERNEL_CATEGORIES = [
    # CUTLASS's grouped GEMM behind torch's grouped_mm is named for its GroupProblemShape template
    ("grouped matmuls", r"grouped_mm|grouped_gemm|_grouped|GroupProblemShape"),
    ("grouped matmuls", TRITON_MOE_KERNELS),
    ("top-k", r"topk"),
    ("sort/permutation", r"sort|radix|scatter|gather|index|cumsum|repeat_interleave"),
    ("matmul", r"^aten::(mm|bmm|addmm|matmul)$"),  # on CPU the table is of operators, not kernels
]


def kernel_group(name: str) -> str:
    return next((cat for cat, pattern in MOE_KERNEL_CATEGORIES if re.search(pattern, name, re.IGNORECASE)),
                None) or kernel_category(name)


def build(name: str, preset: str, vocab_size: int, device: torch.device, experts_kernel: str = "auto"):
    """The model at its default config (or preset), and the TrainConfig its trainer would use."""
    from smolhub.modeling import model_class
    from smolhub.train import parse_train_flags

    cls = model_class(name)
    mcfg, cfg = parse_train_flags(cls, (["--preset", preset] if preset else []) + ["--experts_kernel", experts_kernel])
    # 32,000 is the throughput benchmark's vocabulary for these models; a preset's own BPE size otherwise
    mcfg.vocab_size = vocab_size or (cfg.bpe_vocab_size if preset else 32000)
    torch.manual_seed(0)
    return cls(mcfg).to(device).train(), cfg


class Labeller:
    """Labels the model's parts with record_function while active: hooks on modules, labelled
    wrappers around the MoE functions (module globals, restored on exit)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stack: list[record_function] = []
        self.handles = []
        self.patched: list[tuple[object, str, object]] = []
        # the parts this model has: those its hooks and wrappers label, and the ones every step has
        self.parts = {"permutation", "combine", "grouped matmuls", "optimizer", "other"}

    def hook(self, module: nn.Module, part: str) -> None:
        def enter(*_):
            region = record_function(PREFIX + part)
            region.__enter__()
            self.stack.append(region)

        def leave(*_):
            self.stack.pop().__exit__(None, None, None)

        self.parts.add(part)
        self.handles += [module.register_forward_pre_hook(enter),
                         module.register_forward_hook(leave, always_call=True)]

    def wrap(self, owner, attr: str, part: str) -> None:
        """Replace owner.attr (a module global, or a method of this model instance) by a labelled call."""
        original = getattr(owner, attr)

        def labelled(*args, **kwargs):
            with record_function(PREFIX + part):
                return original(*args, **kwargs)

        self.parts.add(part)
        self.patched.append((owner, attr, vars(owner).get(attr)))
        setattr(owner, attr, labelled)

    def __enter__(self):
        import smolhub.layers.moe as moe
        from smolhub.layers import (
            CausalSelfAttention,
            GroupedExperts,
            LayerNorm,
            MoEFeedForward,
            RMSNorm,
            SwiGLU,
        )

        kimi = None
        if self.model.architecture == "StoryKimi":
            import StoryKimi.attention
            import StoryKimi.moe as kimi
        attention = (CausalSelfAttention,) + ((StoryKimi.attention.MultiHeadLatentAttention,) if kimi else ())
        moe_layers = (MoEFeedForward,) + ((kimi.DeepSeekMoE,) if kimi else ())
        shared = {id(getattr(m, "shared", None)) for m in self.model.modules() if isinstance(m, moe_layers)}
        for m in self.model.modules():
            if isinstance(m, attention):
                self.hook(m, "attention")
            elif isinstance(m, (LayerNorm, RMSNorm)):
                self.hook(m, "norms")
            elif m is self.model.tok_emb:
                self.hook(m, "embedding")
            elif isinstance(m, moe_layers):
                self.hook(m, "combine")
                self.hook(m.router, "router")
                self.hook(m.experts, "experts")
                if getattr(m, "shared", None) is not None:
                    self.hook(m.shared, "shared expert")
            elif isinstance(m, GroupedExperts):
                self.wrap(m, "_swiglu", "grouped matmuls")
            elif isinstance(m, SwiGLU) and id(m) not in shared:
                self.hook(m, "dense FFN")
        for fn, part in [("top_k_indices", "top-k"), ("switch_balance_loss", "balancing"),
                         ("router_z_loss", "balancing"), ("permute_rows", "permutation"),
                         ("inverse_permutation", "permutation"), ("_grouped_mm", "grouped matmuls"),
                         ("_scattered_experts_op", "grouped matmuls")]:
            self.wrap(moe, fn, part)
        if kimi:
            for fn, part in [("top_k_indices", "top-k"), ("sequence_balance_loss", "balancing"),
                             ("expert_counts", "balancing")]:
                self.wrap(kimi, fn, part)
        self.wrap(self.model, "logits_and_loss", "head + loss")
        self.wrap(self.model, "aux_loss", "balancing")
        self.wrap(self.model, "after_optimizer_step", "balancing")
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for owner, attr, own in reversed(self.patched):
            if own is None:  # a method of the instance's class: drop the instance's override
                delattr(owner, attr)
            else:
                setattr(owner, attr, own)
        return False


def make_step(model: nn.Module, cfg, device: torch.device, batch: int, seq_len: int, compile_model: bool):
    """The trainer's step at one micro-batch: objective (loss + aux), backward, clip, optimizer, after-step."""
    from smolhub.objectives import NextTokenPrediction
    from smolhub.optim import build_optimizer

    optimizer = build_optimizer(model, cfg, device.type)
    objective = NextTokenPrediction(model)
    step_model = torch.compile(model) if compile_model else model
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device, generator=g)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step():
        with amp:
            loss, _ = objective(step_model, (inputs, targets))
        loss.backward()
        with record_function(PREFIX + "optimizer"):
            optimizer_step()
        model.after_optimizer_step()
        return loss

    return step


def innermost_label(event, forward_part: dict[int, str]) -> str | None:
    """The label of the innermost labelled region around an operator event, or for backward work the
    label of the forward operator that made its autograd node."""
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX):]
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr >= 0:
            return forward_part.get(e.sequence_nr)
        e = e.cpu_parent
    return None


def outer_op(event) -> str:
    """The outermost operator around an event below any labelled region: the op the experts module
    called itself, or for backward work its autograd node (autograd::engine::evaluate_function: ...)."""
    e = event
    while e.cpu_parent is not None and not e.cpu_parent.name.startswith(PREFIX):
        e = e.cpu_parent
    return e.name


def attribute(events, cuda: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Self time per part (us, over all profiled steps) and per kernel (CUDA) or operator (CPU) name."""
    ops = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: e.time_range.start)
    forward_part: dict[int, str] = {}
    for e in ops:  # in start order: a node's sequence number belongs to the last op that peeked it
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine"):
            label = innermost_label(e, {})
            if label is not None:
                forward_part[e.sequence_nr] = label
    # record_function regions (ours, and torch's own such as Optimizer.step#AdamW.step) also appear on
    # the GPU's timeline as annotations spanning their kernels: time of their own there would count twice
    annotations = {e.name for e in events if e.device_type.name == "CUDA" and e.is_user_annotation}
    parts = dict.fromkeys(PARTS, 0.0)
    for e in ops:
        if e.name.startswith(PREFIX):
            continue
        if cuda:
            t = e.self_device_time_total - sum(k.duration for k in e.kernels if k.name in annotations)
        else:
            t = e.self_cpu_time_total
        if t <= 0:
            continue
        label = innermost_label(e, forward_part) or "other"
        if label == "experts":  # the experts module's own ops: see the module docstring
            op = outer_op(e)
            label = "combine" if COMBINE_OPS.search(op) else "grouped matmuls" if CAST_OPS.search(op) else "permutation"
        parts[label] += t
    by_name: dict[str, float] = {}
    for e in events:
        if e.name.startswith(PREFIX) or (cuda and e.is_user_annotation):
            continue
        if cuda and e.device_type.name == "CUDA":
            by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total
        elif not cuda and e.device_type.name == "CPU":
            by_name[e.name] = by_name.get(e.name, 0.0) + e.self_cpu_time_total
    return parts, by_name


def run(args) -> dict:
    from smolhub.errors import UserError

    if args.model not in MOE_MODELS:
        raise UserError(f"--model must be one of {', '.join(MOE_MODELS)}, got {args.model!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA device here: pass --device cpu (with --preset tiny for a quick run)")
    torch.backends.cuda.matmul.allow_tf32 = True
    model, cfg = build(args.model, args.preset, args.vocab_size, device, args.experts_kernel)
    seq_len = args.seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise UserError(f"--seq_len {seq_len} exceeds {args.model}'s block_size {model.config.block_size}")
    if device.type == "cpu" and args.experts_kernel == "auto":
        from smolhub.layers import GroupedExperts

        # the GPU's path (grouped_mm runs on CPU in fp32): the profile is of what an H100 runs
        for m in model.modules():
            if isinstance(m, GroupedExperts):
                m.kernel = "grouped_mm"
    step = make_step(model, cfg, device, args.batch, seq_len, args.compile)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):  # unprofiled: the step time and MFU
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    step_ms = sorted(times)[len(times) // 2]
    labels = contextlib.nullcontext() if args.compile else Labeller(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labels, profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        profiled_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    cuda = device.type == "cuda"
    events = prof.events()
    parts_us, by_name_us = attribute(events, cuda)
    per_step = 1e3 * args.steps
    kernels_ms = {k: v / per_step for k, v in by_name_us.items()}
    groups: dict[str, float] = {}
    for name, ms in kernels_ms.items():
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + ms
    tokens = args.batch * seq_len
    peak = args.peak_tflops or (989.5 if cuda else 0.0)
    mfu = model.flops_per_token(seq_len) * tokens / (step_ms / 1e3) / (peak * 1e12) if peak else None
    return {
        "model": args.model, "preset": args.preset, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": args.batch, "seq_len": seq_len, "steps": args.steps, "compiled": args.compile,
        "time": "device (kernel) time" if cuda else "CPU time", "step_ms": step_ms,
        "profiled_step_ms": profiled_ms, "kernels_ms": sum(kernels_ms.values()),
        "parts_ms": None if args.compile else {k: v / per_step for k, v in parts_us.items() if k in labels.parts},
        "kernel_groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": sorted(kernels_ms.items(), key=lambda kv: -kv[1])[:15],
        "params_M": model.num_params() / 1e6, "active_params_M": model.num_active_params() / 1e6,
        "flops_per_token": model.flops_per_token(seq_len), "tok_per_s": tokens / step_ms * 1e3, "mfu": mfu,
        "loss": loss.item(),
    }


def report(r: dict) -> str:
    unit, prof = r["time"], r["profiled_step_ms"]
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a (no peak FLOPs on a CPU: --peak_tflops)"
    lines = [f"{r['model']}{' (' + r['preset'] + ')' if r['preset'] else ''} on {r['device']}: batch {r['batch']} x "
             f"{r['seq_len']} tokens, {r['params_M']:.1f}M params / {r['active_params_M']:.1f}M active, "
             f"{'compiled' if r['compiled'] else 'eager'}",
             f"step {r['step_ms']:.2f} ms (median of {r['steps']} synchronized steps, unprofiled), "
             f"{r['tok_per_s']:,.0f} tok/s, MFU {mfu}",
             f"profiled step {prof:.2f} ms (wall, {r['steps']} steps under the profiler); shares below are of it", ""]
    if r["parts_ms"] is not None:
        total = sum(r["parts_ms"].values())
        lines += [f"| part | ms per step ({unit}) | share of the step |", "|---|---:|---:|"]
        lines += [f"| {part} | {ms:.3f} | {ms / prof:.1%} |" for part, ms in r["parts_ms"].items()]
        lines += [f"| **sum of parts** | **{total:.3f}** | **{total / prof:.1%}** |", "",
                  f"All {'kernels' if 'device' in unit else 'ops'} together: {r['kernels_ms']:.3f} ms per step; the "
                  f"rest of the profiled step ({prof - total:.3f} ms) is "
                  + ("GPU idle (launch gaps, waits on the CPU)." if "device" in unit else "Python between ops."), ""]
    else:
        lines += ["Compiled: inductor fuses across the model's parts, so record_function regions do not survive;",
                  "the table below groups the kernels by name pattern instead.", ""]
    lines += [f"| kernel group | ms per step ({unit}) | share of the step |", "|---|---:|---:|"]
    lines += [f"| {g} | {ms:.3f} | {ms / prof:.1%} |" for g, ms in r["kernel_groups_ms"].items()]
    lines += ["", f"Top 15 {'kernels' if 'device' in unit else 'operators (self CPU time)'}, ms per step:"]
    lines += [f"  {ms:8.3f}  {name[:120]}" for name, ms in r["top_kernels_ms"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=f"One of {', '.join(MOE_MODELS)}.")
    p.add_argument("--device", default="cuda", help="cuda (device time per kernel) or cpu (CPU time per op).")
    p.add_argument("--preset", default="", help="A preset of the model's config.py (tiny); default: its full config.")
    p.add_argument("--batch", type=int, default=8, help="Sequences per step.")
    p.add_argument("--seq_len", type=int, default=0, help="Tokens per sequence; 0 = the model's block_size.")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="0 = 32,000 (the throughput benchmark's), or the preset's bpe_vocab_size.")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (kernel-group table only).")
    p.add_argument("--experts_kernel", default="auto", choices=EXPERTS_KERNELS,
                   help="The experts' path (the models' --experts_kernel); auto profiles grouped_mm on CPU too.")
    p.add_argument("--steps", type=int, default=5, help="Profiled steps.")
    p.add_argument("--warmup", type=int, default=2, help="Steps before profiling (compilation happens here).")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="Peak for MFU; 0 = H100 bf16 (989.5) on CUDA.")
    p.add_argument("--json", default="", help="Also write the result here.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(report(result), flush=True)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
