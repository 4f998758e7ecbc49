"""What every architecture promises, tested once for all five on their `tiny` presets: the size
docs/MODELS.md gives, a head tied to the token embedding, cached decoding (with integer and with tensor
positions) equal to the full forward, greedy generation the same with and without the cache,
gradient checkpointing that changes no gradient, and the residual stream's dtype under autocast.
What is special to one model is in its own file."""
import pytest
import torch

from conftest import tiny_model
from smolhub.generate import SamplingConfig, generate_ids
from smolhub.modeling import ARCHITECTURES, model_class

pytestmark = pytest.mark.usefixtures("one_thread")

# (architecture, vocabulary, total parameters, active parameters) at the default config, from docs/MODELS.md
SIZES = [
    ("SmolTransformer", 50304, 153e6, 153e6),
    ("StoryLlama", 50304, 89e6, 89e6),
    ("SmolMixtral", 32000, 125e6, 50e6),
    ("StoryMixtral", 32000, 202e6, 70e6),
    ("StoryKimi", 32000, 182e6, 78e6),
]

# (architecture, config overrides, tolerance): the attention variants each model can be built with.
# StoryMixtral's 8-token window is shorter than the prefill, so its ring-buffer cache wraps around.
# StoryKimi's cache attends in the absorbed form, summed in another order than the full forward,
# and its attention scores and router are computed in fp32 even in a float64 model: the two meet at fp32 rounding.
DECODING = [
    pytest.param("SmolTransformer", {}, 1e-9, id="SmolTransformer"),
    pytest.param("SmolTransformer", {"positions": "sinusoidal"}, 1e-9, id="SmolTransformer-sinusoidal"),
    pytest.param("StoryLlama", {"n_kv_heads": 4}, 1e-9, id="StoryLlama-MHA"),
    pytest.param("StoryLlama", {"n_kv_heads": 2}, 1e-9, id="StoryLlama-GQA"),
    pytest.param("StoryLlama", {"n_kv_heads": 1}, 1e-9, id="StoryLlama-MQA"),
    pytest.param("SmolMixtral", {}, 1e-9, id="SmolMixtral"),
    pytest.param("StoryMixtral", {"sliding_window": 8}, 1e-9, id="StoryMixtral-window8"),
    pytest.param("StoryKimi", {}, 1e-6, id="StoryKimi"),
]


@pytest.mark.parametrize("name,vocab,total,active", SIZES, ids=[s[0] for s in SIZES])
def test_parameter_counts_match_models_md(name, vocab, total, active):
    with torch.device("meta"):
        model = model_class(name)(model_class(name).config_class(vocab_size=vocab))
    assert abs(model.num_params() - total) / total < 0.03, model.num_params()
    assert abs(model.num_active_params() - active) / active < 0.03, model.num_active_params()
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_tiny_head_shares_the_token_embedding(name):
    model = tiny_model(name)
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("name,overrides,tol", DECODING)
def test_cached_decoding_equals_full_forward(name, overrides, tol):
    """A prefill, a chunk appended to the cache (which needs an explicit mask), then single tokens."""
    torch.manual_seed(0)
    model = tiny_model(name, **overrides).double().eval()
    idx = torch.randint(0, 320, (2, 40))
    full, _ = model(idx)
    cache = model.make_kv_cache(2, 40, "cpu", torch.float64)
    logits, pos = [], 0
    for n in [20, 5] + [1] * 15:
        logits.append(model(idx[:, pos:pos + n], kv_cache=cache, start_pos=pos)[0])
        pos += n
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=tol, atol=tol)


@pytest.mark.parametrize("name,overrides,tol", DECODING)
def test_static_shape_decoding_with_tensor_positions_equals_full_forward(name, overrides, tol):
    """The CUDA-graph decode path (a whole-context cache, positions as tensors) run eagerly gives the
    full forward's logits, whatever an earlier generation left in the cache."""
    torch.manual_seed(0)
    model = tiny_model(name, **overrides).double().eval()
    idx = torch.randint(0, 320, (2, 30))
    full, _ = model(idx)
    cache = model.make_kv_cache(2, model.config.block_size, "cpu", torch.float64)
    for layer in cache:  # what an earlier generation left behind must stay masked
        for buffer in vars(layer).values():
            if isinstance(buffer, torch.Tensor) and buffer.is_floating_point():
                buffer.normal_()
    logits = [model(idx[:, :10], kv_cache=cache, start_pos=0)[0]]
    for t in range(10, 30):
        logits.append(model(idx[:, t:t + 1], kv_cache=cache, start_pos=torch.tensor(t))[0])
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=tol, atol=tol)


@pytest.mark.parametrize("name,overrides", [(name, {"sliding_window": 6} if name == "StoryMixtral" else {})
                                            for name in ARCHITECTURES], ids=ARCHITECTURES)
def test_greedy_generation_same_with_and_without_cache(name, overrides):
    """StoryMixtral with a 6-token window generates well beyond it."""
    torch.manual_seed(1)
    model = tiny_model(name, **overrides).eval()
    prompt = torch.randint(0, 320, (2, 7))
    cached = torch.stack(list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0))), 1)
    idx = prompt
    for _ in range(20):
        idx = torch.cat([idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, idx[:, 7:])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_gradient_checkpointing_gives_same_gradients(name):
    """Training mode: the recomputation replays the MoE router noise, so gradients match exactly."""
    idx = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        model = tiny_model(name, grad_checkpointing=ckpt, dropout=0.0).double()
        torch.manual_seed(6)
        _, loss = model(idx, idx)
        aux = model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bf16_residual", [True, False])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_residual_stream_dtype_under_bf16_autocast(name, bf16_residual):
    """bf16_residual carries the stream between blocks in bf16 under bf16 autocast, else in fp32 (the
    embedding's dtype); outside autocast it is always the weights' dtype."""
    model = tiny_model(name, bf16_residual=bf16_residual)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    idx = torch.randint(0, 320, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    model(idx, idx)
    assert seen == [torch.bfloat16 if bf16_residual else torch.float32, torch.float32]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
