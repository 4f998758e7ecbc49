"""Mixture-of-experts feed-forward: routers, grouped SwiGLU experts, and their balancing losses.

A router scores each token against every expert and keeps the top k; `GroupedExperts` runs every
(token, expert) assignment through its expert and sums the outputs weighted by the router.
Everything stays tensor-shaped (no `.item()`, no Python branch on data) on the grouped path, so
`torch.compile` captures the expert computation as one graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from smolhub.config import EXPERTS_KERNELS
from smolhub.errors import UserError
from smolhub.kernels import triton_available

# F.grouped_mm is the public name from torch 2.10 on; torch._grouped_mm is the same kernel before.
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x actually run in: the autocast dtype when autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether the fused grouped GEMM kernel runs here: bf16 on CUDA with compute capability 9.0 (H100)."""
    return (_grouped_mm is not None and x.is_cuda and _autocast_dtype(x) == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def auto_experts_kernel(x: torch.Tensor) -> str:
    """What `kernel="auto"` runs x through: the grouped GEMM where it runs (bf16 on an H100-class GPU);
    the Triton kernels on other CUDA GPUs in bf16 (A100, Ada), where the alternative is the loop (on
    an H100 they ran the MoE layer 2.6x as fast as the loop eager and 5x compiled, the grouped GEMM
    1.2x as fast as they compiled: benchmarks README, "MoE step profile"); the loop elsewhere (CPU,
    fp32, fp16), where it is exact. Triton's interpreter never stands in for a torch path here."""
    if grouped_mm_supported(x):
        return "grouped_mm"
    if x.is_cuda and _autocast_dtype(x) == torch.bfloat16 and triton_available(x):
        return "triton"
    return "loop"


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores of each row, largest first: torch.topk(scores, k).indices for
    distinct scores (ties go to the lower index).

    A router has few experts, so each expert's rank is counted from all E x E comparisons: pointwise
    work and one reduction, which torch.compile fuses with the router's other kernels. torch.topk is
    a library sort of two kernels per layer, ~40% of the compiled batch-1 decode step's non-matmul
    time in StoryKimi (H100 profile). Past 32 experts the E^2 comparisons cost more than the sort."""
    n = scores.size(-1)
    if n > 32:
        return scores.topk(k, dim=-1).indices
    experts = torch.arange(n, device=scores.device)
    mine, other = scores.unsqueeze(-1), scores.unsqueeze(-2)  # (..., E, 1) against (..., 1, E)
    ahead = (other > mine) | ((other == mine) & (experts < experts[:, None]))
    rank = ahead.sum(dim=-1)  # (..., E): how many experts come before each one
    return (rank.unsqueeze(-1) == torch.arange(k, device=scores.device)).int().argmax(dim=-2)


def expert_counts(expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many assignments in expert_idx (..., k) went to each of the n_experts experts: (n_experts,) int64."""
    experts = torch.arange(n_experts, device=expert_idx.device)
    return (expert_idx.reshape(-1, 1) == experts).sum(dim=0)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inverse[perm[i]] = i: a scatter, where perm.argsort() would sort again."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation perm, differentiated as a gather by its inverse.

    Indexing's own backward scatter-adds into a zeroed buffer (atomics, in bf16 under autocast),
    since it cannot know that the rows are distinct; a permutation's gradient is just the gradient
    permuted back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm], given perm's inverse permutation (rows of x, perm a permutation of range(len(x)))."""
    return _PermuteRows.apply(x, perm, inverse)


