"""Cross-entropy over (N, V) logits on CUDA, one row per program, overwriting the logits with their
gradient: loss_n = logsumexp(x_n) - x_n[t_n], and x_n becomes softmax(x_n) - one_hot(t_n).

A row makes two passes over its logits: an online max/sum-exp, then the gradient. The second pass
reads what the first just read, so with ~2 rows of 100 KB in flight per SM it mostly hits L2: the
logits cross HBM about once each way (read, then overwritten), where compiled F.cross_entropy reads
them in its forward, reads them again in backward and writes a separate gradient."""
import torch
import triton
import triton.language as tl


@triton.jit
def _cross_entropy_rows(logits_ptr, targets_ptr, loss_ptr, n_cols, row_stride, ignore_index,
                        WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    offsets = tl.arange(0, BLOCK)
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    log_norm = running_max + tl.log(running_sum)
    target_logit = tl.load(row_ptr + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, log_norm - target_logit, 0.0))
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            in_row = cols < n_cols
            x = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(x - log_norm) - tl.where(cols == target, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool,
                        block: int = 0, num_warps: int = 0) -> torch.Tensor:
    """Per-row losses (N,) in fp32; with write_grad, logits (N, V) is overwritten by the gradient of
    their sum (zero on ignored rows). block / num_warps override the launch configuration."""
    n_rows, n_cols = logits.shape
    # H100, 32k x 50k bf16: 16384 x 16 warps ran at 2.14 TB/s, 8192 x 16 at 2.00, 2048 x 4 at 1.91
    block = block or min(16384, triton.next_power_of_2(n_cols))
    num_warps = num_warps or (16 if block >= 8192 else 8 if block >= 2048 else 4)
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    _cross_entropy_rows[(n_rows,)](logits, targets, losses, n_cols, logits.stride(0), ignore_index,
                                   WRITE_GRAD=write_grad, BLOCK=block, num_warps=num_warps)
    return losses
