"""The eager chunked cross-entropy against F.cross_entropy, and what it keeps for backward."""
import pytest
import torch
import torch.nn.functional as F

from smolhub.loss import cross_entropy


def reference(logits, targets):
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def logits_and_targets(dtype, rows=37, vocab=101, ignored=(3, 4, 20)):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[list(ignored)] = -100
    return logits, targets


@pytest.mark.parametrize("chunk_elements", [101, 5 * 101 + 7, 10**9])  # one row, ragged chunks, one chunk
def test_loss_and_gradient_equal_f_cross_entropy(chunk_elements):
    logits, targets = logits_and_targets(torch.float32)
    ours = cross_entropy(logits, targets, chunk_elements=chunk_elements)
    (grad_ours,) = torch.autograd.grad(ours * 3.0, logits)  # a scaled loss, as gradient accumulation makes
    theirs = reference(logits, targets)
    (grad_theirs,) = torch.autograd.grad(theirs * 3.0, logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)
    assert grad_ours[[3, 4, 20]].abs().max() == 0  # ignored rows get no gradient


def test_bf16_logits_give_the_fp32_loss_and_a_bf16_gradient():
    logits, targets = logits_and_targets(torch.bfloat16)
    ours = cross_entropy(logits, targets, chunk_elements=300)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs = reference(logits, targets)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.dtype == torch.float32 and grad_ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs)  # bf16 tolerances: one rounding each


def test_no_grad_gives_the_same_loss():
    logits, targets = logits_and_targets(torch.float32)
    with torch.no_grad():
        evaluated = cross_entropy(logits, targets, chunk_elements=500)
    torch.testing.assert_close(evaluated, reference(logits, targets).detach(), rtol=1e-6, atol=1e-6)


def saved_for_backward(loss_fn, logits, targets):
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(logits, targets)
    return saved


def test_keeps_no_fp32_logits_for_backward():
    logits, targets = logits_and_targets(torch.bfloat16)
    full = tuple(logits.shape)
    assert (full, torch.float32) in saved_for_backward(reference, logits, targets)  # what it avoids
    ours = saved_for_backward(lambda lg, t: cross_entropy(lg, t, chunk_elements=300), logits, targets)
    assert [dtype for shape, dtype in ours if shape == full] == [torch.bfloat16]  # the gradient, no fp32 logits


def test_a_second_backward_is_refused_not_wrong():
    logits, targets = logits_and_targets(torch.float32)
    loss = cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagates once"):
        loss.backward()


def test_fp16_gradient_survives_loss_scaling_like_f_cross_entropy():
    # fp16 AMP: the loss is multiplied by the scaler's 65536; probability / 2048 tokens would be
    # below fp16's smallest subnormal for most classes if the mean were taken before that
    logits, targets = logits_and_targets(torch.float16, rows=2048, vocab=301, ignored=(0,))
    (grad_ours,) = torch.autograd.grad(cross_entropy(logits, targets, chunk_elements=301 * 300) * 65536.0, logits)
    (grad_theirs,) = torch.autograd.grad(reference(logits, targets) * 65536.0, logits)
    assert (grad_theirs != 0).float().mean() > 0.9
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=2e-3, atol=1e-5)
