"""Speed of the GPU layers and kernels, each against what it replaces (CUDA only; their results are
checked by `python -m pytest -m cuda`):

- moe:    the MoE layer's forward + backward, per-expert loop vs grouped GEMM, eager vs compiled
          (16,384 tokens, d=512, 8 experts x 1024, top-2, bf16 autocast);
- window: sliding-window attention, FlexAttention vs SDPA with a boolean mask vs plain causal SDPA;
- rope:   the fused q/k/v RoPE kernel's bandwidth, each way;
- loss:   the head + cross-entropy kernel's bandwidth per launch configuration, and the fused op's
          forward + backward time and peak memory against compiled F.linear + F.cross_entropy.

    python -m benchmarks.layer_speed                     # all four, ~1 min on an H100
    python -m benchmarks.layer_speed --parts loss rope --json layer_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

PARTS = ("moe", "window", "rope", "loss")


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_moe(tokens: int) -> dict:
    """The MoE layer (8 experts x 1024, top-2, d=512) against what bounds it: a dense SwiGLU of the same
    active FLOPs (hidden 2048), and the two grouped matmuls alone on rows already in expert order.
    TFLOP/s count the expert matmuls' 6 x tokens x k x 3 x d x hidden, forward and backward."""
    import torch.nn.functional as F

    from smolhub.layers import GroupedExperts, MoEFeedForward, SoftmaxTopKRouter
    from smolhub.layers.moe import _grouped_mm

    d, hidden, E, k = 512, 1024, 8, 2
    flops = 6 * tokens * k * 3 * d * hidden
    x = torch.randn(tokens, d, device="cuda", requires_grad=True)
    g = torch.randn(tokens, d, device="cuda")
    rows = {}

    def record(name: str, step) -> None:
        ms = cuda_time_ms(step)
        rows[f"{name}: ms"] = ms
        rows[f"{name}: TFLOP/s"] = flops / ms / 1e9

    for grouped in (False, True):
        for compiled in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            layer = MoEFeedForward(SoftmaxTopKRouter(d, E, k), GroupedExperts(E, d, hidden, use_grouped_mm=grouped))
            layer = layer.cuda().train()
            fn = torch.compile(layer, fullgraph=grouped) if compiled else layer

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = fn(x)
                    loss = (y.float() * g).sum() + layer.aux["balance"] + layer.aux["z"]
                loss.backward()

            record(f"{'grouped' if grouped else 'loop'}, {'compiled' if compiled else 'eager'}", step)

    torch._dynamo.reset()
    gate_up = torch.randn(d, 2 * k * hidden, device="cuda", requires_grad=True)
    down = torch.randn(k * hidden, d, device="cuda", requires_grad=True)

    @torch.compile
    def dense(x):
        gate, up = (x @ gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ down

    def dense_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (dense(x).float() * g).sum()
        loss.backward()

    record(f"dense SwiGLU {k * hidden} (equal FLOPs), compiled", dense_step)

    w1 = torch.randn(E, d, 2 * hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(E, hidden, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sorted_rows = torch.randn(tokens * k, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (tokens * k // E)
    grad = torch.randn(tokens * k, d, device="cuda", dtype=torch.bfloat16)

    @torch.compile
    def matmuls(rows):
        gate, up = _grouped_mm(rows, w1, offs=offsets).chunk(2, dim=-1)
        return _grouped_mm(F.silu(gate) * up, w2, offs=offsets)

    def matmuls_step():
        matmuls(sorted_rows).backward(grad)

    record("grouped matmuls + SwiGLU alone (sorted, balanced rows), compiled", matmuls_step)
    return rows


def time_window(batch: int, seq: int, window: int) -> dict:
    from smolhub.layers.attention import attend

    q = torch.randn(batch, 8, seq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, 2, seq, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
    g = torch.randn_like(q)
    modes = {"flex": dict(window=window), "sdpa-mask": dict(window=window, key_pos=torch.arange(seq, device="cuda")),
             "causal (no window)": {}}
    return {f"{mode}: ms / fwd+bwd": cuda_time_ms(lambda: (attend(q, k, v, 0, **kwargs) * g).sum().backward())
            for mode, kwargs in modes.items()}


def time_rope(batch: int) -> dict:
    from smolhub.kernels.rotary import rotary_qkv, rotary_qkv_backward
    from smolhub.layers import RotaryEmbedding

    T, H, KV, D = 512, 12, 4, 64
    cos, sin = RotaryEmbedding(D, T).cuda()(0, T)
    qkv = torch.randn(batch, T, (H + 2 * KV) * D, device="cuda", dtype=torch.bfloat16)
    grads = [torch.randn_like(t) for t in rotary_qkv(qkv, cos, sin, H, KV)]
    gb = 2 * qkv.numel() * qkv.element_size() / 1e9  # each way: read once, write once
    forward = cuda_time_ms(lambda: rotary_qkv(qkv, cos, sin, H, KV))
    backward = cuda_time_ms(lambda: rotary_qkv_backward(*grads, cos, sin))
    return {"forward: ms": forward, "forward: TB/s": gb / forward,
            "backward: ms": backward, "backward: TB/s": gb / backward}


def time_loss(tokens: int, dim: int, vocab: int) -> dict:
    from smolhub.kernels.cross_entropy import cross_entropy_rows_
    from smolhub.loss import linear_cross_entropy, reference_linear_cross_entropy

    rows = {}
    logits = torch.randn(tokens, vocab, device="cuda").bfloat16()
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    gb = 2 * logits.numel() * logits.element_size() / 1e9  # read once, overwritten once
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            ms = cuda_time_ms(lambda: cross_entropy_rows_(logits, targets, -100, True, block, warps))
            rows[f"kernel BLOCK={block} num_warps={warps}: TB/s"] = gb / ms
    rows["kernel, default launch configuration: TB/s"] = gb / cuda_time_ms(
        lambda: cross_entropy_rows_(logits, targets, -100, True))
    del logits

    hidden = torch.randn(tokens, dim, device="cuda", requires_grad=True)
    weight = (torch.randn(vocab, dim, device="cuda") * 0.02).requires_grad_()

    def step(fn):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets)
        loss.backward()

    variants = {"F.linear + F.cross_entropy, compiled": torch.compile(reference_linear_cross_entropy),
                "fused, eager": linear_cross_entropy,
                "fused, compiled": torch.compile(linear_cross_entropy, fullgraph=True)}
    for label, fn in variants.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        rows[f"{label}: fwd+bwd ms"] = cuda_time_ms(lambda: step(fn))
        rows[f"{label}: peak GiB above inputs"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every token count (0.1: a quick run)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.layer_speed needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True

    def n(tokens: int) -> int:
        return max(1, int(tokens * args.scale))

    runs = {"moe": lambda: time_moe(n(16384)), "window": lambda: time_window(n(16), 1024, 512),
            "rope": lambda: time_rope(n(64)), "loss": lambda: time_loss(n(32768), 768, 50304)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    for part in args.parts:
        results[part] = runs[part]()
        for name, value in results[part].items():
            print(f"  {part:<7}{name:<66}{value:10.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
