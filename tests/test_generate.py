"""smolhub/generate.py: sampling (seeded, top-k, top-p, repetition penalty), vocabulary limits, EOS,
the prompt cropped to the context, and the compiled decode step that CUDA graphs replay."""
import torch

from conftest import GPT2_DIR, tiny_model
from smolhub.generate import SamplingConfig, generate_ids, sample_next, stream_text
from smolhub.tokenizer import gpt2_tokenizer


def test_sampling_is_seeded_and_respects_vocab_limit():
    torch.manual_seed(2)
    model = tiny_model("StoryLlama").eval()
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


def test_padding_ids_are_never_sampled():
    tok = gpt2_tokenizer(str(GPT2_DIR))
    torch.manual_seed(3)
    model = tiny_model("SmolTransformer", vocab_size=50304, n_embd=64, n_head=2, ffn_hidden=256).eval()
    # an untrained padding row can score high; make all 47 of them win by far
    model.lm_head.register_forward_hook(lambda m, args, out: out.index_add(
        -1, torch.arange(len(tok), 50304), torch.full((47,), 50.0).expand(*out.shape[:-1], 47)))
    prompt = torch.tensor([tok.encode("Hello world")])
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, seed=0, stop_at_eos=False)
    assert int(torch.stack(list(generate_ids(model, prompt, cfg))).min()) >= len(tok)  # the hook bites
    ids = torch.stack(list(generate_ids(model, prompt, cfg, vocab_limit=len(tok))))
    assert int(ids.max()) < len(tok)
    assert "".join(stream_text(model, tok, "Hello world", cfg))  # stream_text masks them too


def test_eos_stops_generation():
    torch.manual_seed(3)
    model = tiny_model("StoryLlama").eval()
    prompt = torch.randint(0, 320, (1, 4))
    first = next(generate_ids(model, prompt, SamplingConfig(max_new_tokens=5, temperature=0)))
    steps = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=5, temperature=0), eos_id=int(first)))
    assert len(steps) == 1


def test_prompt_is_cropped_to_fit_the_context():
    model = tiny_model("StoryLlama", block_size=32).eval()
    prompt = torch.randint(0, 320, (1, 50))
    out = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0)))
    assert len(out) == 10
    reference = list(generate_ids(model, prompt[:, -32:], SamplingConfig(max_new_tokens=10, temperature=0)))
    assert torch.equal(torch.stack(out), torch.stack(reference))


def test_compiled_decode_step_equals_the_full_forward(tmp_path, monkeypatch):
    """The compiled decode step that CUDA graphs replay compiles as one graph (fullgraph=True) and
    computes the same logits; on CPU inductor compiles it without the graph capture."""
    from smolhub.generate import GraphDecoder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(7)
    model = tiny_model("StoryLlama", block_size=32).eval()
    idx = torch.randint(0, 320, (1, 12))
    with torch.inference_mode():
        full, _ = model(idx)
        decoder = GraphDecoder(model, 1, torch.device("cpu"), torch.float32, compile=True)
        model(idx[:, :9], kv_cache=decoder.cache, start_pos=0)
        steps = [decoder.step(idx[:, t:t + 1], torch.tensor(t)).clone() for t in range(9, 12)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 9:12], rtol=1e-4, atol=1e-4)
