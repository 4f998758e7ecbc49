"""Causal self-attention (MHA / GQA / MQA by `n_kv_heads`) through scaled_dot_product_attention."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from smolhub.layers.positions import apply_rotary


class KVCache:
    """Preallocated keys and values of one layer, (batch, n_kv_heads, max_len, head_dim).

    Preallocation keeps decoding free of reallocations (and its shapes static)."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v for positions [start_pos, start_pos + T) and return all keys/values so far."""
        end = start_pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_mask(q_len: int, k_len: int, start_pos: int, device) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where query at start_pos + i may see key j (j <= start_pos + i)."""
    q_pos = torch.arange(start_pos, start_pos + q_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= q_pos


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, dropout_p: float = 0.0,
           scale: float | None = None) -> torch.Tensor:
    """Causal SDPA for queries at positions start_pos.. over keys at positions 0.. .

    The three cases keep the fast kernels where possible: a fresh sequence uses is_causal, one new
    token sees every cached key (no mask), and only a chunk appended to a cache needs a mask.
    """
    q_len, k_len = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    mask = None if q_len == 1 else causal_mask(q_len, k_len, start_pos, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                          enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads shared by groups of query heads.

    n_kv_heads == n_head is MHA, 1 is MQA, anything dividing n_head in between is GQA. q, k and v
    come from one fused projection; RoPE is applied when the caller passes (cos, sin).
    """

    def __init__(self, dim: int, n_head: int, n_kv_heads: int | None = None, bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        n_kv_heads = n_kv_heads or n_head
        if n_head % n_kv_heads:
            raise ValueError(f"n_head ({n_head}) must be divisible by n_kv_heads ({n_kv_heads})")
        self.n_head, self.n_kv_heads, self.head_dim = n_head, n_kv_heads, dim // n_head
        self.qkv = nn.Linear(dim, (n_head + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.out = nn.Linear(n_head * self.head_dim, dim, bias=bias)
        self.out.residual_init = True
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)
        y = attend(q, k, v, start_pos, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.out(y))
