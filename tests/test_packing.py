"""Packed rows with a document mask, on all five models: several examples share a row, each attends only
within itself and counts its positions from 0, so each gets exactly the logits, loss and gradients it
gets alone. CPU runs the boolean-mask SDPA path; the `cuda` tests check FlexAttention's BlockMask."""
import pytest
import torch

from conftest import tiny_model
from smolhub.layers import document_mask, document_positions
from smolhub.layers.attention import attend
from smolhub.modeling import ARCHITECTURES

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.cuda

# StoryMixtral's tiny window (32) would never bind in these short rows: 6 makes it cut inside documents
OVERRIDES = {"StoryMixtral": {"sliding_window": 6}}
# Two rows of 32 tokens: a one-token example, then examples that end exactly where the row ends;
# ids need not be sorted or unique per row (a document is a run of equal ids)
ROWS = [[(0, 1), (1, 14), (2, 17)], [(7, 20), (3, 12)]]


def packed_model(name: str, **overrides):
    torch.manual_seed(0)
    return tiny_model(name, **{**OVERRIDES.get(name, {}), **overrides})


def packed_batch(rows=ROWS, vocab: int = 320, seed: int = 0):
    """(idx, document_ids, spans): spans[b] = [(start, end), ...] of each example in row b."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(n for _, n in rows[0])
    idx = torch.randint(0, vocab, (len(rows), T), generator=gen)
    doc = torch.tensor([[i for i, n in row for _ in range(n)] for row in rows])
    spans = []
    for row in rows:
        ends = torch.tensor([n for _, n in row]).cumsum(0).tolist()
        spans.append(list(zip([0] + ends[:-1], ends)))
    return idx, doc, spans


def example_targets(idx: torch.Tensor, spans) -> torch.Tensor:
    """Next-token targets inside each example; an example's last token predicts nothing (-100)."""
    targets = torch.full_like(idx, -100)
    for b, row in enumerate(spans):
        for start, end in row:
            targets[b, start:end - 1] = idx[b, start + 1:end]
    return targets


