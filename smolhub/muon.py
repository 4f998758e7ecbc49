"""Muon (Jordan et al., 2024; Liu et al., "Muon is Scalable for LLM Training", 2025) and its AdamW partner.

Muon replaces each hidden weight matrix's momentum with the nearest (semi-)orthogonal matrix before
applying it, computed by five Newton-Schulz iterations. It is for the hidden matrices only;
embeddings, the output head, norms and biases stay on AdamW.

`Muon` is torch.optim.Muon's update (the same Newton-Schulz coefficients and bf16 iteration,
nesterov momentum in lerp form, decoupled weight decay and learning-rate adjustment;
tests/test_muon.py checks it is bit-equal to torch.optim.Muon) with two additions: 3-D parameters,
a stack of expert matrices (E, rows, cols) orthogonalised one expert matrix at a time as Kimi K2
does (torch.optim.Muon accepts 2-D parameters only), and speed: all matrices of one shape go
through one batched Newton-Schulz iteration instead of one small iteration each.

`MuonWithAdamW` presents the pair as one optimizer to the engine's scheduler, GradScaler and
checkpoints.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.optim import Optimizer

from smolhub.errors import UserError

# Keller Jordan's quintic coefficients, the ones torch.optim.Muon uses.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T, for a matrix (rows, cols) or a stack of them (E, rows, cols).

    The quintic iteration pushes every singular value into roughly [0.7, 1.2] rather than exactly
    to 1, which trains as well and needs fewer steps. It runs in `dtype` (torch's choice: bf16)."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: its Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius norm >= spectral norm: all s <= 1
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = addmm(x, addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's learning-rate adjustment for a (rows, cols) matrix.

    "original" (Keller Jordan): sqrt(max(1, rows / cols)); "match_rms_adamw" (Moonlight): 0.2 *
    sqrt(max(rows, cols)), which gives the update AdamW's typical RMS so AdamW's lr and weight decay
    carry over."""
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))


class Muon(Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D parameters and 3-D stacks of matrices.

    The arguments and defaults are torch.optim.Muon's, plus `ns_dtype`, the precision of the
    Newton-Schulz iteration: bf16 as torch does on GPUs; fp32 on CPUs, which mostly emulate bf16
    matmuls (15-30x slower than fp32 on the test machines). It is a property of the device, not
    of the training state, so it is not in the state_dict."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 ns_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon needs lr, momentum and weight_decay >= 0, got {lr}, {momentum}, {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon takes matrices (2-D) or stacks of them (3-D), got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            # One batched Newton-Schulz per matrix shape (every layer's copy of a projection, all the
            # experts): a few large matmuls instead of hundreds of small kernel launches.
            by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[(p.size(-2), p.size(-1))].append(i)
            for (rows, cols), members in by_shape.items():
                stacked = torch.cat([updates[i].reshape(-1, rows, cols) for i in members])
                ortho = orthogonalize(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                      self.ns_dtype)
                step_size = adjusted_lr(lr, group["adjust_lr_fn"], rows, cols)
                for i, o in zip(members, ortho.split([params[i].numel() // (rows * cols) for i in members])):
                    params[i].mul_(1 - lr * group["weight_decay"])
                    params[i].add_(o.reshape(params[i].shape), alpha=-step_size)
        return loss


class MuonWithAdamW(Optimizer):
    """A Muon and an AdamW that the engine drives as one optimizer.

    `param_groups` is the list of the two optimizers' own group dicts (AdamW's first, so the logged
    lr is AdamW's), so the LR scheduler and GradScaler.unscale_ act on both; step, zero_grad,
    state_dict and load_state_dict cover both. Optimizer state lives in the two inner optimizers."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        super().__init__([p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]], {})
        self.muon, self.adamw = muon, adamw
        self._share_groups()

    def _share_groups(self) -> None:
        self.param_groups = self.adamw.param_groups + self.muon.param_groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"adamw", "muon"}:
            raise UserError("the checkpoint's optimizer state is not Muon + AdamW: resume with the --optimizer "
                            "it was trained with")
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])
        self._share_groups()  # loading replaces the inner group dicts
