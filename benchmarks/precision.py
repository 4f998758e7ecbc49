"""Where bf16 training loses precision: each component of a SmolHub model and of its transformers twin,
under bf16 autocast over fp32 weights (as both train), against an fp64 reference of the same math.

    python -m benchmarks.precision --model StoryLlama --device cpu
    python -m benchmarks.precision --model SmolTransformer --device cuda --json precision.json

Three tables, each a relative error ||x - x_fp64|| / ||x_fp64|| (Frobenius, over the whole batch):

- *forward*: every block's input (the residual stream), each norm, attention and feed-forward output,
  the final norm and the loss, propagated through the whole model; ours with the residual stream in
  bf16 and in fp32 (config.bf16_residual), and the twin.
- *gradients*: of every parameter (the twin's mapped onto our names), after one backward of the loss.
- *isolated*: one component fed the same rounded inputs on both sides (the error it adds by itself):
  RMSNorm on a bf16 and an fp32 residual, RoPE, attention forward and backward (native GQA against
  repeated K/V heads; on CUDA per SDPA backend), and the output head with its cross-entropy (our
  fused linear_cross_entropy against F.cross_entropy over the twin's logits).

StoryLlama's twin is LlamaForCausalLM loaded with our weights (the export adapter): the same function.
SmolTransformer's is GPT2LMHeadModel made our function (benchmarks.common.gpt2_as_smoltransformer:
torch's RMSNorm for its LayerNorms, its biases held at zero) and given our weights, since GPT-2's own
LayerNorm is another function. Each side is measured against its own fp64 run, which the two agree on.
Weights are the models' init (GPT-2's) unless --checkpoint gives trained ones. `--tiny` shrinks both
models alike (the CPU test). On CPU, autocast casts fewer ops than on CUDA and GEMMs accumulate
differently, so a ranking measured here is checked on the GPU by the same command.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from smolhub.errors import UserError
from smolhub.modeling import model_class

MODELS = ("StoryLlama", "SmolTransformer")
TINY = dict(n_layer=2, n_embd=64, n_head=4, block_size=64, n_kv_heads=2, ffn_hidden=128)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# --- the two models with the same weights ---------------------------------------------------------------

def build_ours(name: str, vocab: int, tiny: bool, checkpoint: str | None):
    if checkpoint:
        from smolhub.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint).model
    cls = model_class(name)
    fields = cls.config_class.__dataclass_fields__
    overrides = {k: v for k, v in TINY.items() if k in fields} if tiny else {}
    return cls(cls.config_class(vocab_size=vocab, **overrides))


def twin_with_our_weights(name: str, ours):
    """(the transformers twin holding our weights, the map of its gradients to our names)."""
    from benchmarks.common import gpt2_as_smoltransformer, load_ours_into_twin, pairs

    twin = pairs()[name].build_baseline(ours.config)
    if name == "SmolTransformer":
        gpt2_as_smoltransformer(twin, ours.config.norm_eps)
    return twin, load_ours_into_twin(name, ours, twin)


def probe_points(name: str, model, is_ours: bool, n_layer: int) -> dict[str, tuple[torch.nn.Module, bool]]:
    """Component label -> (module, whether to record its input rather than its output)."""
    if is_ours:
        blocks = model.blocks
        norms = ("attn_norm", "attn", "ffn_norm" if name == "StoryLlama" else "mlp_norm",
                 "ffn" if name == "StoryLlama" else "mlp")
        final = model.norm
    elif name == "StoryLlama":
        blocks, final = model.model.layers, model.model.norm
        norms = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    else:
        blocks, final = model.transformer.h, model.transformer.ln_f
        norms = ("ln_1", "attn", "ln_2", "mlp")
    points = {}
    for i in range(n_layer):
        block = blocks[i]
        a_norm, attn, f_norm, ffn = (getattr(block, n) for n in norms)
        points.update({f"L{i} residual in": (block, True), f"L{i} attn norm": (a_norm, False),
                       f"L{i} attention": (attn, False), f"L{i} residual mid": (f_norm, True),
                       f"L{i} ffn norm": (f_norm, False), f"L{i} ffn": (ffn, False)})
    points["final residual"] = (final, True)
    points["final norm"] = (final, False)
    return points


def first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def run(name, model, is_ours, x, y, amp: bool, device) -> tuple[dict, float, dict]:
    """One forward and backward of the training loss: (recorded activations, loss, parameter gradients).

    Ours in a low precision runs as it trains (the fused head + loss); every fp64 run and the twin take
    F.cross_entropy over the logits, as the twin trains."""
    acts, hooks = {}, []
    for label, (module, want_input) in probe_points(name, model, is_ours, model.config.n_layer if is_ours
                                                      else (model.config.num_hidden_layers
                                                            if name == "StoryLlama" else model.config.n_layer)).items():
        if want_input:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, label=label: acts.__setitem__(label, first_tensor(args).detach())))
        else:
            hooks.append(module.register_forward_hook(
                lambda m, args, out, label=label: acts.__setitem__(label, first_tensor(out).detach())))
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    try:
        with ctx:
            if is_ours and amp:
                _, loss = model(x, y)
            else:
                logits = model(x)[0] if is_ours else model(input_ids=x).logits
                loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1),
                                       y.flatten())
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return acts, loss.item(), grads


def whole_model(name: str, ours, batch: int, seq_len: int, device, seed: int) -> dict:
    """Forward and gradient errors of ours (bf16 residual, fp32 residual) and the twin against fp64."""
    hf, grads_to_ours = twin_with_our_weights(name, ours)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ours.config.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    ours.to(device).train()
    hf.to(device).train()
    results = {}
    ref = {}
    for side, model in (("ours", ours), ("twin", hf)):
        model.double()
        ref[side] = run(name, model, side == "ours", x, y, False, device)
        model.float()
    # the twin computes our function: its fp64 run checks the pairing
    results["fp64 ours vs twin loss"] = abs(ref["ours"][1] - ref["twin"][1])
    runs = {}
    for residual in (True, False):
        ours.config.bf16_residual = residual
        runs[f"ours bf16 residual" if residual else "ours fp32 residual"] = ("ours", run(name, ours, True, x, y, True,
                                                                                     device))
    runs["twin"] = ("twin", run(name, hf, False, x, y, True, device))
    forward, gradients = {}, {}
    for label, (side, (acts, loss, grads)) in runs.items():
        ref_acts, ref_loss, ref_grads = ref[side]
        forward[label] = {k: rel_err(acts[k], ref_acts[k]) for k in ref_acts}
        forward[label]["loss"] = abs(loss - ref_loss) / abs(ref_loss)
        if side == "twin":
            grads, ref_grads = grads_to_ours(grads), grads_to_ours(ref_grads)
        gradients[label] = {k: rel_err(grads[k], ref_grads[k]) for k in ref_grads}
    results.update(forward=forward, gradients=gradients)
    return results


# --- components fed the same inputs -------------------------------------------------------------------------

def isolated(name: str, ours, batch: int, seq_len: int, device, seed: int) -> dict:
    """Each component on identical rounded inputs, ours and the twin's formulation, against fp64."""
    from smolhub.layers import RMSNorm
    from smolhub.layers.positions import RotaryEmbedding, rotary_qkv
    from smolhub.loss import linear_cross_entropy

    cfg = ours.config
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    out = {}
    C, H = cfg.n_embd, cfg.n_head
    n_kv = getattr(cfg, "n_kv_heads", H)
    D = C // H
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    # the norm, gain != 1 (as after training). Ours applies the gain in fp32 and rounds once; Llama
    # rounds the normalised value to the input dtype, then multiplies by the gain; the GPT-2 twin runs
    # torch's RMSNorm module as autocast leaves it. Compared as the next matmul reads them: rounded to bf16
    norm = RMSNorm(C, cfg.norm_eps).to(device)
    their_norm = torch.nn.RMSNorm(C, eps=cfg.norm_eps).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * randn(C))
        their_norm.weight.copy_(norm.weight)
    gain = norm.weight.detach()
    for residual in (torch.bfloat16, torch.float32):
        x = randn(batch, seq_len, C).to(residual)
        exact = F.rms_norm(x.double(), (C,), gain.double(), cfg.norm_eps)
        with amp, torch.no_grad():
            mine = norm(x)
            if name == "StoryLlama":
                h32 = x.float()
                theirs = gain * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)).to(x.dtype)
            else:
                # torch warns that a bf16 input with an fp32 gain takes its unfused path, the one measured here
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    theirs = their_norm(x)
        tag = "bf16" if residual == torch.bfloat16 else "fp32"
        out[f"norm on a {tag} residual"] = (rel_err(mine.bfloat16(), exact), rel_err(theirs.bfloat16(), exact))

    if name == "StoryLlama":
        # RoPE: ours rotates a bf16 projection in fp32 with fp64-derived tables, rounding once; Llama's
        # tables are fp32, its product with a bf16 q is fp32, rounded to bf16 by attention
        theta = cfg.rope_theta
        rope = RotaryEmbedding(D, seq_len, theta).to(device)
        qkv = randn(batch, seq_len, (H + 2 * n_kv) * D).bfloat16()
        q, _, _ = rotary_qkv(qkv, *rope(0, seq_len), H, n_kv)
        half = D // 2

        def rotate(x, angles):
            cos, sin = angles.cos()[:, None], angles.sin()[:, None]
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

        def angles(inv_freq, dtype):
            a = torch.arange(seq_len, dtype=dtype)[:, None] * inv_freq[None, :]
            return torch.cat([a, a], -1).to(device)
        q_in = qkv[..., :H * D].view(batch, seq_len, H, D)
        exact = rotate(q_in.double(), angles(1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D),
                                             torch.float64))
        theirs = rotate(q_in, angles(1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D),
                                     torch.float32)).bfloat16()
        out["RoPE (q, rounded to bf16)"] = (rel_err(q, exact), rel_err(theirs, exact))

    # attention: bf16 q, k, v; ours with native GQA (transformers' SDPA path also takes it when there is
    # no mask), against K/V heads repeated per query head (transformers with a mask, or eager)
    qb, kb, vb = (randn(batch, h, seq_len, D).bfloat16().requires_grad_() for h in (H, n_kv, n_kv))
    grad_out = randn(batch, H, seq_len, D).bfloat16()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (qb, kb, vb))
    rep = H // n_kv
    y64 = F.scaled_dot_product_attention(q64, k64.repeat_interleave(rep, 1), v64.repeat_interleave(rep, 1),
                                         is_causal=True)
    y64.backward(grad_out.double())
    exact = [y64.detach(), q64.grad, k64.grad, v64.grad]

    def attention_errors(native: bool) -> tuple[float, float]:
        for t in (qb, kb, vb):
            t.grad = None
        if native:
            y = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=rep > 1)
        else:
            y = F.scaled_dot_product_attention(qb, kb.repeat_interleave(rep, 1), vb.repeat_interleave(rep, 1),
                                               is_causal=True)
        y.backward(grad_out)
        got = [y.detach(), qb.grad, kb.grad, vb.grad]
        return rel_err(got[0], exact[0]), max(rel_err(a, b) for a, b in zip(got[1:], exact[1:]))

    backends = {"default": None}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        backends.update(cudnn=SDPBackend.CUDNN_ATTENTION, flash=SDPBackend.FLASH_ATTENTION,
                        efficient=SDPBackend.EFFICIENT_ATTENTION)
    for label, backend in backends.items():
        for native in (True, False):
            try:
                if backend is None:
                    fwd, bwd = attention_errors(native)
                else:
                    from torch.nn.attention import sdpa_kernel

                    with sdpa_kernel(backend):
                        fwd, bwd = attention_errors(native)
            except RuntimeError:  # this backend does not take these inputs
                continue
            side = 0 if native else 1
            for what, err in (("forward", fwd), ("backward (worst of q, k, v)", bwd)):
                key = f"attention {what}, {label}"
                out.setdefault(key, [math.nan, math.nan])[side] = err

    # output head + cross-entropy: fp32 hidden (the final norm's output) and weight, as in training
    V = cfg.vocab_size
    hidden = randn(batch * seq_len, C).requires_grad_()
    weight = randn(V, C, scale=cfg.init_std * 5).requires_grad_()
    targets = torch.randint(0, V, (batch * seq_len,), generator=g).to(device)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss64 = F.cross_entropy(h64 @ w64.t(), targets)
    loss64.backward()

    def head_errors(fused: bool) -> list[float]:
        hidden.grad = weight.grad = None
        with amp:
            loss = linear_cross_entropy(hidden, weight, targets) if fused else \
                F.cross_entropy(F.linear(hidden, weight).float(), targets)
        loss.backward()
        return [abs(loss.item() - loss64.item()) / loss64.item(), rel_err(hidden.grad, h64.grad),
                rel_err(weight.grad, w64.grad)]
    mine, theirs = head_errors(True), head_errors(False)
    for i, what in enumerate(("loss", "gradient of the hidden states", "gradient of the head weight")):
        out[f"head + cross-entropy: {what}"] = (mine[i], theirs[i])
    return {k: list(v) for k, v in out.items()}


