"""RoPE on a fused q/k/v projection on CUDA: one program per token reads its projection row once and
writes rotated q and k and a copy of v; backward reads the three gradients once and writes the
projection's gradient row, un-rotating q and k on the way.

Left to torch.compile, the backward of "split the projection, rotate q and k, transpose for
attention" became one fused kernel that ran at ~0.45 TB/s on an H100 (3 ms per StoryLlama step);
here each direction moves each element once in each way, in rows of contiguous memory.

Rotate-half layout, as smolhub.layers.positions.apply_rotary: with x = [x1, x2] split at D/2,
    y1 = x1 cos_a - x2 sin_a        y2 = x2 cos_b + x1 sin_b
where cos = [cos_a, cos_b] and sin = [sin_a, sin_b] are the table's row for the token's position.
The arithmetic is fp32; inputs and outputs keep their dtype."""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(src, dst, offsets, mask, ca, cb, sa, sb, HALF: tl.constexpr, INVERSE: tl.constexpr):
    """Rotate the heads at `offsets` of src into dst; INVERSE applies the transpose of the rotation,
    which is how a gradient flows back through it."""
    x1 = tl.load(src + offsets, mask=mask).to(tl.float32)
    x2 = tl.load(src + offsets + HALF, mask=mask).to(tl.float32)
    if INVERSE:
        y1, y2 = x1 * ca + x2 * sb, x2 * cb - x1 * sa
    else:
        y1, y2 = x1 * ca - x2 * sa, x2 * cb + x1 * sb
    tl.store(dst + offsets, y1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + offsets + HALF, y2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(src, dst, offsets, mask, HALF: tl.constexpr):
    tl.store(dst + offsets, tl.load(src + offsets, mask=mask), mask=mask)
    tl.store(dst + offsets + HALF, tl.load(src + offsets + HALF, mask=mask), mask=mask)


@triton.jit
def _rotary_qkv(src_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, seq_len, src_row_stride,
                N_HEAD: tl.constexpr, N_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                Q_PAD: tl.constexpr, KV_PAD: tl.constexpr, INVERSE: tl.constexpr):
    """Forward (INVERSE=False): src = the projection row, q/k/v = outputs.
    Backward (INVERSE=True): q/k/v = the incoming gradients, src = the projection's gradient (output)."""
    row = tl.program_id(0).to(tl.int64)
    t = row % seq_len
    HALF: tl.constexpr = HEAD_DIM // 2
    cols = tl.arange(0, HALF)[None, :]
    ca = tl.load(cos_ptr + t * HEAD_DIM + cols).to(tl.float32)
    cb = tl.load(cos_ptr + t * HEAD_DIM + HALF + cols).to(tl.float32)
    sa = tl.load(sin_ptr + t * HEAD_DIM + cols).to(tl.float32)
    sb = tl.load(sin_ptr + t * HEAD_DIM + HALF + cols).to(tl.float32)
    q_heads = tl.arange(0, Q_PAD)[:, None]
    kv_heads = tl.arange(0, KV_PAD)[:, None]
    q_mask, kv_mask = q_heads < N_HEAD, kv_heads < N_KV
    q_off, kv_off = q_heads * HEAD_DIM + cols, kv_heads * HEAD_DIM + cols
    q_src = src_ptr + row * src_row_stride
    k_src = q_src + N_HEAD * HEAD_DIM
    v_src = k_src + N_KV * HEAD_DIM
    q_row = q_ptr + row * (N_HEAD * HEAD_DIM)
    k_row = k_ptr + row * (N_KV * HEAD_DIM)
    v_row = v_ptr + row * (N_KV * HEAD_DIM)
    if INVERSE:
        _rotate_heads(q_row, q_src, q_off, q_mask, ca, cb, sa, sb, HALF, True)
        _rotate_heads(k_row, k_src, kv_off, kv_mask, ca, cb, sa, sb, HALF, True)
        _copy_heads(v_row, v_src, kv_off, kv_mask, HALF)
    else:
        _rotate_heads(q_src, q_row, q_off, q_mask, ca, cb, sa, sb, HALF, False)
        _rotate_heads(k_src, k_row, kv_off, kv_mask, ca, cb, sa, sb, HALF, False)
        _copy_heads(v_src, v_row, kv_off, kv_mask, HALF)


def _launch(src, q, k, v, cos, sin, inverse: bool) -> None:
    B, T, n_head, head_dim = q.shape
    n_kv = k.size(2)
    _rotary_qkv[(B * T,)](src, q, k, v, cos, sin, T, src.stride(1), N_HEAD=n_head, N_KV=n_kv, HEAD_DIM=head_dim,
                          Q_PAD=triton.next_power_of_2(n_head), KV_PAD=triton.next_power_of_2(n_kv),
                          INVERSE=inverse, num_warps=4)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int,
               n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (n_head + 2 n_kv) D), rows contiguous; cos/sin (T, D) -> rotated q (B, T, n_head, D),
    rotated k and v (B, T, n_kv, D), contiguous."""
    B, T, width = qkv.shape
    head_dim = width // (n_head + 2 * n_kv)
    q = qkv.new_empty(B, T, n_head, head_dim)
    k, v = qkv.new_empty(B, T, n_kv, head_dim), qkv.new_empty(B, T, n_kv, head_dim)
    _launch(qkv, q, k, v, cos.contiguous(), sin.contiguous(), inverse=False)
    return q, k, v


def rotary_qkv_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    """The gradient of rotary_qkv's input from those of its three outputs."""
    B, T, n_head, head_dim = grad_q.shape
    grad_qkv = grad_q.new_empty(B, T, (n_head + 2 * grad_k.size(2)) * head_dim)
    _launch(grad_qkv, grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous(), cos.contiguous(),
            sin.contiguous(), inverse=True)
    return grad_qkv
