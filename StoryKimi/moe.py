"""DeepSeek-MoE feed-forward (DeepSeek-V3 section 2.1.2): sigmoid routing, a shared expert, and
auxiliary-loss-free load balancing.

    s_i     = sigmoid(u . e_i)                                  affinity of expert i, fp32
    chosen  = top-k of (s_i + b_i)                              b: per-expert balancing bias, a buffer
    g_i     = routed_scaling_factor * s_i / sum_chosen s_j      mixing weights: unbiased scores only
    y       = shared(u) + sum_chosen g_i * expert_i(u)

b never receives a gradient and enters only the choice of experts. After each optimizer step it
moves by `rate * sign(mean_load - load_i)`, counted in tokens over the step's micro-batches (and
summed over DDP ranks): an under-loaded expert becomes easier to pick, an over-loaded one harder.
A tiny sequence-wise balance loss (eq. 17-20) guards against imbalance within one sequence.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from smolhub.layers import GroupedExperts, SwiGLU, expert_counts, top_k_indices
from StoryKimi.config import StoryKimiConfig


class SigmoidRouter(nn.Module):
    def __init__(self, dim: int, n_experts: int, top_k: int, scaling: float = 1.0):
        super().__init__()
        self.n_experts, self.top_k, self.scaling = n_experts, top_k, scaling
        self.gate = nn.Linear(dim, n_experts, bias=False)
        # persistent: saved with the weights, so resumed runs and inference route as trained
        self.register_buffer("balance_bias", torch.zeros(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> scores (N, E), expert_idx (N, k), weights (N, k)."""
        with torch.autocast(x.device.type, enabled=False):  # bf16 rounding would flip top-k choices
            scores = torch.sigmoid(F.linear(x.float(), self.gate.weight.float()))
        expert_idx = top_k_indices(scores + self.balance_bias, self.top_k)
        weights = scores.gather(-1, expert_idx)
        return scores, expert_idx, self.scaling * weights / weights.sum(dim=-1, keepdim=True)


def sequence_balance_loss(scores: torch.Tensor, expert_idx: torch.Tensor, n_seq: int) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20, averaged over sequences: sum_i f_i P_i with
    f_i = E / (k T) * (tokens of the sequence routed to i) and P_i = mean over the sequence of s_i / sum_j s_j.
    It is 1 when every sequence spreads evenly over the experts."""
    n_experts, k = scores.size(-1), expert_idx.size(-1)
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(n_seq, -1, n_experts).mean(dim=1)
    chosen = F.one_hot(expert_idx, n_experts).sum(dim=1).view(n_seq, -1, n_experts).float()
    f = chosen.mean(dim=1) * n_experts / k
    return (f * probs).sum(dim=-1).mean()


class DeepSeekMoE(nn.Module):
    """Routed experts (GroupedExperts) plus always-on shared experts (one SwiGLU of n_shared x hidden)."""

    def __init__(self, config: StoryKimiConfig):
        super().__init__()
        c = config
        self.router = SigmoidRouter(c.n_embd, c.n_routed_experts, c.top_k, c.routed_scaling_factor)
        self.experts = GroupedExperts(c.n_routed_experts, c.n_embd, c.expert_hidden, c.experts_kernel)
        self.shared = SwiGLU(c.n_embd, c.n_shared_experts * c.expert_hidden) if c.n_shared_experts else None
        self.dropout = nn.Dropout(c.dropout)
        self.with_seq_loss = c.seq_aux_loss_weight > 0
        # Kept as plain attributes, not buffers: DDP would overwrite buffers from rank 0 at every forward.
        # Gradient checkpointing recounts every token once more in backward; the bias update uses
        # only the sign of (mean - load) and the log shares, so a uniform factor changes nothing.
        self.pending_load: torch.Tensor | None = None  # tokens per expert since the last bias update
        self.last_load: torch.Tensor | None = None  # the counts of the last update, for the log
        self.seq_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        scores, expert_idx, weights = self.router(flat)
        y = self.experts(flat, expert_idx, weights)
        if self.shared is not None:
            y = y + self.shared(flat)
        if self.training:
            load = expert_counts(expert_idx, self.router.n_experts)
            self.pending_load = load if self.pending_load is None else self.pending_load + load
            if self.with_seq_loss:
                self.seq_loss = sequence_balance_loss(scores, expert_idx, B)
        return self.dropout(y.view(B, T, D))

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing: load (E,) = tokens routed to each expert since the last update."""
        load = load.float()
        self.router.balance_bias += rate * torch.sign(load.mean() - load)
        self.last_load = load
        self.pending_load = None