# --- output -------------------------------------------------------------------------------------------------

def print_tables(name: str, twin: str, res: dict) -> None:
    fwd, grads = res["whole"]["forward"], res["whole"]["gradients"]
    labels = list(fwd)
    if "fp64 ours vs twin loss" in res["whole"]:
        print(f"fp64 references: ours and the twin differ by {res['whole']['fp64 ours vs twin loss']:.1e} in the loss")
    print(f"\n{name} under bf16 autocast: relative error against fp64, forward (propagated)")
    print(f"{'component':<34}" + "".join(f"{lb:>22}" for lb in labels))
    for comp in fwd[labels[0]]:
        print(f"{comp:<34}" + "".join(f"{fwd[lb].get(comp, math.nan):>22.2e}" for lb in labels))
    print(f"\n{name}: relative error of each parameter's gradient against fp64")
    print(f"{'parameter':<34}" + "".join(f"{lb:>22}" for lb in labels))
    for p in grads[labels[0]]:
        print(f"{p:<34}" + "".join(f"{grads[lb].get(p, math.nan):>22.2e}" for lb in labels))
    print(f"\nisolated components, identical inputs: relative error against fp64 (twin = {twin}'s formulation)")
    print(f"{'component':<50}{'ours':>12}{'twin':>12}{'ours/twin':>11}")
    for comp, (mine, theirs) in res["isolated"].items():
        print(f"{comp:<50}{mine:>12.2e}{theirs:>12.2e}{mine / theirs if theirs else math.nan:>11.2f}")


