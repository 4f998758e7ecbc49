"""StoryLlama's architecture: size, cached decoding, generation, checkpointing switch."""
import pytest
import torch

from conftest import assert_tensor_position_decoding_matches
from smolhub.generate import SamplingConfig, generate_ids, sample_next
from StoryLlama.config import PRESETS, StoryLlamaConfig
from StoryLlama.model import StoryLlama


def tiny_config(**overrides) -> StoryLlamaConfig:
    dims = {k: v for k, v in PRESETS["tiny"].items() if k in StoryLlamaConfig.__dataclass_fields__}
    return StoryLlamaConfig(**{**dims, "vocab_size": 320, **overrides})


def test_default_parameter_count_matches_models_md():
    with torch.device("meta"):
        model = StoryLlama(StoryLlamaConfig(vocab_size=50304))
    assert abs(model.num_params() - 89e6) / 89e6 < 0.03, model.num_params()


def test_tied_embeddings():
    model = StoryLlama(tiny_config())
    assert model.lm_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_cached_decoding_equals_full_forward(n_kv_heads):
    torch.manual_seed(0)
    model = StoryLlama(tiny_config(n_kv_heads=n_kv_heads)).double().eval()
    idx = torch.randint(0, 320, (2, 40))
    full, _ = model(idx)
    cache = model.make_kv_cache(2, 40, "cpu", torch.float64)
    logits = [model(idx[:, :25], kv_cache=cache, start_pos=0)[0]]
    for t in range(25, 40):
        logits.append(model(idx[:, t:t + 1], kv_cache=cache, start_pos=t)[0])
    torch.testing.assert_close(torch.cat(logits, dim=1), full, rtol=1e-9, atol=1e-9)


def greedy_without_cache(model, prompt, n):
    idx = prompt
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.size(1):]


def test_greedy_generation_same_with_and_without_cache():
    torch.manual_seed(1)
    model = StoryLlama(tiny_config()).eval()
    prompt = torch.randint(0, 320, (3, 9))
    cached = torch.stack(list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=30, temperature=0))), 1)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 30))


def test_sampling_is_seeded_and_respects_vocab_limit():
    torch.manual_seed(2)
    model = StoryLlama(tiny_config()).eval()
    prompt = torch.randint(0, 300, (2, 5))
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.5, seed=7)
    a = torch.stack(list(generate_ids(model, prompt, cfg, vocab_limit=300)), 1)
    b = torch.stack(list(generate_ids(model, prompt, cfg, vocab_limit=300)), 1)
    assert torch.equal(a, b)
    assert int(a.max()) < 300


def test_top_k_top_p_and_repetition_penalty():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, SamplingConfig(top_k=2, temperature=1.0), None, gen)) for _ in range(200)}
    assert draws == {0, 1}
    # probabilities ~ .64 .24 .09 .03 .01: top_p 0.7 keeps the first two, 0.5 only the first
    draws = {int(sample_next(logits, SamplingConfig(top_p=0.7, temperature=1.0), None, gen)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, SamplingConfig(top_p=0.5, temperature=1.0), None, gen)) for _ in range(50)}
    assert draws == {0}
    seen = torch.tensor([[True, False, False, False, False]])
    assert int(sample_next(logits, SamplingConfig(temperature=0, repetition_penalty=2.0), seen, None)) == 1


def test_eos_stops_generation():
    torch.manual_seed(3)
    model = StoryLlama(tiny_config()).eval()
    prompt = torch.randint(0, 320, (1, 4))
    first = next(generate_ids(model, prompt, SamplingConfig(max_new_tokens=5, temperature=0)))
    steps = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=5, temperature=0), eos_id=int(first)))
    assert len(steps) == 1


def test_prompt_is_cropped_to_fit_the_context():
    model = StoryLlama(tiny_config(block_size=32)).eval()
    prompt = torch.randint(0, 320, (1, 50))
    out = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0)))
    assert len(out) == 10
    reference = list(generate_ids(model, prompt[:, -22:], SamplingConfig(max_new_tokens=10, temperature=0)))
    assert torch.equal(torch.stack(out), torch.stack(reference))


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(4)
    idx = torch.randint(0, 320, (2, 16))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        model = StoryLlama(tiny_config(grad_checkpointing=ckpt)).double()
        _, loss = model(idx, idx)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_static_shape_decoding_with_tensor_positions_equals_full_forward():
    torch.manual_seed(6)
    assert_tensor_position_decoding_matches(StoryLlama(tiny_config()).double().eval(), 320)


def test_compiled_decode_step_equals_the_full_forward(tmp_path, monkeypatch):
    """The compiled decode step that CUDA graphs replay compiles as one graph (fullgraph=True) and
    computes the same logits; on CPU inductor compiles it without the graph capture."""
    from smolhub.generate import GraphDecoder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(7)
    model = StoryLlama(tiny_config(block_size=32)).eval()
    idx = torch.randint(0, 320, (1, 12))
    with torch.inference_mode():
        full, _ = model(idx)
        decoder = GraphDecoder(model, 1, torch.device("cpu"), torch.float32, compile=True)
        model(idx[:, :9], kv_cache=decoder.cache, start_pos=0)
        steps = [decoder.step(idx[:, t:t + 1], torch.tensor(t)).clone() for t in range(9, 12)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 9:12], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bf16_residual", [True, False])
def test_residual_stream_dtype_under_bf16_autocast(bf16_residual):
    """bf16_residual carries the stream between blocks in bf16 under bf16 autocast, else in fp32 (the
    embedding's dtype); outside autocast it is always the weights' dtype."""
    model = StoryLlama(tiny_config(bf16_residual=bf16_residual))
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    idx = torch.randint(0, 320, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    model(idx, idx)
    assert seen == [torch.bfloat16 if bf16_residual else torch.float32, torch.float32]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
