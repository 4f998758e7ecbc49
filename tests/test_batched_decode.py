"""Per-row decode positions: a batch whose rows sit at different positions (continuous batching).

Every request is prefilled alone into a batch-1 cache, copied into a row of the batch's cache, and
decoded there with a (B,) start_pos; each row's logits must equal those of its tokens decoded alone
with a scalar start_pos, to fp32 rounding (ATOL below)."""
import pytest
import torch

from conftest import tiny_model
from smolhub.layers.attention import causal_mask, window_mask
from smolhub.modeling import ARCHITECTURES, copy_cache_row

# fp32: rows of a batch go through matmuls of another shape than a batch of one, which changes the
# rounding (at most 1.5e-6 on CPU), never more; cuBLAS picks other kernels per shape, hence CUDA_ATOL
ATOL, RTOL = 2e-5, 1e-5
CUDA_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = [*ARCHITECTURES, "SmolTransformer-sinusoidal"]


def build(name: str, device="cpu"):
    torch.manual_seed(0)
    arch, _, variant = name.partition("-")
    return tiny_model(arch, **({"positions": variant} if variant else {})).to(device).eval()


def noisy_cache(model, batch_size: int, device="cpu"):
    """A cache whose every slot holds noise: only what a request wrote may reach its logits."""
    cache = model.make_kv_cache(batch_size, model.config.block_size, device, torch.float32)
    for layer in cache:
        for tensor in vars(layer).values():
            tensor.normal_()
    return cache


class Request:
    """A prompt and the tokens fed after it (fixed, so that both decodes see the same sequence)."""

    def __init__(self, prompt_len: int, n_steps: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, 320, (1, prompt_len), generator=g)
        self.tokens = torch.randint(0, 320, (n_steps,), generator=g)


@torch.no_grad()
def decoded_alone(model, request: Request, device="cpu") -> list[torch.Tensor]:
    """Logits after each fed token, decoding the request at batch 1 with int positions."""
    cache = noisy_cache(model, 1, device)
    model(request.prompt.to(device), kv_cache=cache, start_pos=0)
    pos, out = request.prompt.size(1), []
    for token in request.tokens.to(device):
        out.append(model(token.view(1, 1), kv_cache=cache, start_pos=pos)[0][0, -1])
        pos += 1
    return out


# the schedule: (request, row, step at which it joins); rows decode until their tokens run out.
# Row 0 prefills past StoryMixtral's 32-position window, row 1 decodes across it, row 2 is
# reused by a late request after a short one finished there, row 3 idles until a request joins.
SCHEDULE = [(Request(45, 8, 1), 0, 0), (Request(29, 8, 2), 1, 0), (Request(5, 3, 3), 2, 0),
            (Request(3, 5, 4), 2, 3), (Request(10, 5, 5), 3, 2)]
N_STEPS = 8


@torch.no_grad()
def decode_batch(model, step, device="cpu") -> dict[int, list[torch.Tensor]]:
    """Run SCHEDULE on one batch cache; `step(tokens (B, 1), start_pos (B,), cache)` -> logits (B, V).

    One batch-1 cache serves every prefill, as a server's would: a later prompt's cache row still
    holds the earlier, longer prompts' keys beyond its own positions."""
    B = 4
    cache, prefill_cache = noisy_cache(model, B, device), noisy_cache(model, 1, device)
    active: dict[int, tuple[int, Request, int]] = {}  # row -> (request index, request, tokens fed)
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(SCHEDULE))}
    for t in range(N_STEPS):
        for i, (request, row, join) in enumerate(SCHEDULE):
            if join == t:
                assert row not in active
                model(request.prompt.to(device), kv_cache=prefill_cache, start_pos=0)
                copy_cache_row(cache, row, prefill_cache)
                active[row] = (i, request, 0)
        # an idle row decodes a dummy token at position 0 of its own row, harming no other row
        tokens = torch.zeros(B, 1, dtype=torch.long, device=device)
        start_pos = torch.zeros(B, dtype=torch.long, device=device)
        for row, (i, request, fed) in active.items():
            tokens[row, 0] = request.tokens[fed]
            start_pos[row] = request.prompt.size(1) + fed
        out = step(tokens, start_pos, cache)
        for row, (i, request, fed) in list(active.items()):
            logits[i].append(out[row].clone())
            if fed + 1 == len(request.tokens):
                del active[row]
            else:
                active[row] = (i, request, fed + 1)
    return logits


def eager_step(model):
    return lambda tokens, start_pos, cache: model(tokens, kv_cache=cache, start_pos=start_pos)[0][:, -1]


