"""The fused head + cross-entropy against F.linear + F.cross_entropy, and what it keeps for backward."""
import pytest
import torch

from smolhub.loss import linear_cross_entropy, reference_linear_cross_entropy

ROWS, DIM, VOCAB, IGNORED = 37, 24, 101, [3, 4, 20]


def inputs(dtype=torch.float32, rows=ROWS, vocab=VOCAB, ignored=IGNORED, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(rows, DIM, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, DIM, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[ignored] = -100
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, scale=3.0, **kwargs):
    loss = fn(hidden, weight, targets, **kwargs)
    return (loss, *torch.autograd.grad(loss * scale, (hidden, weight)))  # scaled, as accumulation makes


@pytest.mark.parametrize("chunk_elements", [VOCAB, 5 * VOCAB + 7, 10**9])  # one row, ragged chunks, one chunk
def test_loss_and_gradients_equal_the_plain_head_and_loss(chunk_elements):
    hidden, weight, targets = inputs()
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_elements=chunk_elements)
    theirs = loss_and_grads(reference_linear_cross_entropy, hidden, weight, targets)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ignored_rows_get_no_gradient():
    hidden, weight, targets = inputs()
    _, grad_hidden, _ = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert grad_hidden[IGNORED].abs().max() == 0 and grad_hidden.abs().sum(dim=1).min() == 0
    assert (grad_hidden.abs().sum(dim=1) > 0).sum() == ROWS - len(IGNORED)


def test_bf16_autocast_matches_the_plain_head_and_loss_under_autocast():
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
        theirs = loss_and_grads(reference_linear_cross_entropy, hidden, weight, targets)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.float32  # fp32 params
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)  # same bf16 logits, fp32 loss
    for a, b in zip(ours[1:], theirs[1:]):  # bf16 gradient of the logits, rounded at different points
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_no_grad_gives_the_same_loss():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        evaluated = linear_cross_entropy(hidden, weight, targets, chunk_elements=500)
        expected = reference_linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(evaluated, expected, rtol=1e-6, atol=1e-6)


def saved_for_backward(fn, *args):
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved


def test_keeps_one_bf16_logits_sized_tensor_for_backward():
    hidden, weight, targets = inputs()
    full = (ROWS, VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = saved_for_backward(reference_linear_cross_entropy, hidden, weight, targets)
        ours = saved_for_backward(linear_cross_entropy, hidden, weight, targets)
    assert (full, torch.float32) in plain  # what it avoids: the fp32 log-softmax
    assert [dtype for shape, dtype in ours if shape == full] == [torch.bfloat16]  # the gradient alone


def test_a_second_backward_gives_the_same_gradients():
    hidden, weight, targets = inputs()
    loss = linear_cross_entropy(hidden, weight, targets)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fp16_gradient_survives_loss_scaling_like_the_plain_loss():
    # fp16 AMP: the loss is multiplied by the scaler's 65536; probability / 2048 tokens would be
    # below fp16's smallest subnormal for most classes if the mean were taken on the logits' gradient
    hidden, weight, targets = inputs(torch.float16, rows=2048, vocab=301, ignored=[0])
    ours = loss_and_grads(linear_cross_entropy, hidden, weight, targets, scale=65536.0)
    plain = loss_and_grads(reference_linear_cross_entropy, hidden, weight, targets, scale=65536.0)
    exact = loss_and_grads(reference_linear_cross_entropy, *(t.detach().double().requires_grad_()
                                                             for t in (hidden, weight)), targets, scale=65536.0)
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-5, atol=1e-5)  # the same fp16 logits
    for a, b, truth in zip(ours[1:], plain[1:], exact[1:]):
        assert a.dtype == torch.float16 and a.isfinite().all() and (a != 0).float().mean() > 0.9
        error = lambda x: ((x.double() - truth).norm() / truth.norm()).item()
        assert error(a) < max(2 * error(b), 1e-3)  # fp16 rounding, no worse than the plain loss's


def test_compiled_model_loss_equals_eager():
    """The custom op under torch.compile: one graph, the same loss and gradients as eager."""
    hidden, weight, targets = inputs()
    compiled = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    ours = loss_and_grads(compiled, hidden, weight, targets)
    eager = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [0, 64], ids=["default-launch", "full-blocks-and-tail"])
def test_triton_rows_kernel_equals_the_torch_rows_in_the_interpreter(interpreted_triton, block):
    """smolhub.kernels.cross_entropy (the CUDA path of every row) under triton's interpreter against
    the torch path: losses, gradients written in place, ignored rows zero; with block 64 the 300-wide
    rows take four full blocks and a masked tail."""
    from smolhub.kernels.cross_entropy import cross_entropy_rows_
    from smolhub.loss import CHUNK_ELEMENTS, _cross_entropy_rows_torch

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(19, 300, generator=g) * 3
    targets = torch.randint(0, 300, (19,), generator=g)
    targets[[2, 11]] = -100
    theirs = logits.clone()
    expected = _cross_entropy_rows_torch(theirs, targets, -100, True, CHUNK_ELEMENTS)
    ours = logits.clone()
    torch.testing.assert_close(cross_entropy_rows_(ours, targets, -100, True, block=block), expected)
    torch.testing.assert_close(ours, theirs)
    assert (ours[[2, 11]] == 0).all()
    torch.testing.assert_close(cross_entropy_rows_(logits.clone(), targets, -100, False, block=block), expected)
