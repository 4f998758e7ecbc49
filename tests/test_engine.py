"""The Engine that load_model returns: the model, its tokenizer, its checkpoint's record and its
CUDA-graph decoders in one object, the nn.Module left as the trainer built it.

On CPU no graph is captured; the decoder tests stand in for the replay with the eager step on the
decoder's static cache, which exercises everything the engine does around the graph."""
import itertools

import pytest
import torch

from conftest import SHAKESPEARE, tiny_model
from smolhub.generate import Engine, GraphDecoder, SamplingConfig, generate_ids

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0)


@pytest.fixture()
def model(one_thread):
    torch.manual_seed(0)
    return tiny_model("StoryLlama").eval()


def greedy(model, prompt: torch.Tensor) -> torch.Tensor:
    return torch.stack(list(generate_ids(model, prompt, GREEDY)), 1)


def test_load_model_returns_an_engine_and_leaves_the_module_bare(tmp_path, model):
    from smolhub.checkpoint import save_checkpoint
    from smolhub.inference import generate_text, load_model
    from smolhub.tokenizer import train_bpe

    with open(SHAKESPEARE, encoding="utf-8") as f:
        tokenizer = train_bpe(list(itertools.islice(f, 400)), 320)
    folder = save_checkpoint(tmp_path, 3, model, tokenizer, {"step": 3, "val_loss": 5.0})
    engine = load_model(str(tmp_path), device="cpu")
    assert isinstance(engine, Engine) and engine.path == folder and engine.meta["step"] == 3
    assert engine.tokenizer.encode("ROMEO:") == tokenizer.encode("ROMEO:")
    text = generate_text(model=engine, prompt="ROMEO:", max_length=12, temperature=0.8, seed=0)
    streamed = "".join(generate_text(model=engine, prompt="ROMEO:", max_length=12, temperature=0.8, seed=0,
                                     stream=True))
    assert text.startswith("ROMEO:") and text == "ROMEO:" + streamed
    assert not engine.model.training and set(vars(engine.model)) == set(vars(model))  # nothing glued on


def test_generate_text_refuses_a_bare_module(model):
    from smolhub.errors import UserError
    from smolhub.inference import generate_text

    with pytest.raises(UserError, match="load_model"):
        generate_text(model=model, prompt="ROMEO:")


@pytest.fixture()
def stand_in_graphs(monkeypatch):
    """Installs decoders for CPU: usable everywhere, their replay the eager step on the static cache;
    install() returns the batch sizes they are built for, in order."""
    def install() -> list[int]:
        built = []
        init = GraphDecoder.__init__

        def counted_init(self, model, batch_size, *args, **kwargs):
            built.append(batch_size)
            init(self, model, batch_size, *args, **kwargs)

        monkeypatch.setattr(GraphDecoder, "usable", staticmethod(lambda model, device: True))
        monkeypatch.setattr(GraphDecoder, "_replay", GraphDecoder._forward)
        monkeypatch.setattr(GraphDecoder, "__init__", counted_init)
        return built

    return install


def test_engine_keeps_one_decoder_per_batch_size(model, stand_in_graphs):
    one, two = torch.randint(0, 320, (1, 10)), torch.randint(0, 320, (2, 6))
    expected_one, expected_two = greedy(model, one), greedy(model, two)
    built = stand_in_graphs()
    engine = Engine(model)
    for _ in range(2):  # the second generation reuses the first one's decoder and static cache
        torch.testing.assert_close(torch.stack(list(engine.generate_ids(one, GREEDY)), 1), expected_one)
    torch.testing.assert_close(torch.stack(list(engine.generate_ids(two, GREEDY)), 1), expected_two)
    assert built == [1, 2] and not hasattr(model, "_graph_decoders")


def test_a_concurrent_generation_decodes_eagerly_beside_the_decoder(model, stand_in_graphs):
    prompt = torch.randint(0, 320, (1, 10))
    expected = greedy(model, prompt)
    built = stand_in_graphs()
    engine = Engine(model)
    first = engine.generate_ids(prompt, GREEDY)
    head = next(first)  # holds the batch-1 decoder until it finishes
    second = torch.stack(list(engine.generate_ids(prompt, GREEDY)), 1)
    torch.testing.assert_close(torch.stack([head, *first], 1), expected)
    torch.testing.assert_close(second, expected)
    assert built == [1]


def test_engine_decodes_eagerly_once_a_capture_fails(model, stand_in_graphs, monkeypatch):
    def fail(self, token, pos):
        raise RuntimeError("capture failed")

    prompt = torch.randint(0, 320, (1, 10))
    expected = greedy(model, prompt)
    built = stand_in_graphs()
    monkeypatch.setattr(GraphDecoder, "_replay", fail)
    engine = Engine(model)
    with pytest.warns(UserWarning, match="decoding eagerly from now on: RuntimeError: capture failed"):
        torch.testing.assert_close(torch.stack(list(engine.generate_ids(prompt, GREEDY)), 1), expected)
    assert engine.graph_failed and built == [1]
    torch.testing.assert_close(torch.stack(list(engine.generate_ids(prompt, GREEDY)), 1), expected)
    assert built == [1] and not hasattr(model, "graph_decode_failed")