def check_rows(model, logits: dict[int, list[torch.Tensor]], device="cpu", atol: float = ATOL) -> None:
    for i, (request, row, join) in enumerate(SCHEDULE):
        alone = decoded_alone(model, request, device)
        assert len(logits[i]) == len(alone), f"request {i} decoded {len(logits[i])} of {len(alone)} tokens"
        for step, (got, want) in enumerate(zip(logits[i], alone)):
            torch.testing.assert_close(got, want, atol=atol, rtol=RTOL,
                                       msg=lambda m: f"request {i} (row {row}), token {step}: {m}")


@pytest.mark.parametrize("name", MODELS)
def test_rows_at_different_positions_decode_as_if_alone(name):
    model = build(name)
    check_rows(model, decode_batch(model, eager_step(model)))


@pytest.mark.parametrize("name", MODELS)
def test_chunks_at_per_row_positions_equal_decoding_alone(name):
    """T > 1 with a (B,) start_pos: each row appends a chunk of 3 tokens at its own position (the
    sliding-window rows cross the window inside the chunk)."""
    model = build(name)
    requests = [Request(30, 3, 7), Request(4, 3, 8), Request(40, 3, 9)]
    with torch.no_grad():
        cache, prefill_cache = noisy_cache(model, len(requests)), noisy_cache(model, 1)
        for row, request in enumerate(requests):
            model(request.prompt, kv_cache=prefill_cache, start_pos=0)
            copy_cache_row(cache, row, prefill_cache)
        chunk = torch.stack([r.tokens for r in requests])
        start_pos = torch.tensor([r.prompt.size(1) for r in requests])
        got = model(chunk, kv_cache=cache, start_pos=start_pos)[0]
        # the next token at per-row positions reads what the chunk wrote
        step = torch.tensor([[5], [6], [7]])
        got_next = model(step, kv_cache=cache, start_pos=start_pos + 3)[0][:, -1]
        for row, request in enumerate(requests):
            alone = noisy_cache(model, 1)
            model(request.prompt, kv_cache=alone, start_pos=0)
            want = model(chunk[row:row + 1], kv_cache=alone, start_pos=request.prompt.size(1))[0][0]
            want_next = model(step[row:row + 1], kv_cache=alone, start_pos=request.prompt.size(1) + 3)[0][0, -1]
            torch.testing.assert_close(got[row], want, atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(got_next[row], want_next, atol=ATOL, rtol=RTOL)


def test_per_row_masks_equal_the_scalar_mask_of_each_row():
    start_pos = torch.tensor([0, 3, 17, 40])
    for q_len in (1, 3):
        got = causal_mask(q_len, 48, start_pos, "cpu")
        assert got.shape == (4, 1, q_len, 48)
        for b, p in enumerate(start_pos.tolist()):
            assert torch.equal(got[b, 0], causal_mask(q_len, 48, p, "cpu"))
    key_pos = torch.tensor([[-3, 0, 1, 2], [4, 1, 2, 3], [16, 17, 14, 15], [40, 37, 38, 39]])
    for window in (None, 2, 4):
        got = window_mask(1, start_pos, key_pos, window)
        shared = window_mask(1, start_pos, key_pos[0], window)
        assert got.shape == shared.shape == (4, 1, 1, 4)
        for b, p in enumerate(start_pos.tolist()):
            assert torch.equal(got[b, 0], window_mask(1, p, key_pos[b], window))
            assert torch.equal(shared[b, 0], window_mask(1, p, key_pos[0], window))


def test_a_start_pos_of_the_wrong_shape_is_refused():
    model = build("StoryLlama")
    cache = model.make_kv_cache(2, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="one position per row"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache, start_pos=torch.zeros(2, 1, dtype=torch.long))
    k = torch.zeros(2, cache[0].k.size(1), 1, cache[0].k.size(3))
    with pytest.raises(ValueError, match="3 positions for a batch of 2 rows"):
        cache[0].update(k, k, torch.tensor([1, 2, 3]))


@pytest.mark.cuda
@pytest.mark.parametrize("name", MODELS)
def test_per_row_decode_step_captures_as_a_cuda_graph(name):
    """The (B,) decode step replayed from one CUDA graph gives every row the logits it has alone."""
    model = build(name, "cuda")
    graphs: dict = {}

    def graph_step(tokens, start_pos, cache):
        if not graphs:
            graphs.update(tokens=tokens.clone(), start_pos=start_pos.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires; the same step
                eager_step(model)(graphs["tokens"], graphs["start_pos"], cache)
            torch.cuda.current_stream().wait_stream(side)
            graphs["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs["graph"]):
                graphs["logits"] = eager_step(model)(graphs["tokens"], graphs["start_pos"], cache)
        graphs["tokens"].copy_(tokens)
        graphs["start_pos"].copy_(start_pos)
        graphs["graph"].replay()
        return graphs["logits"]

    check_rows(model, decode_batch(model, graph_step, "cuda"), "cuda", CUDA_ATOL)
