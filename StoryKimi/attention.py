"""Multi-head latent attention (MLA, DeepSeek-V2 section 2.1), with Kimi K2's QK-clip.

Keys and values are not projected per head from the input: the input is compressed to one small
latent c = RMSNorm(W_dkv x) of `kv_lora_rank` numbers, and each head's key and value are
up-projections of it (k_nope = W_uk c, v = W_uv c). RoPE cannot pass through that compression, so
position travels on extra "decoupled" dimensions: each head's query has `qk_rope_head_dim` rotary
dims, and one rotary key of that size, projected from the input, is shared by all heads.

    q_h = [q_nope_h, RoPE(q_rope_h)]          k_h = [W_uk_h c, RoPE(k_rope)]          v_h = W_uv_h c
    softmax scale 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)

The KV cache holds only c and RoPE(k_rope): kv_lora_rank + qk_rope_head_dim numbers per token and
layer (144 here, against 2 x 8 x 48 = 768 for the same heads in plain MHA). Decoding with the cache
uses the absorbed form: W_uk folds into the query and W_uv into the output, so attention runs
directly over the cached latents, as multi-query attention with one shared 144-dim key and a
128-dim value (the latent itself). Training and cache-free calls decompress keys and values and
use ordinary per-head attention. Both forms are the same function (tests/test_storykimi.py).

RoPE layout: rotate-half (as HF Llama), on the rope dims only. transformers' DeepseekV3 defaults to
`rope_interleave=True` (pairs (0,1), (2,3), ...): an exporter permutes the rope rows of the query
and of W_dkv, or sets rope_interleave=False.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from smolhub.layers import (DocumentMask, RMSNorm, apply_rotary, attend, causal_mask, per_row, token_positions,
                            write_rows)
from StoryKimi.config import StoryKimiConfig


class MLACache:
    """Per layer: the normed kv latents (B, max_len, kv_lora_rank) and rotated shared keys (B, max_len, rope).

    Those two tensors (vars(cache), batch first) are the whole state, as for smolhub's KVCache."""

    static_positions = True  # takes start_pos as a device tensor: CUDA-graph decoding can use it

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.latent = torch.zeros(batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(batch_size, max_len, rope_dim, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.latent.size(1)

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor,
               start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store positions [start_pos, start_pos + T) and return everything cached so far (the whole
        buffer when start_pos is a tensor: `attend` then masks the positions not yet written). A (B,)
        start_pos writes each row at its own positions."""
        if per_row(start_pos):
            positions = token_positions(start_pos, latent.size(1), latent.device)
            write_rows(self.latent, 1, positions, latent)
            write_rows(self.k_rope, 1, positions, k_rope)
            return self.latent, self.k_rope
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(latent.size(1), device=latent.device)
            # in the cache's dtype, as the slice assignment below stores (autocast makes these bf16)
            self.latent.index_copy_(1, positions, latent.to(self.latent.dtype))
            self.k_rope.index_copy_(1, positions, k_rope.to(self.k_rope.dtype))
            return self.latent, self.k_rope
        end = start_pos + latent.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.latent[:, start_pos:end] = latent
        self.k_rope[:, start_pos:end] = k_rope
        return self.latent[:, :end], self.k_rope[:, :end]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: StoryKimiConfig):
        super().__init__()
        c = config
        self.n_head, self.kv_lora_rank = c.n_head, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = self.qk_dim ** -0.5
        if c.q_lora_rank:
            self.wq_a = nn.Linear(c.n_embd, c.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.wq_b = nn.Linear(c.q_lora_rank, c.n_head * self.qk_dim, bias=False)
        else:
            self.wq = nn.Linear(c.n_embd, c.n_head * self.qk_dim, bias=False)
        self.wkv_a = nn.Linear(c.n_embd, c.kv_lora_rank + self.rope_dim, bias=False)  # W_dkv and the rotary key
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.norm_eps)
        self.wkv_b = nn.Linear(c.kv_lora_rank, c.n_head * (self.nope_dim + self.v_dim), bias=False)  # W_uk, W_uv
        self.wo = nn.Linear(c.n_head * self.v_dim, c.n_embd, bias=False)
        self.wo.residual_init = True
        self.dropout = c.dropout
        self.resid_dropout = nn.Dropout(c.dropout)
        self.track_max_logit = c.qk_clip_threshold > 0
        self.max_logit: torch.Tensor | None = None  # per head, over the training forwards since the last step

    @property
    def q_weight(self) -> torch.Tensor:
        """The weight whose output rows are the per-head queries: rows h*qk_dim .. (h+1)*qk_dim are head h."""
        return self.wq_b.weight if hasattr(self, "wq_b") else self.wq.weight

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: MLACache | None = None, start_pos: int | torch.Tensor = 0,
                documents: DocumentMask | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_b") else self.wq(x)
        q_nope, q_rope = q.view(B, T, self.n_head, self.qk_dim).transpose(1, 2).split(
            [self.nope_dim, self.rope_dim], dim=-1)
        cos, sin = (t.unsqueeze(-3) for t in rope)  # (1 or B, 1, T, rope): the same rotation for every head
        q_rope = apply_rotary(q_rope, cos, sin)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        k_rope = apply_rotary(k_rope[:, None], cos, sin)  # (B, 1, T, rope): one rotary key for all heads
        if kv_cache is None:
            y = self.attend_decompressed(q_nope, q_rope, latent, k_rope, start_pos, documents)
        else:
            latent, k_rope = kv_cache.update(latent, k_rope[:, 0], start_pos)
            y = self.attend_absorbed(q_nope, q_rope, latent, k_rope, start_pos)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim)
        return self.resid_dropout(self.wo(y))

    def attend_decompressed(self, q_nope, q_rope, latent, k_rope, start_pos: int,
                            documents: DocumentMask | None = None) -> torch.Tensor:
        """Per-head keys and values from the latent, then ordinary attention (training, prefill without cache)."""
        B, S, _ = latent.shape
        k_nope, v = self.wkv_b(latent).view(B, S, self.n_head, self.nope_dim + self.v_dim).transpose(1, 2).split(
            [self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_head, -1, -1)], dim=-1)
        if self.track_max_logit and self.training:
            self.record_max_logit(q, k, start_pos, documents)
        # Flash attention needs equal q/k/v head dims: pad v with zeros and drop them after.
        v = F.pad(v, (0, self.qk_dim - self.v_dim)) if self.v_dim < self.qk_dim else v
        y = attend(q, k, v, start_pos, dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                   documents=documents)
        return y[..., :self.v_dim]

    def attend_absorbed(self, q_nope, q_rope, latent, k_rope, start_pos: int | torch.Tensor) -> torch.Tensor:
        """Attention straight over the cached latents: q_nope.k_nope = (W_uk^T q_nope).c, and W_uv applied after."""
        w = self.wkv_b.weight.view(self.n_head, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.nope_dim], w[:, self.nope_dim:]  # (H, nope, rank), (H, v, rank)
        q = torch.cat([q_nope @ w_uk, q_rope], dim=-1)  # (B, H, T, rank + rope)
        k = torch.cat([latent, k_rope], dim=-1)[:, None]  # (B, 1, S, rank + rope), shared by all heads
        y = attend(q, k, latent[:, None], start_pos, scale=self.scale)  # (B, H, T, rank)
        return y @ w_uv.mT  # (B, H, T, v)

    @torch.no_grad()
    def record_max_logit(self, q: torch.Tensor, k: torch.Tensor, start_pos: int,
                         documents: DocumentMask | None = None) -> None:
        """The largest pre-softmax logit of each head (what QK-clip needs; SDPA does not expose it),
        over the pairs that attention sees."""
        logits = (q @ k.mT).float() * self.scale
        visible = causal_mask(q.size(2), k.size(2), start_pos, q.device) if documents is None else documents.visible()
        logits = logits.masked_fill(~visible, float("-inf"))
        peak = logits.amax(dim=(0, 2, 3))
        self.max_logit = peak if self.max_logit is None else torch.maximum(self.max_logit, peak)

    @torch.no_grad()
    def qk_clip(self, max_logit: torch.Tensor, threshold: float) -> None:
        """Kimi K2's MuonClip for MLA: for each head over the threshold, gamma = threshold / max_logit scales
        q_nope and k_nope by sqrt(gamma) and q_rope by gamma; the shared rotary key is left alone so that
        one head's clip does not touch the others."""
        gamma = (threshold / max_logit).clamp(max=1.0).to(self.q_weight.dtype)
        q = self.q_weight.view(self.n_head, self.qk_dim, -1)
        q[:, :self.nope_dim] *= gamma.sqrt()[:, None, None]
        q[:, self.nope_dim:] *= gamma[:, None, None]
        kv = self.wkv_b.weight.view(self.n_head, self.nope_dim + self.v_dim, -1)
        kv[:, :self.nope_dim] *= gamma.sqrt()[:, None, None]