def test_document_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 2], [4, 4, 4, 4, 4, 4, 4, 4]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 0], [0, 1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("window", [None, 3])
def test_document_mask_is_block_diagonal_causal(window):
    """Brute force: query i sees key j iff j <= i, no other document's token lies between them
    (the run of ids 0 after the 1s is a new document), and i - j < window."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 2, 2, 2]])
    mask = document_mask(ids, window=window)
    starts = [i for i in range(10) if i == 0 or ids[0, i] != ids[0, i - 1]]
    doc = [sum(s <= i for s in starts) for i in range(10)]
    expected = [[j <= i and doc[i] == doc[j] and (window is None or i - j < window) for j in range(10)]
                for i in range(10)]
    assert mask.visible()[0, 0].tolist() == expected
    assert mask.positions.tolist() == document_positions(ids).tolist()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_row_gives_each_example_its_logits_alone(name):
    model = packed_model(name).eval()
    idx, doc, spans = packed_batch()
    with torch.no_grad():
        packed, _ = model(idx, document_ids=doc)
        for b, row in enumerate(spans):
            for start, end in row:
                alone, _ = model(idx[b:b + 1, start:end])
                torch.testing.assert_close(packed[b:b + 1, start:end], alone, rtol=0, atol=1e-5)
        # the mask matters: without it the later examples see the earlier ones
        plain, _ = model(idx)
    assert (plain[:, 20:] - packed[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_one_document_is_the_plain_causal_forward(name):
    model = packed_model(name).eval()
    idx, _, _ = packed_batch()
    with torch.no_grad():
        plain, _ = model(idx)
        one, _ = model(idx, document_ids=torch.zeros_like(idx))
    torch.testing.assert_close(one, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_loss_and_gradients_are_the_examples_alone(name):
    """Summed over tokens, the packed loss and its gradients are those of the examples run one by one
    (their last token's target is -100: nothing is predicted across a boundary). Then a training step
    (noisy routing, MoE losses, QK-clip's logit record) runs backward through the masked SDPA."""
    model = packed_model(name, qk_clip_threshold=50.0) if name == "StoryKimi" else packed_model(name)
    rows = [[(0, 4), (1, 13), (2, 15)], [(7, 20), (3, 12)]]
    idx, doc, spans = packed_batch(rows)
    targets = example_targets(idx, spans)
    model.eval()
    _, loss = model(idx, targets, document_ids=doc)
    (loss * (targets != -100).sum()).backward()
    packed_grads = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b, row in enumerate(spans):
        for start, end in row:
            _, alone = model(idx[b:b + 1, start:end], targets[b:b + 1, start:end])
            (alone * (end - start - 1)).backward()
            total += alone.item() * (end - start - 1)
    assert loss.item() * (targets != -100).sum().item() == pytest.approx(total, rel=1e-5)
    for packed_grad, p in zip(packed_grads, model.parameters()):  # None alike: the noise gate, unused in eval
        assert (packed_grad is None) == (p.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(packed_grad, p.grad, rtol=1e-4, atol=1e-6)

    model.train()
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets, document_ids=doc)
    aux = model.aux_loss()
    (loss if aux is None else loss + aux).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_qk_clip_records_only_the_logits_attention_sees():
    """StoryKimi's per-head max logit over a packed row is the max over its examples alone."""
    model = packed_model("StoryKimi", qk_clip_threshold=50.0).train()
    idx, doc, spans = packed_batch()
    attn = model.blocks[0].attn
    with torch.no_grad():
        model(idx, document_ids=doc)
        packed = attn.max_logit
        attn.max_logit = None
        for b, row in enumerate(spans):
            for start, end in row:
                model(idx[b:b + 1, start:end])
        alone = attn.max_logit
        attn.max_logit = None
        model(idx)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (attn.max_logit > packed + 1e-4).any()  # the unmasked row does see pairs across examples


@pytest.mark.parametrize("name", ["StoryLlama", "StoryKimi"])
def test_document_ids_and_a_kv_cache_are_refused(name):
    model = packed_model(name).eval()
    idx, doc, _ = packed_batch()
    cache = model.make_kv_cache(idx.size(0), idx.size(1), "cpu", torch.float32)
    with pytest.raises(ValueError, match="KV cache"):
        model(idx, kv_cache=cache, document_ids=doc)


def test_packed_training_step_traces_as_one_graph(tmp_path, monkeypatch):
    """torch.compile(fullgraph=True) traces the document path (mask, per-token decoupled RoPE, MoE),
    forward and backward, with no graph break; aot_eager keeps inductor's minutes of CPU codegen out."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = packed_model("StoryKimi").train()
    idx, doc, spans = packed_batch()
    targets = example_targets(idx, spans)

    def step(i, t, d):
        _, loss = model(i, t, document_ids=d)
        return loss + model.aux_loss()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(idx, targets, doc)
    compiled.backward()
    assert compiled.item() == pytest.approx(step(idx, targets, doc).item(), rel=1e-5)
    torch._dynamo.reset()


# --- CUDA: FlexAttention's BlockMask --------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


CUDA_ROWS = [[(0, 40), (1, 100), (2, 116)], [(5, 200), (6, 56)]]  # 256 tokens: FlexAttention's path
CUDA_CONTEXT = 256  # the tiny presets' 128 would leave the 200-token example past the position tables


@cuda
@pytest.mark.parametrize("window", [None, 64])
def test_flex_document_mask_equals_masked_sdpa(window):
    """The BlockMask (FlexAttention) against the boolean mask (SDPA), forward and gradients, GQA 8 query /
    2 key-value heads in bf16."""
    torch.manual_seed(0)
    B, T, D = 2, 256, 64
    _, doc, _ = packed_batch(CUDA_ROWS)
    doc = doc.cuda()
    flex, dense = document_mask(doc, window=window), document_mask(doc, window=window, allow_flex=False)
    assert flex.block_mask is not None and dense.block_mask is None
    inputs = [torch.randn(B, h, T, D, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2)]
    g = torch.randn(B, 8, T, D, device="cuda")

    def run(documents):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        y = attend(q, k, v, 0, window=window, documents=documents)
        (y.float() * g).sum().backward()
        return [y, q.grad, k.grad, v.grad]

    errors = [rel_err(a, b) for a, b in zip(run(flex), run(dense))]
    assert max(errors) < 1e-2, errors


@cuda
def test_rotary_kernel_takes_per_token_positions():
    """The fused q/k/v rotation with per-token cos/sin (B, T, D): the Triton kernel on CUDA against the
    torch rotation on CPU, forward and the projection's gradient."""
    from smolhub.layers import RotaryEmbedding
    from smolhub.layers.positions import rotary_qkv

    B, T, H, KV, D = 2, 256, 8, 2, 64
    _, doc, _ = packed_batch(CUDA_ROWS)
    cos, sin = RotaryEmbedding(D, T).at(document_mask(doc).positions)
    qkv = torch.randn(B, T, (H + 2 * KV) * D)
    grads = [torch.randn(B, T, h, D) for h in (H, KV, KV)]

    def run(device):
        x = qkv.to(device).requires_grad_()
        out = rotary_qkv(x, cos.to(device), sin.to(device), H, KV)
        sum((o * g.to(device)).sum() for o, g in zip(out, grads)).backward()
        return [o.cpu() for o in out] + [x.grad.cpu()]

    errors = [rel_err(a, b) for a, b in zip(run("cuda"), run("cpu"))]
    assert max(errors) < 1e-6, errors


@cuda
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_row_on_cuda_gives_each_example_its_logits_alone(name):
    """Packed through FlexAttention (and the rotary kernel's per-token positions) against each example
    alone through SDPA, in bf16 autocast; then a backward through the packed row."""
    model = packed_model(name, block_size=CUDA_CONTEXT).cuda().eval()
    idx, doc, spans = packed_batch(CUDA_ROWS)
    idx, doc = idx.cuda(), doc.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed, _ = model(idx, document_ids=doc)
        for b, row in enumerate(spans):
            for start, end in row:
                alone, _ = model(idx[b:b + 1, start:end])
                assert rel_err(packed[b:b + 1, start:end], alone) < 2e-2, (b, start, end)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, example_targets(idx, spans), document_ids=doc)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)


@cuda
@pytest.mark.parametrize("name", ["StoryLlama", "StoryMixtral", "StoryKimi"])
def test_packed_training_step_compiles_without_graph_breaks_on_cuda(name):
    """The BlockMask is built inside the compiled graph; compiled and eager losses agree."""
    model = packed_model(name, block_size=CUDA_CONTEXT).cuda().train()
    idx, doc, spans = packed_batch(CUDA_ROWS)
    idx, doc = idx.cuda(), doc.cuda()
    targets = example_targets(idx, spans)

    def step(i, t, d):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(i, t, document_ids=d)
            aux = model.aux_loss()
            return loss if aux is None else loss + aux

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(idx, targets, doc)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(idx, targets, doc)
    compiled.backward()
    assert compiled.item() == pytest.approx(step(idx, targets, doc).item(), rel=2e-2)
