"""Position information: rotary embeddings (RoPE), learned and sinusoidal absolute positions."""
import math

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al., 2021) in the rotate-half layout that HF Llama/Mixtral use.

    Dimension i of the first half and dimension i of the second half form one rotated pair, with
    frequency theta^(-2i/d). cos/sin are precomputed in fp32 for `max_seq_len` positions.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, start_pos: int | torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(start_pos, torch.Tensor):  # compiled decoding: a gather keeps the shapes static
            positions = start_pos + torch.arange(seq_len, device=self.cos.device)
            return self.cos[positions], self.sin[positions]
        if start_pos + seq_len > self.cos.size(0):
            raise ValueError(f"positions up to {start_pos + seq_len} exceed the RoPE table ({self.cos.size(0)})")
        return self.cos[start_pos:start_pos + seq_len], self.sin[start_pos:start_pos + seq_len]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D) with cos/sin (T, D), or x: (B, T, H, D) with cos/sin (T, 1, D)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class LearnedPositionalEmbedding(nn.Embedding):
    """GPT-2's learned absolute positions: one trained vector per position up to the context length."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__(max_seq_len, dim)

    def forward(self, start_pos: int | torch.Tensor, seq_len: int) -> torch.Tensor:
        if not isinstance(start_pos, torch.Tensor) and start_pos + seq_len > self.num_embeddings:
            raise ValueError(f"sequence reaches position {start_pos + seq_len}, beyond the "
                             f"{self.num_embeddings} learned positions (the context length)")
        pos = start_pos + torch.arange(seq_len, device=self.weight.device)
        return super().forward(pos)


class SinusoidalPositionalEmbedding(nn.Module):
    """The fixed sin/cos positions of "Attention Is All You Need"."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        pos = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_seq_len, dim, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos * div)
        table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, start_pos: int, seq_len: int) -> torch.Tensor:
        if start_pos + seq_len > self.table.size(0):
            raise ValueError(f"positions up to {start_pos + seq_len} exceed the table ({self.table.size(0)})")
        return self.table[start_pos:start_pos + seq_len]
