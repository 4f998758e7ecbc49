"""Mixture-of-experts SwiGLU experts in Triton matmuls that read each token where it lies.

torch's grouped GEMM needs each expert's rows contiguous, so the grouped path of GroupedExperts copies
every token k times into expert order before the first matmul, runs the SwiGLU as a kernel of its own
between the matmuls and copies the outputs back to (token, slot) order after the second; backward does
the same in reverse. On an H100 those copies take ~3.3 ms and the SwiGLU ~3.2 ms of SmolMixtral's
38 ms compiled step. Here they happen inside the matmuls: a program loads its rows of x through the
sort order, the first matmul's epilogue writes silu(gate) * up, and the second writes each output row
at its (token, slot) place. The layout follows ScatterMoE (Tan et al., 2024, arXiv:2403.08245).

Rows are assignments: token n's slot j is assignment n*k + j, and `order` lists the assignments grouped
by expert (a stable sort of the flat expert indices); expert e's rows of `order` end at expert_ends[e].
A row program takes up to BLOCK_M consecutive rows of one expert. The grid has a program for each
possible tile, cdiv(M, BLOCK_M) + E of them, and those past the last tile return at once: the grid
depends on shapes only, so a step that uses these kernels is capturable in a CUDA graph.
"""
import torch
import triton
import triton.language as tl

PLAIN, SWIGLU, SWIGLU_BACKWARD = 0, 1, 2  # what the row kernel does with its accumulator: its epilogue
WEIGHT_GRAD = 3  # the weight-gradient kernel, in CONFIGS

# Launch configurations: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the row kernel for each
# epilogue, and (BLOCK_P, BLOCK_Q, BLOCK_K, num_warps, num_stages) of the weight-gradient kernel;
# `benchmarks.layer_speed --parts moe_tune` times the candidates; these won on an H100 (2026-12-07) among
# those within an Ada card's 99 KiB of shared memory (128 x 256 tiles, at 144 KiB, ran the two plain
# launches 4% and 18% faster). The SwiGLU epilogues hold twice the accumulator's values (gate and up),
# hence their narrower BLOCK_N; the backward one's configurations that spill registers
# (tests/triton_aot.py) ran at a quarter of its best.
CONFIGS = {PLAIN: (128, 128, 64, 8, 3), SWIGLU: (128, 64, 64, 8, 3), SWIGLU_BACKWARD: (64, 64, 64, 4, 3),
           WEIGHT_GRAD: (128, 128, 64, 8, 3)}


@triton.jit
def _expert_rows(expert, expert_ends_ptr):
    """(first, end) row of `expert` in the sorted order."""
    end = tl.load(expert_ends_ptr + expert)
    start = tl.load(expert_ends_ptr + tl.maximum(expert - 1, 0))
    return tl.where(expert > 0, start, 0), end


