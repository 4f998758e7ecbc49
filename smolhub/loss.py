"""The language-model loss: cross-entropy over a large vocabulary without full fp32 logits."""
import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 26  # fp32 elements of one chunk of logits rows: 256 MB


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not `ignore_index`, computed in fp32 whatever
    the logits' dtype: the value of F.cross_entropy(logits.float(), targets).

    Compiled, that call is what runs: inductor fuses the fp32 upcast into its softmax kernels and
    never writes fp32 logits. Eager, the same call would hold the (N, V) logits in fp32 twice (the
    upcast copy and the log-softmax saved for backward), four times the bf16 logits: 13 GB at
    32k tokens of a 50k vocabulary. So eager takes the rows in chunks of `chunk_elements` and, when a
    gradient is wanted, computes it during the forward: the only (N, V) tensor kept for backward is
    that gradient, in the logits' dtype."""
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedCrossEntropy.apply(logits, targets, ignore_index, chunk_elements)
    return _chunked_loss_and_grad(logits, targets, ignore_index, chunk_elements, want_grad=False)[0]


def _chunked_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_elements: int,
                           want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(mean loss, its gradient with respect to the logits or None, the factor that gradient still
    needs in backward), a chunk of rows at a time."""
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)[:, None]
    count = valid.sum()  # 0 gives nan, as F.cross_entropy does
    # each row's share of the mean is 1 / count (0 for ignored rows). fp16 defers it to backward: its
    # range would flush probability / count to zero before the loss scaler's factor multiplies it back
    if logits.dtype == torch.float16:
        weight, deferred = valid.float(), 1.0 / count
    else:
        weight, deferred = valid / count, torch.ones((), device=logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if want_grad else None
    rows = max(1, chunk_elements // logits.size(-1))
    for start in range(0, logits.size(0), rows):
        chunk = slice(start, start + rows)
        x = logits[chunk].float()
        log_norm = x.logsumexp(dim=-1, keepdim=True)
        total += ((log_norm - x.gather(1, safe_targets[chunk])).squeeze(1) * valid[chunk]).sum()
        if want_grad:  # d loss / d logits = (softmax - one_hot(target)) * weight
            probs = (x - log_norm).exp_()
            probs.scatter_add_(1, safe_targets[chunk], torch.full_like(log_norm, -1.0))
            grad[chunk] = probs.mul_(weight[chunk, None])
    return total / count, grad, deferred


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, chunk_elements):
        loss, grad, deferred = _chunked_loss_and_grad(logits, targets, ignore_index, chunk_elements, want_grad=True)
        ctx.save_for_backward(grad, deferred)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # scaled in place: a second (N, V) buffer would land on the step's peak, which is here, at
        # the start of backward, while every activation is still held
        if getattr(ctx, "used", False):
            raise RuntimeError("the chunked cross-entropy scales its saved gradient in place, so it "
                               "backpropagates once; compute the loss again for a second backward")
        ctx.used = True
        grad, deferred = ctx.saved_tensors
        return grad.mul_((grad_loss * deferred).to(grad.dtype)), None, None, None
