"""Position information: rotary embeddings (RoPE), learned and sinusoidal absolute positions."""
import math

import torch
import torch.nn as nn

from smolhub.kernels import triton_available


def token_positions(start_pos: int | torch.Tensor, seq_len: int, device) -> torch.Tensor:
    """Positions of `seq_len` tokens from start_pos: (seq_len,) for an int or a 0-d tensor; (B, seq_len)
    for a (B,) tensor, row b's tokens at start_pos[b] .. start_pos[b] + seq_len - 1 (rows of a batch
    decoded together, each at its own position)."""
    offsets = torch.arange(seq_len, device=device)
    if not isinstance(start_pos, torch.Tensor) or start_pos.dim() == 0:
        return start_pos + offsets
    if start_pos.dim() != 1:
        raise ValueError(f"start_pos must be an int, a 0-d tensor or one position per row (B,), "
                         f"got shape {tuple(start_pos.shape)}")
    return start_pos[:, None] + offsets


def per_row(start_pos: int | torch.Tensor) -> bool:
    """Whether start_pos gives each row of the batch its own position (a (B,) tensor)."""
    return isinstance(start_pos, torch.Tensor) and start_pos.dim() == 1


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
        """cos/sin (T, D), or (B, T, D) for per-row positions (a (B,) start_pos)."""
        if isinstance(start_pos, torch.Tensor):  # compiled decoding: a gather keeps the shapes static
            positions = token_positions(start_pos, seq_len, self.cos.device)  # (T,), or (B, T) per row
            return self.cos[positions], self.sin[positions]
        if start_pos + seq_len > self.cos.size(0):
            raise ValueError(f"positions up to {start_pos + seq_len} exceed the RoPE table ({self.cos.size(0)})")
        return self.cos[start_pos:start_pos + seq_len], self.sin[start_pos:start_pos + seq_len]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (B, T, D) for per-token positions (B, T): documents packed in a row restart at 0."""
        return self.cos[positions], self.sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D) with cos/sin (T, D), or x: (B, T, H, D) with cos/sin (T, 1, D); per-token
    positions give cos/sin a leading batch dimension, (B, 1, T, D) or (B, T, 1, D)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def _rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The rotation of smolhub.kernels.rotary in torch, in fp32 at least: x (B, T, H, D), cos/sin (T, D)
    or (B, T, D). inverse applies its transpose, x cos - rotate_half(x sin): how a gradient flows back
    through it."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x32, cos, sin = x.to(dtype), cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)
    y = x32 * cos - rotate_half(x32 * sin) if inverse else apply_rotary(x32, cos, sin)
    return y.to(x.dtype)


def _rotary_kernel_runs(x: torch.Tensor, head_dim: int) -> bool:
    """Whether smolhub.kernels.rotary takes x: CUDA with triton, a dtype whose math fp32 covers (not
    float64), and head_dim / 2 a power of 2 (one block of columns per half)."""
    half = head_dim // 2
    return triton_available(x) and x.dtype != torch.float64 and half & (half - 1) == 0


@torch.library.custom_op("smolhub::rotary_qkv", mutates_args=())
def _rotary_qkv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int,
                   n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, width = qkv.shape
    head_dim = width // (n_head + 2 * n_kv)
    if _rotary_kernel_runs(qkv, head_dim):
        from smolhub.kernels.rotary import rotary_qkv

        if cos.dim() == 3:  # per-token positions: as one row of B * T tokens, token t reads row t
            q, k, v = rotary_qkv(qkv.contiguous().view(1, B * T, width), cos.reshape(B * T, head_dim),
                                 sin.reshape(B * T, head_dim), n_head, n_kv)
            return q.view(B, T, n_head, head_dim), k.view(B, T, n_kv, head_dim), v.view(B, T, n_kv, head_dim)
        return rotary_qkv(qkv.contiguous(), cos, sin, n_head, n_kv)
    q, k, v = qkv.view(B, T, n_head + 2 * n_kv, head_dim).split([n_head, n_kv, n_kv], dim=2)
    # a copy even where the slice is contiguous already (a single token): an op's output must not alias its input
    v = v.clone(memory_format=torch.contiguous_format)
    return _rotate_halves(q, cos, sin, False), _rotate_halves(k, cos, sin, False), v


@_rotary_qkv_op.register_fake
def _(qkv, cos, sin, n_head, n_kv):
    B, T, width = qkv.shape
    head_dim = width // (n_head + 2 * n_kv)
    return (qkv.new_empty(B, T, n_head, head_dim), qkv.new_empty(B, T, n_kv, head_dim),
            qkv.new_empty(B, T, n_kv, head_dim))


@torch.library.custom_op("smolhub::rotary_qkv_backward", mutates_args=())
def _rotary_qkv_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> torch.Tensor:
    if _rotary_kernel_runs(grad_q, grad_q.size(-1)):
        from smolhub.kernels.rotary import rotary_qkv_backward

        if cos.dim() == 3:  # per-token positions, as in the forward: one long row
            B, T = grad_q.shape[:2]
            grad = rotary_qkv_backward(grad_q.flatten(0, 1)[None], grad_k.flatten(0, 1)[None],
                                       grad_v.flatten(0, 1)[None], cos.flatten(0, 1), sin.flatten(0, 1))
            return grad.view(B, T, -1)
        return rotary_qkv_backward(grad_q, grad_k, grad_v, cos, sin)
    grads = (_rotate_halves(grad_q, cos, sin, True), _rotate_halves(grad_k, cos, sin, True), grad_v)
    return torch.cat(grads, dim=2).flatten(2)


@_rotary_qkv_backward_op.register_fake
def _(grad_q, grad_k, grad_v, cos, sin):
    B, T, n_head, head_dim = grad_q.shape
    return grad_q.new_empty(B, T, (n_head + 2 * grad_k.size(2)) * head_dim)


def _rotary_qkv_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rotary_qkv_grad(ctx, grad_q, grad_k, grad_v):
    cos, sin = ctx.saved_tensors
    return _rotary_qkv_backward_op(grad_q, grad_k, grad_v, cos, sin), None, None, None, None


_rotary_qkv_op.register_autograd(_rotary_qkv_grad, setup_context=_rotary_qkv_setup)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int,
               n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection qkv (B, T, (n_head + 2 n_kv) D) -> q (B, T, n_head, D) and k (B, T, n_kv, D)
    with RoPE applied for the positions of cos/sin (T, D) (or (B, T, D), per token), and v (B, T, n_kv, D).

    The value of splitting and calling apply_rotary, computed in fp32. On CUDA one Triton kernel
    each way (smolhub.kernels.rotary), which torch.compile sees as one opaque op: the split, the
    rotation and the gradients' concatenation are one pass over memory in each direction."""
    return _rotary_qkv_op(qkv, cos, sin, n_head, n_kv)


