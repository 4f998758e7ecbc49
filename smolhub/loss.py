"""The language-model loss: the output head and cross-entropy in one step, without fp32 logits.

    loss = mean over targets != ignore_index of CE(hidden @ weight.T, target)

A separate head and F.cross_entropy(logits.float()) keep the (N, V) logits for backward and, eager,
two fp32 copies besides (the upcast and the log-softmax): 13 GB at 32k tokens of a 50k vocabulary.
Here the logits are computed in the matmul dtype (bf16 under autocast) and, as soon as each row's
loss is known, overwritten by that row's gradient softmax - one_hot(target): the only (N, V) tensor
alive, and the only one kept for backward, is that one buffer. Backward is two matmuls with it,
scaled by grad_loss / count on their small (N, C) and (V, C) outputs rather than on the (N, V)
gradient (which keeps probabilities far above fp16's range floor under a loss scaler, too).

On CUDA with triton the rows are processed by smolhub.kernels.cross_entropy; elsewhere by torch,
in chunks of rows. The work sits in a custom op, which torch.compile treats as one opaque call.
"""
import torch
import torch.nn.functional as F

from smolhub.kernels import triton_available

CHUNK_ELEMENTS = 1 << 26  # fp32 elements of one chunk of logits rows on the torch path: 256 MB


def _cross_entropy_rows_torch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, write_grad: bool,
                              chunk_elements: int) -> torch.Tensor:
    """The torch path of smolhub.kernels.cross_entropy.cross_entropy_rows_, a chunk of rows at a time."""
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)[:, None]
    losses = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    rows = max(1, chunk_elements // logits.size(1))
    for start in range(0, logits.size(0), rows):
        chunk = slice(start, start + rows)
        x = logits[chunk].float()  # a copy, or fp32 logits themselves: overwritten by their gradient either way
        log_norm = x.logsumexp(dim=-1, keepdim=True)
        losses[chunk] = (log_norm - x.gather(1, safe_targets[chunk])).squeeze(1) * valid[chunk]
        if write_grad:
            probs = x.sub_(log_norm).exp_()
            probs.scatter_add_(1, safe_targets[chunk], torch.full_like(log_norm, -1.0))
            logits[chunk] = probs.mul_(valid[chunk, None])
    return losses


@torch.library.custom_op("smolhub::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                             want_grad: bool, chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, d sum-of-losses / d logits (N, V) or an empty tensor, count of targets), all from
    hidden (N, C) and weight (V, C) in the matmul dtype."""
    logits = hidden @ weight.t()
    if triton_available(logits):
        from smolhub.kernels.cross_entropy import cross_entropy_rows_

        losses = cross_entropy_rows_(logits, targets, ignore_index, want_grad)
    else:
        losses = _cross_entropy_rows_torch(logits, targets, ignore_index, want_grad, chunk_elements)
    count = (targets != ignore_index).sum().float()  # 0 gives nan, as F.cross_entropy does
    grad = logits if want_grad else logits.new_empty(0)
    return losses.sum() / count, grad, count


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index, want_grad, chunk_elements):
    grad_shape = (hidden.size(0), weight.size(0)) if want_grad else (0,)
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(grad_shape),
            hidden.new_empty((), dtype=torch.float32))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, compute_dtype, chunk_elements):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        loss, grad_logits, count = _linear_cross_entropy_op(h, w, targets, ignore_index, True, chunk_elements)
        ctx.save_for_backward(h, w, grad_logits, count)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, grad_logits, count = ctx.saved_tensors
        scale = grad_loss / count
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad_logits @ w) * scale).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_weight = ((grad_logits.t() @ h) * scale).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T (hidden (..., C), weight (V, C), targets (...))
    over the targets that are not `ignore_index`: the value of F.cross_entropy(F.linear(hidden,
    weight).float(), targets), with the matmul in the autocast dtype when autocast is on.
    `chunk_elements` sizes the row chunks of the torch path (the CUDA kernel goes a row at a time)."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, dtype, chunk_elements)
    return _linear_cross_entropy_op(hidden.to(dtype), weight.to(dtype), targets, ignore_index, False,
                                    chunk_elements)[0]


def reference_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """The plain formulation linear_cross_entropy replaces (tests and benchmarks compare against it)."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
