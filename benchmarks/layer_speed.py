"""Speed of the GPU layers and kernels, each against what it replaces (CUDA only; their results are
checked by `python -m pytest -m cuda`):

- moe:    the MoE layer's forward + backward, per-expert loop vs grouped GEMM vs the Triton kernels
          (smolhub.kernels.moe), eager vs compiled (16,384 tokens, d=512, 8 experts x 1024, top-2,
          bf16 autocast);
- moe_tune: each of the Triton MoE kernels' launches alone, TFLOP/s for each candidate launch
          configuration (the best go into smolhub.kernels.moe's CONFIGS);
- window: sliding-window attention, FlexAttention vs SDPA with a boolean mask vs plain causal SDPA;
- rope:   the fused q/k/v RoPE kernel's bandwidth, each way;
- loss:   the head + cross-entropy kernel's bandwidth per launch configuration, and the fused op's
          forward + backward time and peak memory against compiled F.linear + F.cross_entropy.

    python -m benchmarks.layer_speed                     # all of them, a few minutes on an H100
    python -m benchmarks.layer_speed --parts loss rope --json layer_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

PARTS = ("moe", "moe_tune", "window", "rope", "loss")


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

    for kernel in ("loop", "grouped_mm", "triton"):
        for compiled in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            layer = MoEFeedForward(SoftmaxTopKRouter(d, E, k), GroupedExperts(E, d, hidden, kernel=kernel))
            layer = layer.cuda().train()
            fn = torch.compile(layer, fullgraph=kernel != "loop") if compiled else layer

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = fn(x)
                    loss = (y.float() * g).sum() + layer.aux["balance"] + layer.aux["z"]
                loss.backward()

            record(f"{kernel}, {'compiled' if compiled else 'eager'}", step)

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


# The last four are for the SwiGLU backward, whose loop is only d = 512 deep: fewer stages leave shared
# memory for more programs per SM to overlap one's epilogue with another's loop, a deeper K step halves the loop.
MOE_ROW_CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 64, 64, 8, 3),
                      (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 3), (128, 128, 32, 8, 4),
                      (64, 64, 64, 4, 2), (64, 64, 128, 4, 2), (64, 64, 128, 4, 3), (64, 128, 64, 8, 2)]
MOE_WEIGHT_GRAD_CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                              (128, 256, 64, 8, 3), (64, 64, 128, 4, 3)]


def tune_moe_kernels(tokens: int) -> dict:
    """TFLOP/s of each launch of smolhub.kernels.moe alone, for each candidate (BLOCK_M or P, BLOCK_N or Q,
    BLOCK_K, num_warps, num_stages), on balanced random routing at the MoE part's sizes, bf16."""
    from smolhub.kernels import moe as kernels

    d, hidden, E, k = 512, 1024, 8, 2
    M = tokens * k
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, grad_out = torch.randn(tokens, d, **bf16), torch.randn(M, d, **bf16)
    gate_up, down = torch.randn(E, d, 2 * hidden, **bf16) * 0.05, torch.randn(E, hidden, d, **bf16) * 0.05
    expert_idx = torch.rand(tokens, E, device="cuda").topk(k, dim=-1).indices
    order = expert_idx.reshape(-1).argsort(stable=True).to(torch.int32)
    ends = torch.bincount(expert_idx.reshape(-1), minlength=E).cumsum(0).to(torch.int32)
    token_of = order // k
    pre, act = torch.empty(M, 2 * hidden, **bf16), torch.empty(M, hidden, **bf16)
    out, grad_pre, grad_rows = torch.empty(M, d, **bf16), torch.empty(M, 2 * hidden, **bf16), torch.empty(M, d, **bf16)
    grad_gate_up, grad_down = torch.empty_like(gate_up), torch.empty_like(down)
    launches = {  # name: (the launch, its FLOPs, its key in kernels.CONFIGS, the candidates)
        "gate_up, SwiGLU epilogue (x gathered)": (lambda: kernels._rows(
            x, token_of, gate_up, False, ends, kernels.SWIGLU, act, pre=pre), 2 * M * d * 2 * hidden,
            kernels.SWIGLU, MOE_ROW_CANDIDATES),
        "down (out scattered)": (lambda: kernels._rows(
            act, None, down, False, ends, kernels.PLAIN, out, out_rows=order), 2 * M * hidden * d,
            kernels.PLAIN, MOE_ROW_CANDIDATES),
        "grad through down, SwiGLU backward (grad gathered)": (lambda: kernels._rows(
            grad_out, order, down, True, ends, kernels.SWIGLU_BACKWARD, grad_pre, pre=pre), 2 * M * d * hidden,
            kernels.SWIGLU_BACKWARD, MOE_ROW_CANDIDATES),
        "grad x (scattered)": (lambda: kernels._rows(
            grad_pre, None, gate_up, True, ends, kernels.PLAIN, grad_rows, out_rows=order), 2 * M * 2 * hidden * d,
            kernels.PLAIN, MOE_ROW_CANDIDATES),
        "grad down (grad gathered)": (lambda: kernels._weight_grad(act, None, grad_out, order, ends, grad_down),
                                      2 * M * hidden * d, kernels.WEIGHT_GRAD, MOE_WEIGHT_GRAD_CANDIDATES),
        "grad gate_up (x gathered)": (lambda: kernels._weight_grad(x, token_of, grad_pre, None, ends, grad_gate_up),
                                      2 * M * d * 2 * hidden, kernels.WEIGHT_GRAD, MOE_WEIGHT_GRAD_CANDIDATES),
    }
    rows = {}
    for name, (launch, flops, key, candidates) in launches.items():
        default = kernels.CONFIGS[key]
        for config in dict.fromkeys([default] + candidates):
            kernels.CONFIGS[key] = config
            label = f"{name} {config}{' (default)' if config == default else ''}: TFLOP/s"
            try:
                rows[label] = flops / cuda_time_ms(launch) / 1e9
            except Exception as e:  # a configuration over the shared memory or register budget
                print(f"  {label}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        kernels.CONFIGS[key] = default
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

    runs = {"moe": lambda: time_moe(n(16384)), "moe_tune": lambda: tune_moe_kernels(n(32768)),
            "window": lambda: time_window(n(16), 1024, 512),
            "rope": lambda: time_rope(n(64)), "loss": lambda: time_loss(n(32768), 768, 50304)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    results = {}
    for part in args.parts:
        results[part] = runs[part]()
        for name, value in results[part].items():
            print(f"  {part:<9}{name:<90}{value:10.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, **results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