# The index arithmetic (order // k) and the sum of x's gradient over the k slots stay outside the ops,
# where inductor fuses them with their neighbours; the ops hold only the kernels' launches.
@torch.library.custom_op("smolhub::scattered_experts", mutates_args=())
def _scattered_experts_op(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, order: torch.Tensor,
                          token_of: torch.Tensor, expert_ends: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from smolhub.kernels.moe import scattered_experts

    return scattered_experts(x, gate_up, down, order, token_of, expert_ends)


@_scattered_experts_op.register_fake
def _(x, gate_up, down, order, token_of, expert_ends):
    hidden = down.size(1)
    return x.new_empty(order.numel(), down.size(2)), x.new_empty(order.numel(), 2 * hidden), \
        x.new_empty(order.numel(), hidden)


@torch.library.custom_op("smolhub::scattered_experts_backward", mutates_args=())
def _scattered_experts_backward_op(grad_out: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor,
                                   down: torch.Tensor, order: torch.Tensor, token_of: torch.Tensor,
                                   expert_ends: torch.Tensor, pre: torch.Tensor, act: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from smolhub.kernels.moe import scattered_experts_backward

    return scattered_experts_backward(grad_out, x, gate_up, down, order, token_of, expert_ends, pre, act)


@_scattered_experts_backward_op.register_fake
def _(grad_out, x, gate_up, down, order, token_of, expert_ends, pre, act):
    return torch.empty_like(grad_out), torch.empty_like(gate_up), torch.empty_like(down)


def _scattered_experts_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[1], output[2])


def _scattered_experts_grad(ctx, grad_out, grad_pre, grad_act):
    x, gate_up, down, order, token_of, expert_ends, pre, act = ctx.saved_tensors
    grad_rows, grad_gate_up, grad_down = _scattered_experts_backward_op(grad_out, x, gate_up, down, order, token_of,
                                                                        expert_ends, pre, act)
    grad_x = grad_rows.view(x.size(0), -1, x.size(1)).sum(dim=1) if x.size(0) else torch.zeros_like(x)
    return grad_x, grad_gate_up, grad_down, None, None, None


_scattered_experts_op.register_autograd(_scattered_experts_grad, setup_context=_scattered_experts_setup)


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights: expert e is down_e(silu(x W_gate,e) * x W_up,e).

    gate_up[e] is (dim, 2*hidden) = [W_gate,e | W_up,e] and down[e] is (hidden, dim), so the whole
    layer is two 3-D parameters. `kernel` picks how a batch runs through them:
    - "grouped_mm": the assignments copied into expert order, two torch grouped matmuls, copied back;
    - "triton": smolhub.kernels.moe, whose matmuls read and write the rows where they lie and apply
      the SwiGLU in their epilogue (CUDA, or triton's interpreter);
    - "loop": the exact reference, each expert on its rows in turn, any device and dtype;
    - "auto": `auto_experts_kernel`, the fastest of them that runs here.
    Without gradients, up to `dense_max_tokens` tokens (a decode step) run every expert instead (`_dense`).
    """

    dense_max_tokens = 64

    def __init__(self, n_experts: int, dim: int, hidden: int, kernel: str = "auto"):
        super().__init__()
        if kernel not in EXPERTS_KERNELS:
            raise ValueError(f"experts kernel {kernel!r} is not one of {', '.join(EXPERTS_KERNELS)}")
        self.n_experts, self.dim, self.hidden = n_experts, dim, hidden
        self.kernel = kernel
        self.gate_up = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, residual_scale: float = 1.0) -> None:
        """N(0, std) like a Linear of CausalLM.init_weights; `down` writes into the residual stream
        and gets std * residual_scale, like the dense models' output projections."""
        nn.init.normal_(self.gate_up, mean=0.0, std=std)
        nn.init.normal_(self.down, mean=0.0, std=std * residual_scale)

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, dim), expert_idx (N, k) long, weights (N, k) -> sum_k weights[:, k] * expert_idx[:, k](x)."""
        if x.size(0) <= self.dense_max_tokens and not torch.is_grad_enabled():
            return self._dense(x, expert_idx, weights)
        kernel = auto_experts_kernel(x) if self.kernel == "auto" else self.kernel
        if kernel == "triton":
            if not triton_available(x, interpreter=True):
                raise UserError("--experts_kernel triton needs a CUDA GPU and triton: "
                                "use --experts_kernel auto, grouped_mm or loop")
            return self._scattered(x, expert_idx, weights)
        return self._grouped(x, expert_idx, weights) if kernel == "grouped_mm" else self._loop(x, expert_idx, weights)

    def _sort(self, expert_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, ends): the N*k assignments grouped by expert, and where each expert's group ends,
        int32 for the kernels (an expert without tokens gets an empty group)."""
        # a stable sort on the narrowest key that holds an expert index: the radix sort makes one
        # pass per key byte (eight for int64)
        flat = expert_idx.reshape(-1)
        order = flat.to(torch.uint8 if self.n_experts <= 256 else torch.int32).argsort(stable=True)
        return order, expert_counts(expert_idx, self.n_experts).cumsum(dim=0).to(torch.int32)

    def _scattered(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = expert_idx.shape
        dtype = _autocast_dtype(x)
        order, ends = self._sort(expert_idx)
        order = order.to(torch.int32)
        out, _, _ = _scattered_experts_op(x.to(dtype), self.gate_up.to(dtype), self.down.to(dtype), order,
                                          order // k, ends)
        return (out.view(N, k, self.dim) * weights.to(dtype).unsqueeze(-1)).sum(dim=1)

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.split(self.hidden, dim=-1)
        return F.silu(gate) * up

    def _grouped(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = expert_idx.shape
        dtype = _autocast_dtype(x)
        order, ends = self._sort(expert_idx)
        position = inverse_permutation(order)  # where each assignment sits in `order`
        rows = permute_rows(x.to(dtype).repeat_interleave(k, dim=0), order, position)
        h = _grouped_mm(rows, self.gate_up.to(dtype), offs=ends)
        out = _grouped_mm(self._swiglu(h), self.down.to(dtype), offs=ends)
        out = permute_rows(out, position, order).view(N, k, self.dim)  # back to (token, slot) order
        return (out * weights.to(dtype).unsqueeze(-1)).sum(dim=1)

    def _dense(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, mixed by an (N, E) weight matrix that is zero off the chosen experts.

        A decode step's few tokens touch most experts anyway; reading all E experts' weights (where
        the grouped path reads only the chosen ones) costs microseconds of bandwidth and saves the
        grouped path's sorts and gathers, ~20 small kernels per layer that dominate a batch-1 step."""
        dtype = _autocast_dtype(x)
        mix = torch.zeros(x.size(0), self.n_experts, device=x.device, dtype=weights.dtype)
        mix.scatter_add_(1, expert_idx, weights)
        h = torch.matmul(x.to(dtype), self.gate_up.to(dtype))  # (E, N, 2*hidden)
        out = torch.matmul(self._swiglu(h), self.down.to(dtype))  # (E, N, dim)
        return (out * mix.t().to(dtype).unsqueeze(-1)).sum(dim=0)

    def _loop(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The reference: each expert on exactly the rows routed to it. Exact on CPU, any dtype."""
        dtype = _autocast_dtype(x)
        out = torch.zeros(x.size(0), self.dim, device=x.device, dtype=dtype)
        for e in range(self.n_experts):
            token, slot = torch.nonzero(expert_idx == e, as_tuple=True)
            y = self._swiglu(x[token] @ self.gate_up[e]) @ self.down[e]
            out.index_add_(0, token, (y * weights[token, slot, None]).to(dtype))
        return out


def switch_balance_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss E * sum_e f_e * P_e (Fedus et al., 2021).

    f_e is the share of the N*k assignments routed to expert e (not differentiable), P_e the mean
    router probability of e. It is 1 under perfect balance and E / k when every token goes to the same k
    experts (E for Switch's top-1)."""
    n_experts = probs.size(-1)
    f = counts.float() / counts.sum()
    return n_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss mean(logsumexp(logits)^2) (Zoph et al., 2022): keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class SoftmaxTopKRouter(nn.Module):
    """Mixtral's router: softmax over all experts, keep the top k, renormalise them to sum to one.

    Runs in fp32 (or fp64) whatever the autocast dtype: top-k choices flip on bf16 rounding. Returns
    (expert_idx (N, k), weights (N, k), aux) where aux holds the balancing loss, the z-loss and
    the per-expert assignment counts of this batch."""

    def __init__(self, dim: int, n_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k ({top_k}) must be between 1 and n_experts ({n_experts})")
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean logits, the logits routing uses): the same here."""
        clean = F.linear(x, self.gate.weight.to(x.dtype))
        return clean, clean

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            clean, routing = self.logits(x)
            probs = routing.softmax(dim=-1)
        expert_idx = top_k_indices(probs, self.top_k)
        weights = probs.gather(-1, expert_idx)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = expert_counts(expert_idx, self.n_experts)
        aux = {"balance": switch_balance_loss(probs, counts), "z": router_z_loss(clean), "counts": counts.detach()}
        return expert_idx, weights, aux


class NoisyTopKRouter(SoftmaxTopKRouter):
    """Noisy top-k gating (Shazeer et al., 2017): in training, logits + N(0, 1) * softplus(x W_noise).

    The learned noise spreads tokens over experts early in training; evaluation and generation
    route on the clean logits, deterministically."""

    def __init__(self, dim: int, n_experts: int, top_k: int):
        super().__init__(dim, n_experts, top_k)
        self.noise = nn.Linear(dim, n_experts, bias=False)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return super().logits(x)
        # gate and noise as one matmul: x (fp32, tokens x dim) is read once, and backward has one
        # matmul for its gradient instead of two and their sum
        weight = torch.cat([self.gate.weight, self.noise.weight]).to(x.dtype)
        clean, noise_logits = F.linear(x, weight).split(self.n_experts, dim=-1)
        return clean, clean + torch.randn_like(clean) * F.softplus(noise_logits)


def drop_over_capacity(expert_idx: torch.Tensor, weights: torch.Tensor, n_experts: int,
                       capacity_factor: float) -> torch.Tensor:
    """Zero the weights of the assignments beyond each expert's capacity, ceil(cf * N * k / E).

    Within an expert the highest-weighted assignments are kept. Shapes stay static: a dropped
    assignment still flows through its expert, with weight 0, so it adds nothing to the output."""
    flat_idx, flat_w = expert_idx.reshape(-1), weights.reshape(-1)
    capacity = math.ceil(capacity_factor * flat_idx.numel() / n_experts)
    # two stable sorts = sort by expert, then by descending weight within each expert
    by_weight = flat_w.argsort(descending=True, stable=True)
    order = by_weight[flat_idx[by_weight].argsort(stable=True)]
    sorted_idx = flat_idx[order]
    starts = torch.searchsorted(sorted_idx, torch.arange(n_experts, device=flat_idx.device, dtype=flat_idx.dtype))
    rank = torch.arange(flat_idx.numel(), device=flat_idx.device) - starts[sorted_idx]
    keep = torch.empty_like(rank, dtype=torch.bool)
    keep[order] = rank < capacity
    return (flat_w * keep).view_as(weights)


class MoEFeedForward(nn.Module):
    """The feed-forward of an MoE block: route each token, run its experts, sum them weighted.

    In training the router's aux dict of the last forward is kept in `self.aux` for the model's
    aux_loss() and train_metrics()."""

    def __init__(self, router: SoftmaxTopKRouter, experts: GroupedExperts, capacity_factor: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        self.router, self.experts = router, experts
        self.capacity_factor = capacity_factor
        self.dropout = nn.Dropout(dropout)
        self.aux: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        expert_idx, weights, aux = self.router(x)
        if self.capacity_factor > 0:
            weights = drop_over_capacity(expert_idx, weights, self.router.n_experts, self.capacity_factor)
        if self.training:
            self.aux = aux
        return self.dropout(self.experts(x, expert_idx, weights).view(shape))


def inactive_expert_params(model: nn.Module) -> int:
    """Expert weights a token does not use: (E - k) / E of every MoE layer's experts."""
    n = 0
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            E, k = m.router.n_experts, m.router.top_k
            n += sum(p.numel() for p in m.experts.parameters()) * (E - k) // E
    return n


def moe_aux_loss(model: nn.Module, balance_weight: float, z_weight: float) -> torch.Tensor | None:
    """balance_weight * mean over MoE layers of the balancing loss + z_weight * mean of the z-loss,
    from the last training forward (None before the first one).

    The mean keeps a weight's meaning independent of depth."""
    auxes = [m.aux for m in model.modules() if isinstance(m, MoEFeedForward) and m.aux]
    if not auxes:
        return None
    balance = torch.stack([a["balance"] for a in auxes]).mean()
    z = torch.stack([a["z"] for a in auxes]).mean()
    return balance_weight * balance + z_weight * z


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """The last training forward's routing, for the log: the two losses (unweighted), the worst
    layer's max/mean expert load (1 = balanced, E / k = every token on the same k experts) and each expert's
    share of the assignments averaged over layers."""
    auxes = [m.aux for m in model.modules() if isinstance(m, MoEFeedForward) and m.aux]
    if not auxes:
        return {}
    counts = torch.stack([a["counts"] for a in auxes]).float()
    share = counts / counts.sum(dim=-1, keepdim=True)
    metrics = {
        "aux_loss": torch.stack([a["balance"] for a in auxes]).mean().item(),
        "z_loss": torch.stack([a["z"] for a in auxes]).mean().item(),
        "load_max_over_mean": (share.max(dim=-1).values * share.size(-1)).max().item(),
    }
    metrics.update({f"expert_share_{e}": s for e, s in enumerate(share.mean(dim=0).tolist())})
    return metrics