@triton.jit
def _rows_kernel(a_ptr, a_rows_ptr, w_ptr, out_ptr, out_rows_ptr, pre_ptr, expert_ends_ptr,
                 K, N, stride_am, stride_ak, stride_we, stride_wk, stride_wn, stride_om, stride_pm,
                 N_EXPERTS: tl.constexpr, EXPERTS_POW2: tl.constexpr, GATHER: tl.constexpr,
                 SCATTER: tl.constexpr, SWIGLU_OUT: tl.constexpr, SWIGLU_GRAD: tl.constexpr, EVEN_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[row] = epilogue(a[a_rows[row]] @ w[expert of row]) for BLOCK_M sorted rows of one expert.

    SWIGLU_OUT: w holds [gate | up] side by side (up at column offset N); pre gets both halves
    (for backward) and out gets silu(gate) * up. SWIGLU_GRAD: the accumulator is the gradient of
    silu(gate) * up, and out gets the gradients of both halves of pre, side by side. Neither: out gets
    the product, at row out_rows[row] with SCATTER."""
    # the column tiles of one row tile are neighbours in launch order: running together, they read
    # that tile of `a` from HBM about once, and the expert's weights (a few MB) stay in L2
    tile = tl.program_id(1)
    # which expert's rows this tile holds: every program counts the experts' tiles itself (E values),
    # which saves the launches of a tile table per matmul
    experts = tl.arange(0, EXPERTS_POW2)
    valid = experts < N_EXPERTS
    ends = tl.load(expert_ends_ptr + experts, mask=valid, other=0)
    starts = tl.load(expert_ends_ptr + experts - 1, mask=valid & (experts > 0), other=0)
    tiles = tl.where(valid, tl.cdiv(ends - starts, BLOCK_M), 0)
    tile_ends = tl.where(valid, tl.cumsum(tiles, axis=0), 2**30)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    if expert >= N_EXPERTS:  # past the last tile
        return
    mine = experts == expert
    start = tl.sum(tl.where(mine, starts, 0), axis=0)
    end = tl.sum(tl.where(mine, ends, 0), axis=0)
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), axis=0)
    rows = start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if GATHER:
        src = tl.load(a_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    mask = row_mask[:, None] & col_mask[None, :]
    if SWIGLU_GRAD:  # the epilogue's inputs, loaded before the loop so that their latency hides behind it
        pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
        gate_in = tl.load(pre_ptrs, mask=mask, other=0.0)
        up_in = tl.load(pre_ptrs + N, mask=mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            w_mask = col_mask[None, :]
        else:
            k_mask = k0 + ks < K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & col_mask[None, :]
        acc = tl.dot(a, tl.load(w_ptrs, mask=w_mask, other=0.0), acc)
        if SWIGLU_OUT:
            acc_up = tl.dot(a, tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0), acc_up)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    dtype = out_ptr.dtype.element_ty
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    if SWIGLU_OUT:
        pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
        tl.store(pre_ptrs, acc.to(dtype), mask=mask)
        tl.store(pre_ptrs + N, acc_up.to(dtype), mask=mask)
        tl.store(out_ptrs, (acc * tl.sigmoid(acc) * acc_up).to(dtype), mask=mask)
    elif SWIGLU_GRAD:
        gate, up = gate_in.to(tl.float32), up_in.to(tl.float32)
        sig = tl.sigmoid(gate)
        tl.store(out_ptrs, (acc * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)
        tl.store(out_ptrs + N, (acc * gate * sig).to(dtype), mask=mask)
    else:
        if SCATTER:
            dst = tl.load(out_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
            out_ptrs = out_ptr + dst[:, None] * stride_om + cols[None, :]
        tl.store(out_ptrs, acc.to(dtype), mask=mask)


@triton.jit
def _weight_grad_kernel(a_ptr, a_rows_ptr, b_ptr, b_rows_ptr, out_ptr, expert_ends_ptr, P, Q,
                        stride_am, stride_ap, stride_bm, stride_bq, stride_oe, stride_op,
                        GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e] = a[a_rows[rows of e]]^T @ b[b_rows[rows of e]], (P, Q) for each expert e; zero for an
    expert without rows."""
    # launch order: q tiles, then p tiles, then experts, so that the programs running together share
    # an expert's rows and read them from HBM about once
    expert = tl.program_id(2)
    start, end = _expert_rows(expert, expert_ends_ptr)
    ps = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask, q_mask = ps < P, qs < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        row_mask = rows < end
        if GATHER_A:
            a_src = tl.load(a_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            a_src = rows.to(tl.int64)
        if GATHER_B:
            b_src = tl.load(b_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            b_src = rows.to(tl.int64)
        a = tl.load(a_ptr + a_src[None, :] * stride_am + ps[:, None] * stride_ap,
                    mask=row_mask[None, :] & p_mask[:, None], other=0.0)
        b = tl.load(b_ptr + b_src[:, None] * stride_bm + qs[None, :] * stride_bq,
                    mask=row_mask[:, None] & q_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ps[:, None] * stride_op + qs[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])


def _rows(a: torch.Tensor, a_rows: torch.Tensor | None, w: torch.Tensor, transpose_w: bool, expert_ends: torch.Tensor,
          epilogue: int, out: torch.Tensor, out_rows: torch.Tensor | None = None,
          pre: torch.Tensor | None = None) -> None:
    """Launch _rows_kernel over the M = len(a_rows or a) sorted rows, into out: w is (E, K, N), or
    (E, N, K) read transposed; for the SwiGLU epilogues N counts one half (hidden) of pre."""
    block_m, block_n, block_k, num_warps, num_stages = CONFIGS[epilogue]
    n_rows = a_rows.numel() if a_rows is not None else a.size(0)
    n_experts = w.size(0)
    stride_we, stride_wk, stride_wn = w.stride(0), *(w.stride()[1:] if not transpose_w else w.stride()[:0:-1])
    K = w.size(2) if transpose_w else w.size(1)
    N = pre.size(1) // 2 if epilogue != PLAIN else out.size(1)
    grid = (triton.cdiv(N, block_n), triton.cdiv(n_rows, block_m) + n_experts)
    _rows_kernel[grid](
        a, a_rows, w, out, out_rows, pre, expert_ends, K, N, a.stride(0), a.stride(1),
        stride_we, stride_wk, stride_wn, out.stride(0), pre.stride(0) if pre is not None else 0,
        N_EXPERTS=n_experts, EXPERTS_POW2=triton.next_power_of_2(n_experts), GATHER=a_rows is not None,
        SCATTER=out_rows is not None, SWIGLU_OUT=epilogue == SWIGLU, SWIGLU_GRAD=epilogue == SWIGLU_BACKWARD,
        EVEN_K=K % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


def _weight_grad(a: torch.Tensor, a_rows: torch.Tensor | None, b: torch.Tensor, b_rows: torch.Tensor | None,
                 expert_ends: torch.Tensor, out: torch.Tensor) -> None:
    """out[e] = a[rows of e]^T @ b[rows of e] for every expert e of out (E, P, Q)."""
    block_p, block_q, block_k, num_warps, num_stages = CONFIGS[WEIGHT_GRAD]
    n_experts, P, Q = out.shape
    grid = (triton.cdiv(Q, block_q), triton.cdiv(P, block_p), n_experts)
    _weight_grad_kernel[grid](
        a, a_rows, b, b_rows, out, expert_ends, P, Q, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), GATHER_A=a_rows is not None, GATHER_B=b_rows is not None,
        BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)


def scattered_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, order: torch.Tensor,
                      token_of: torch.Tensor, expert_ends: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every assignment through its expert: (out (N*k, dim) in (token, slot) order, unweighted, and
    what backward needs: pre (M, 2*hidden) = the sorted rows' [gate | up], act = silu(gate) * up).

    x (N, dim), gate_up (E, dim, 2*hidden) and down (E, hidden, dim) of one dtype; order (M = N*k,)
    int32, the assignments sorted by expert; token_of = order // k, the row of x of each; expert_ends
    (E,) int32."""
    hidden = down.size(1)
    pre = x.new_empty(order.numel(), 2 * hidden)
    act = x.new_empty(order.numel(), hidden)
    _rows(x, token_of, gate_up, False, expert_ends, SWIGLU, act, pre=pre)
    out = x.new_empty(order.numel(), down.size(2))
    _rows(act, None, down, False, expert_ends, PLAIN, out, out_rows=order)
    return out, pre, act


def scattered_experts_backward(grad_out: torch.Tensor, x: torch.Tensor, gate_up: torch.Tensor,
                               down: torch.Tensor, order: torch.Tensor, token_of: torch.Tensor,
                               expert_ends: torch.Tensor, pre: torch.Tensor, act: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of scattered_experts given grad_out (N*k, dim) of its out, accumulated in fp32:
    (each assignment's share of its token's x gradient, (N*k, dim) in (token, slot) order, whose sum
    over the k slots the caller takes; gate_up; down)."""
    grad_out = grad_out.contiguous()
    grad_down = torch.empty_like(down)
    _weight_grad(act, None, grad_out, order, expert_ends, grad_down)
    grad_pre = torch.empty_like(pre)
    _rows(grad_out, order, down, True, expert_ends, SWIGLU_BACKWARD, grad_pre, pre=pre)
    grad_gate_up = torch.empty_like(gate_up)
    _weight_grad(x, token_of, grad_pre, None, expert_ends, grad_gate_up)
    grad_rows = torch.empty_like(grad_out)
    _rows(grad_pre, None, gate_up, True, expert_ends, PLAIN, grad_rows, out_rows=order)
    return grad_rows, grad_gate_up, grad_down