class LearnedPositionalEmbedding(nn.Embedding):
    """GPT-2's learned absolute positions: one trained vector per position up to the context length."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__(max_seq_len, dim)

    def forward(self, start_pos: int | torch.Tensor, seq_len: int) -> torch.Tensor:
        """(T, dim), or (B, T, dim) for per-row positions (a (B,) start_pos)."""
        if not isinstance(start_pos, torch.Tensor) and start_pos + seq_len > self.num_embeddings:
            raise ValueError(f"sequence reaches position {start_pos + seq_len}, beyond the "
                             f"{self.num_embeddings} learned positions (the context length)")
        return super().forward(token_positions(start_pos, seq_len, self.weight.device))

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) for per-token positions (B, T): documents packed in a row restart at 0."""
        return super().forward(positions)


class SinusoidalPositionalEmbedding(nn.Module):
    """The fixed sin/cos positions of "Attention Is All You Need": no parameters, the same limit as
    the learned table (positions up to the context length)."""

    def __init__(self, max_seq_len: int, dim: int):
        super().__init__()
        pos = torch.arange(max_seq_len, dtype=torch.float64)[:, None]
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_seq_len, dim, dtype=torch.float64)
        table[:, 0::2] = torch.sin(pos * div)
        table[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
        self.register_buffer("table", table.float(), persistent=False)

    def forward(self, start_pos: int | torch.Tensor, seq_len: int) -> torch.Tensor:
        """(T, dim), or (B, T, dim) for per-row positions (a (B,) start_pos)."""
        if isinstance(start_pos, torch.Tensor):  # compiled decoding: a gather keeps the shapes static
            return self.table[token_positions(start_pos, seq_len, self.table.device)]
        if start_pos + seq_len > self.table.size(0):
            raise ValueError(f"sequence reaches position {start_pos + seq_len}, beyond the "
                             f"{self.table.size(0)} positions (the context length)")
        return self.table[start_pos:start_pos + seq_len]

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) for per-token positions (B, T): documents packed in a row restart at 0."""
        return self.table[positions]
