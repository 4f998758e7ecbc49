"""Check the GPU-only code paths on a CUDA GPU (a script for an H100, not a test): the MoE and
sliding-window layers, and CUDA-graph decoding.

    PYTHONPATH=. python benchmarks/check_gpu.py             # layers only, ~2 min
    PYTHONPATH=. python benchmarks/check_gpu.py --models    # + decoding, and both MoE models under torch.compile
    PYTHONPATH=. python benchmarks/check_gpu.py --decoding  # decoding of all five models only, ~2 min
    PYTHONPATH=. python benchmarks/check_gpu.py --trainer input.txt  # each model's trainer, CUDA graphs on/off

1. grouped == loop: the grouped-GEMM experts against the per-expert loop, forward and every
   gradient, in bf16 autocast over fp32 weights (the training setting);
2. graph breaks: torch._dynamo.explain and torch.compile(fullgraph=True) on the MoE layer in
   training mode (router, aux losses, grouped experts), and the compiled result against eager;
3. speed: forward + backward of the MoE layer, loop vs grouped, eager vs compiled;
4. sliding window: FlexAttention (the CUDA training path) against SDPA with a boolean mask, and
   their speed next to plain causal SDPA;
5. with --models: the CUDA-graph decoder of all five models against eager cached decoding, and
   graph breaks and compiled training-step throughput of SmolMixtral and StoryMixtral
   (--decoding: the decoder check alone);
6. the fused head + cross-entropy (smolhub/loss.py): its Triton kernel against the torch path,
   the loss and gradients against F.linear + F.cross_entropy in fp32, compiled against eager, the
   kernel's bandwidth per launch configuration, and forward + backward time and peak memory against
   compiled F.linear + F.cross_entropy(logits.float()); and the fused q/k/v RoPE op's Triton kernel
   against its torch path, with its bandwidth each way (--loss: these two checks alone);
7. --trainer TEXT_FILE, alone: each model's trainer.py as a user runs it (tiny preset, compiled,
   bf16, evaluation, samples and checkpoints), with CUDA graphs and without (--trainer_models
   picks some of the five).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from smolhub.layers import CausalSelfAttention, GroupedExperts, MoEFeedForward, NoisyTopKRouter, SoftmaxTopKRouter
from smolhub.layers.attention import attend
from smolhub.layers.moe import grouped_mm_supported
from smolhub.modeling import ARCHITECTURES, model_class

ROWS: list[tuple[str, str]] = []


def report(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"  {name:<58} {value}", flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


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


def moe_layer(args, grouped: bool, noisy: bool = False) -> MoEFeedForward:
    torch.manual_seed(0)
    router = (NoisyTopKRouter if noisy else SoftmaxTopKRouter)(args.dim, args.experts, args.top_k)
    experts = GroupedExperts(args.experts, args.dim, args.hidden, use_grouped_mm=grouped)
    return MoEFeedForward(router, experts).cuda().train()


def fwd_bwd(layer, x: torch.Tensor, grad: torch.Tensor):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
        loss = (y.float() * grad).sum() + layer.aux["balance"] + layer.aux["z"]
    loss.backward()
    return y


def grads(layer, x):
    return [x.grad] + [p.grad for p in layer.parameters()]


def zero(layer, x):
    x.grad = None
    layer.zero_grad(set_to_none=True)


def check_grouped_equals_loop(args, x, g):
    print("grouped experts == per-expert loop (bf16 autocast, fp32 weights)", flush=True)
    outs = {}
    for grouped in (True, False):
        layer = moe_layer(args, grouped)
        xi = x.clone().requires_grad_()
        outs[grouped] = (fwd_bwd(layer, xi, g), grads(layer, xi))
    report("output relative error", f"{rel_err(outs[True][0], outs[False][0]):.2e}")
    names = ["x", "router.gate", "experts.gate_up", "experts.down"]
    for name, a, b in zip(names, outs[True][1], outs[False][1]):
        report(f"grad {name} relative error", f"{rel_err(a, b):.2e}")
    pairs = [(outs[True][0], outs[False][0])] + list(zip(outs[True][1], outs[False][1]))
    worst = max(rel_err(a, b) for a, b in pairs)
    report("grouped == loop (bf16 tolerance 2e-2)", "PASS" if worst < 2e-2 else "FAIL")


def check_graph_breaks(args, x, g):
    print("graph breaks of the MoE layer (training mode, bf16 autocast)", flush=True)
    for noisy in (False, True):
        layer = moe_layer(args, grouped=True, noisy=noisy)
        tag = "noisy router" if noisy else "softmax router"

        def step(inp):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(inp)
                return (y.float() * g).sum() + layer.aux["balance"] + layer.aux["z"]

        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)(x.clone().requires_grad_())
        report(f"dynamo.explain, {tag}: graphs / breaks",
               f"{explanation.graph_count} / {explanation.graph_break_count}")
        for reason in explanation.break_reasons[:3]:
            print(f"    break: {reason.reason.splitlines()[0]}", flush=True)
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)
        try:
            xi = x.clone().requires_grad_()
            compiled(xi).backward()
            ok = "PASS"
        except Exception as e:  # report, then go on with the other checks
            ok = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        report(f"torch.compile(fullgraph=True) fwd+bwd, {tag}", ok)
        if not noisy and ok == "PASS":
            compiled_grads = grads(layer, xi)
            zero(layer, xi)
            step(xi).backward()
            err = max(rel_err(a, b) for a, b in zip(compiled_grads, grads(layer, xi)))
            report("compiled vs eager gradients, worst relative error", f"{err:.2e}")


def time_moe(args, x, g):
    print(f"MoE layer forward+backward, {args.tokens} tokens, d={args.dim}, {args.experts}x{args.hidden} "
          f"top-{args.top_k}", flush=True)
    results = {}
    for grouped in (False, True):
        for compiled in (False, True):
            torch._dynamo.reset()
            layer = moe_layer(args, grouped)
            fn = torch.compile(layer, fullgraph=grouped) if compiled else layer
            xi = x.clone().requires_grad_()
            ms = cuda_time_ms(lambda: fwd_bwd(fn, xi, g))
            name = f"{'grouped' if grouped else 'loop'}, {'compiled' if compiled else 'eager'}"
            results[name] = ms
            report(f"{name}: ms / step", f"{ms:.2f}")
    report("speed-up grouped compiled vs loop eager", f"{results['loop, eager'] / results['grouped, compiled']:.2f}x")


def check_sliding_window(args):
    print(f"sliding-window attention, batch {args.attn_batch} x {args.seq}, window {args.window}, GQA 8q/2kv",
          flush=True)
    torch.manual_seed(0)
    attn = CausalSelfAttention(512, 8, 2, window=args.window).cuda()
    x = torch.randn(args.attn_batch, args.seq, 512, device="cuda")
    g = torch.randn_like(x)

    def qkv(inp):
        q, k, v = attn.qkv(inp).split([512, 128, 128], dim=-1)
        B, T = inp.shape[:2]
        return (q.view(B, T, 8, 64).transpose(1, 2), k.view(B, T, 2, 64).transpose(1, 2),
                v.view(B, T, 2, 64).transpose(1, 2))

    def run(mode):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = qkv(xi)
            if mode == "flex":
                y = attend(q, k, v, 0, window=args.window)
            elif mode == "sdpa-mask":  # key positions force the boolean-mask path
                y = attend(q, k, v, 0, window=args.window, key_pos=torch.arange(args.seq, device="cuda"))
            else:
                y = attend(q, k, v, 0)
        (y.float() * g.view(args.attn_batch, args.seq, 8, 64).transpose(1, 2)).sum().backward()
        return y, xi.grad

    flex, ref = run("flex"), run("sdpa-mask")
    report("flex vs SDPA mask: output relative error", f"{rel_err(flex[0], ref[0]):.2e}")
    report("flex vs SDPA mask: grad x relative error", f"{rel_err(flex[1], ref[1]):.2e}")
    for mode in ("flex", "sdpa-mask", "causal (no window)"):
        report(f"{mode}: ms / fwd+bwd", f"{cuda_time_ms(lambda: run(mode)):.2f}")


def check_models(args):
    from SmolMixtral.config import SmolMixtralConfig
    from SmolMixtral.model import SmolMixtral
    from StoryMixtral.config import StoryMixtralConfig
    from StoryMixtral.model import StoryMixtral

    for model_cls, cfg in ((SmolMixtral, SmolMixtralConfig(vocab_size=32000)),
                           (StoryMixtral, StoryMixtralConfig(vocab_size=32000))):
        name = model_cls.__name__
        print(f"{name}: {args.batch} x {cfg.block_size} tokens, bf16 autocast", flush=True)
        torch.manual_seed(0)
        model = model_cls(cfg).cuda().train()
        idx = torch.randint(0, 32000, (args.batch, cfg.block_size), device="cuda")

        def step(m):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = m(idx, idx)
                loss = loss + model.aux_loss()
            loss.backward()
            return loss

        def loss_of(i):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(i, i)[1]

        torch._dynamo.reset()
        explanation = torch._dynamo.explain(loss_of)(idx)
        breaks = f"{explanation.graph_count} / {explanation.graph_break_count}"
        report(f"{name}: dynamo.explain graphs / breaks", breaks)
        for reason in explanation.break_reasons[:3]:
            print(f"    break: {reason.reason.splitlines()[0]}", flush=True)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        for label, m in (("eager", model), ("compiled", compiled)):
            ms = cuda_time_ms(lambda: step(m), warmup=3, iters=5)
            tok_s = args.batch * cfg.block_size / ms * 1e3
            report(f"{name} {label}: fwd+bwd ms / tok/s", f"{ms:.1f} / {tok_s:,.0f}")
        report(f"{name}: load max/mean after the compiled steps", f"{model.train_metrics()['load_max_over_mean']:.2f}")
        del model, compiled
        torch.cuda.empty_cache()


def check_decoding():
    """Cached decoding in bf16 for all five models, teacher-forced over 96 positions: the eager cache
    against the full forward, then the CUDA-graph decoder (smolhub.generate.GraphDecoder, captured
    eager step and compiled step) against the eager cache. StoryMixtral gets a 16-token window, so its
    ring-buffer cache wraps around. Random weights make router near-ties common, so a few positions
    may route differently between two bf16 paths: the argmax agreement is reported next to the
    relative error."""
    from smolhub.generate import GraphDecoder

    def compare(a, b):
        agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        return f"{rel_err(a, b):.2e} / {agree:.0%}"

    for name in ARCHITECTURES:
        cls = model_class(name)
        extra = {"sliding_window": 16} if name == "StoryMixtral" else {}
        cfg = cls.config_class(vocab_size=32000, block_size=128, **extra)
        torch.manual_seed(0)
        model = cls(cfg).cuda().to(torch.bfloat16).eval()
        seq = torch.randint(0, 32000, (1, 96), device="cuda")
        kinds = sorted({type(c).__name__ for c in model.make_kv_cache(1, cfg.block_size, "meta", torch.float32)})
        with torch.inference_mode():
            full = model(seq)[0].float()[:, 7:95]
            cache = model.make_kv_cache(1, cfg.block_size, "cuda", torch.bfloat16)
            eager = [model(seq[:, :8], kv_cache=cache, start_pos=0)[0][:, -1].float()]
            eager += [model(seq[:, t:t + 1], kv_cache=cache, start_pos=t)[0][:, -1].float() for t in range(8, 95)]
            eager = torch.stack(eager, 1)
            report(f"{name}: eager {'/'.join(kinds)} decode vs full forward: rel err / argmax", compare(eager, full))
            usable = GraphDecoder.usable(model, torch.device("cuda"))
            for compile in (False, True):
                try:
                    decoder = GraphDecoder(model, 1, torch.device("cuda"), torch.bfloat16, compile=compile)
                    graph = [model(seq[:, :8], kv_cache=decoder.cache, start_pos=0)[0][:, -1].float()]
                    for t in range(8, 95):
                        graph.append(decoder.step(seq[:, t:t + 1], torch.tensor(t, device="cuda")).clone())
                    result = compare(torch.stack(graph, 1), eager)
                except Exception as e:  # report, then go on with the other checks
                    result = f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                label = "compiled" if compile else "captured eager"
                report(f"{name}: CUDA-graph decode, {label} (usable={usable}) vs eager", result)
        del model
        torch.cuda.empty_cache()


def check_rotary_qkv(args) -> None:
    from smolhub.kernels.rotary import rotary_qkv, rotary_qkv_backward
    from smolhub.layers import RotaryEmbedding
    from smolhub.layers.positions import _rotate_halves

    print("RoPE on the fused q/k/v projection")
    B, T, H, KV, D = args.rope_batch, 512, 12, 4, 64
    cos, sin = RotaryEmbedding(D, T).cuda()(0, T)
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(B, T, (H + 2 * KV) * D, device="cuda", dtype=dtype)
        q, k, v = qkv.view(B, T, H + 2 * KV, D).split([H, KV, KV], dim=2)
        expected = (_rotate_halves(q, cos, sin, False), _rotate_halves(k, cos, sin, False), v)
        got = rotary_qkv(qkv, cos, sin, H, KV)
        report(f"{dtype}: q / k / v rel err vs torch", " / ".join(f"{rel_err(a, b):.1e}" for a, b in zip(got, expected)))
        grads = [torch.randn_like(t) for t in got]
        expected = torch.cat([_rotate_halves(grads[0], cos, sin, True), _rotate_halves(grads[1], cos, sin, True),
                              grads[2]], dim=2).flatten(2)
        report(f"{dtype}: d qkv rel err vs torch", f"{rel_err(rotary_qkv_backward(*grads, cos, sin), expected):.1e}")
    gb = 2 * qkv.numel() * qkv.element_size() / 1e9  # each way: read once, write once
    ms = cuda_time_ms(lambda: rotary_qkv(qkv, cos, sin, H, KV))
    report(f"kernel forward ({B}x{T}x{(H + 2 * KV) * D} bf16)", f"{ms:.3f} ms  {gb / ms:.2f} TB/s")
    ms = cuda_time_ms(lambda: rotary_qkv_backward(*grads, cos, sin))
    report("kernel backward", f"{ms:.3f} ms  {gb / ms:.2f} TB/s")


def check_linear_cross_entropy(args) -> None:
    from smolhub.kernels.cross_entropy import cross_entropy_rows_
    from smolhub.loss import (CHUNK_ELEMENTS, _cross_entropy_rows_torch, linear_cross_entropy,
                              reference_linear_cross_entropy)

    print("fused head + cross-entropy")
    N, C, V = args.loss_tokens, args.loss_dim, args.loss_vocab
    logits = torch.randn(N, V, device="cuda").mul_(3).bfloat16()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::97] = -100
    theirs = logits.clone()
    loss_theirs = _cross_entropy_rows_torch(theirs, targets, -100, True, CHUNK_ELEMENTS)
    # worst row over several runs: a row whose target logit were read after another thread
    # overwrote it would show as one wrong loss, which a relative error over all rows would hide
    loss_err = grad_err = 0.0
    for _ in range(5):
        ours = logits.clone()
        loss_ours = cross_entropy_rows_(ours, targets, -100, True)
        loss_err = max(loss_err, (loss_ours - loss_theirs).abs().max().item())
        grad_err = max(grad_err, (ours.float() - theirs.float()).abs().max().item())
    report("kernel vs torch path, 5 runs: per-row loss, worst abs err", f"{loss_err:.2e}")
    report("kernel vs torch path, 5 runs: gradient, worst abs err (bf16 ulp at 1: 3.9e-3)", f"{grad_err:.2e}")
    report("kernel: ignored rows all zero, no non-finite", str(bool((ours[::97] == 0).all() and ours.isfinite().all())))
    loss_only = cross_entropy_rows_(logits.clone(), targets, -100, False)
    report("kernel without the gradient: per-row loss, worst abs err", f"{(loss_only - loss_theirs).abs().max():.2e}")
    del logits, theirs, ours

    hidden = torch.randn(N, C, device="cuda", requires_grad=True)
    weight = (torch.randn(V, C, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::101] = -100

    def loss_and_grads(fn, amp=True):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = fn(hidden, weight, targets)
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    exact = loss_and_grads(reference_linear_cross_entropy, amp=False)
    compiled_plain = torch.compile(reference_linear_cross_entropy)
    compiled_ours = torch.compile(linear_cross_entropy, fullgraph=True)
    for label, fn in (("fused, eager", linear_cross_entropy), ("fused, compiled", compiled_ours),
                      ("F.linear + F.cross_entropy, compiled", compiled_plain)):
        got = loss_and_grads(fn)
        report(f"{label}: loss / d hidden / d weight rel err vs fp32",
               " / ".join(f"{rel_err(a, b):.1e}" for a, b in zip(got, exact)))

    def timed(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = cuda_time_ms(lambda: loss_and_grads(fn))
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**30

    for label, fn in (("F.linear + F.cross_entropy, compiled", compiled_plain), ("fused, eager", linear_cross_entropy),
                      ("fused, compiled", compiled_ours), ("F.linear + F.cross_entropy, compiled (again)", compiled_plain)):
        ms, gib = timed(fn)
        report(f"{label}: fwd+bwd ms, peak GiB above inputs ({N}x{C}x{V})", f"{ms:.2f} ms  {gib:.2f} GiB")

    logits = torch.randn(N, V, device="cuda").bfloat16()
    gb = 2 * logits.numel() * logits.element_size() / 1e9  # read once, overwritten once
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            ms = cuda_time_ms(lambda: cross_entropy_rows_(logits, targets, -100, True, block, warps))
            report(f"kernel BLOCK={block} num_warps={warps}", f"{ms:.3f} ms  {gb / ms:.2f} TB/s")
    ms = cuda_time_ms(lambda: cross_entropy_rows_(logits, targets, -100, True))
    report("kernel, default launch configuration", f"{ms:.3f} ms  {gb / ms:.2f} TB/s")


def run_trainer(model: str, text: str, workdir: Path, run_name: str, *flags: str) -> tuple[list[dict], str]:
    """One 60-step run of a model's tiny preset through its trainer.py, as a user runs it, with an
    evaluation every 20 steps and a sample and a checkpoint every 30: (metrics records, stdout)."""
    repo = Path(__file__).resolve().parent.parent
    out = workdir / run_name
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "disabled"}
    # the trainer runs inside the model's folder: a path relative to the caller's folder must not reach it
    proc = subprocess.run([sys.executable, "trainer.py", "--preset", "tiny", "--dataset", str(Path(text).resolve()),
                           "--data_dir", str(workdir / f"data-{model}"), "--out_dir", str(out), "--max_steps", "60",
                           "--eval_interval", "20", "--save_interval", "30", "--sample_interval", "30",
                           "--log_interval", "10", *flags], cwd=repo / model, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # the trainer's one error line, which may share a line with tqdm's bar
        lines = proc.stderr.replace("\r", "\n").strip().splitlines()
        raise RuntimeError(next((line for line in reversed(lines) if "error" in line.lower()), lines[-1]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stdout


def check_trainer(args) -> None:
    """Each model's trainer on CUDA (compiled, bf16, tiny preset on a local text file), with CUDA graphs
    (the default at one micro-batch per step) and without: both runs must finish with their samples and
    checkpoints, their losses agree to bf16 rounding, and tokens/s of the last window shows what the
    graphs buy where launching kernels is the bottleneck."""
    print("trainer, tiny presets")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.trainer_models or ARCHITECTURES:
            runs = {}
            for graphs in ("true", "false"):
                label = f"{model}, cuda_graphs {graphs}"
                try:
                    records, stdout = run_trainer(model, args.trainer, Path(tmp), f"{model}-graphs-{graphs}",
                                                  "--compile", "true", "--cuda_graphs", graphs)
                except RuntimeError as e:
                    report(f"{label}: FAILED", str(e)[:200])
                    continue
                runs[graphs] = records
                report(f"{label}: samples, final val loss, tok/s (steps 51-60)",
                       f"{stdout.count(' sample: ')}, {records[-1]['val_loss']:.4f}, {records[-1]['tok_per_s']:,.0f}")
            if len(runs) == 2:
                diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["true"], runs["false"]) if "loss" in a)
                report(f"{model}: largest logged loss difference, graphs on vs off", f"{diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--attn_batch", type=int, default=16)
    parser.add_argument("--models", action="store_true", help="also compile and time both full MoE models")
    parser.add_argument("--decoding", action="store_true", help="only check CUDA-graph decoding, all five models")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step in --models")
    parser.add_argument("--loss", action="store_true", help="only check the fused RoPE and head + cross-entropy ops")
    parser.add_argument("--rope_batch", type=int, default=64, help="sequences of 512 tokens in the RoPE check")
    parser.add_argument("--loss_tokens", type=int, default=32768)
    parser.add_argument("--loss_dim", type=int, default=768)
    parser.add_argument("--loss_vocab", type=int, default=50304)
    parser.add_argument("--trainer", metavar="TEXT_FILE", default="",
                        help="only run each model's trainer (tiny preset) on this text file, CUDA graphs on and off")
    parser.add_argument("--trainer_models", nargs="+", default=[], choices=ARCHITECTURES, metavar="MODEL",
                        help="with --trainer: only these models (default: all five)")
    args = parser.parse_args()
    if args.trainer_models and not args.trainer:
        parser.error("--trainer_models picks the models of --trainer TEXT_FILE; give that too")
    if not torch.cuda.is_available():
        raise SystemExit("check_gpu.py needs a CUDA GPU")

    probe = torch.zeros(1, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        supported = grouped_mm_supported(probe)
    print(f"{torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}, F.grouped_mm: {hasattr(F, 'grouped_mm')}, "
          f"torch._grouped_mm: {hasattr(torch, '_grouped_mm')}, grouped path chosen under bf16 autocast: {supported}")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.decoding:
        check_decoding()
        return
    if args.loss:
        check_rotary_qkv(args)
        check_linear_cross_entropy(args)
        return
    if args.trainer:
        check_trainer(args)
        return
    x = torch.randn(args.tokens, args.dim, device="cuda")
    g = torch.randn(args.tokens, args.dim, device="cuda")
    check_grouped_equals_loop(args, x, g)
    check_graph_breaks(args, x, g)
    time_moe(args, x, g)
    check_sliding_window(args)
    check_rotary_qkv(args)
    check_linear_cross_entropy(args)
    if args.models:
        check_decoding()
        check_models(args)
    width = max(len(n) for n, _ in ROWS)
    print("\n" + "-" * (width + 30))
    for name, value in ROWS:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