def measure(name: str, device: str = "cpu", tiny: bool = False, batch: int = 4, seq_len: int = 256,
            seed: int = 0, checkpoint: str | None = None) -> dict:
    if name not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    ours = build_ours(name, 512 if tiny else 50304, tiny, checkpoint)
    seq_len = min(seq_len, ours.config.block_size)
    return {"model": name, "device": str(dev), "batch": batch, "seq_len": seq_len,
            "whole": whole_model(name, ours, batch, seq_len, dev, seed),
            "isolated": isolated(name, ours, batch, seq_len, dev, seed)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="StoryLlama", choices=MODELS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4, help="Sequences of the measured batch.")
    p.add_argument("--seq_len", type=int, default=256, help="Tokens per sequence (at most the context).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="Measure trained weights: a SmolHub checkpoint of --model.")
    p.add_argument("--tiny", action="store_true", help="Toy sizes (the CPU test).")
    p.add_argument("--json", default=None, help="Also write the numbers to this file.")
    args = p.parse_args(argv)
    res = measure(args.model, args.device, args.tiny, args.batch, args.seq_len, args.seed, args.checkpoint)
    print_tables(args.model, "LlamaForCausalLM" if args.model == "StoryLlama" else "GPT2LMHeadModel", res)
    if args.json:
        path = Path(args.json)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(path)
    return res


if __name__ == "__main__":
    main()
