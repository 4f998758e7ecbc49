"""Inference and data under a user's mistakes: generation past the context (a sliding window, the same
tokens as recomputing the last block_size tokens at every step, for every model and decoder), what the
CLI and the app say about it, --stream --json, a checkpoint of another folder's architecture, a
transformers export passed as a checkpoint, a lone surrogate in a prompt, and a validation folder that
holds only validation files.

On CPU no CUDA graph is captured: the decoder's replay is stood in for by the eager step on its static
cache (as in test_engine.py), which is everything the engine does around the graph."""
import gzip
import itertools
import json
import runpy
import sys

import pytest
import torch

from conftest import GPT2_DIR, REPO, SHAKESPEARE, run_script, tiny_model
from smolhub.errors import UserError
from smolhub.generate import Engine, GraphDecoder, SamplingConfig, generate_ids
from smolhub.modeling import ARCHITECTURES

# every attention and position variant on its tiny preset (context 128), with weights 15x the usual
# init: at 0.02 a random model predicts from the last token alone, blind to how much context it got.
# StoryMixtral's window is 96 tokens, not 32: its cache is still a ring buffer, but through two layers
# a token now sees past the whole context, so the context's length matters
STD = {"init_std": 0.3}
VARIANTS = [pytest.param(name, {**STD, "sliding_window": 96} if name == "StoryMixtral" else STD, id=name)
            for name in ARCHITECTURES]
VARIANTS.append(pytest.param("SmolTransformer", {**STD, "positions": "sinusoidal"}, id="SmolTransformer-sinusoidal"))
BLOCK = 128
NEW = 40


def reference(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy tokens without a cache, each predicted from a full forward over the last block_size tokens."""
    idx = prompt
    with torch.inference_mode():
        for _ in range(n):
            logits = model(idx[:, -model.config.block_size:])[0]
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.size(1):]


def stand_in_decoders(monkeypatch) -> None:
    monkeypatch.setattr(GraphDecoder, "usable", staticmethod(lambda model, device: True))
    monkeypatch.setattr(GraphDecoder, "_replay", GraphDecoder._forward)


@pytest.fixture(scope="module")
def tokenizer():
    from smolhub.tokenizer import train_bpe

    with open(SHAKESPEARE, encoding="utf-8") as f:
        return train_bpe(list(itertools.islice(f, 400)), 320)


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    """A tiny StoryLlama and a tiny SmolMixtral checkpoint (context 128), as the README's tiny runs leave."""
    from smolhub.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    for name in ["StoryLlama", "SmolMixtral"]:
        torch.manual_seed(0)
        save_checkpoint(root / name, 1, tiny_model(name).eval(), tokenizer, {"step": 1})
    return root


def inference_py(monkeypatch, capsys, *args: str, folder: str = "StoryLlama") -> tuple[int, str, str]:
    """`python inference.py ARGS` in a model folder, run in this process: (exit code, stdout, stderr)."""
    monkeypatch.chdir(REPO / folder)
    monkeypatch.setattr(sys, "argv", ["inference.py", *args])
    try:
        runpy.run_path("inference.py", run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code
    return (code, *capsys.readouterr())


def long_prompt(tokenizer, n_tokens: int) -> str:
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    return tokenizer.decode(tokenizer.encode(text)[:n_tokens])


# --- generation past the context ---------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [100, BLOCK, 150], ids=["below", "at", "above"])
@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_generation_slides_past_the_context_like_the_cache_free_reference(name, overrides, prompt_len,
                                                                         monkeypatch, one_thread):
    torch.manual_seed(1)
    model = tiny_model(name, **overrides).eval()
    assert model.config.block_size == BLOCK
    prompt = torch.randint(0, 320, (2, prompt_len))
    expected = reference(model, prompt, NEW)
    greedy = SamplingConfig(max_new_tokens=NEW, temperature=0)
    eager = torch.stack(list(generate_ids(model, prompt, greedy)), 1)
    assert torch.equal(eager, expected)
    stand_in_decoders(monkeypatch)
    engine = Engine(model)
    for _ in range(2):  # the second generation starts from the cache the first one left full
        assert torch.equal(torch.stack(list(engine.generate_ids(prompt, greedy)), 1), expected)
    assert len(engine._decoders) == 1  # it went through the decoder


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_streamed_and_batched_text_slide_past_the_context(name, overrides, tokenizer, monkeypatch, one_thread):
    torch.manual_seed(2)
    model = tiny_model(name, **overrides).eval()
    prompts = [long_prompt(tokenizer, 140), long_prompt(tokenizer, 60)]
    cfg = SamplingConfig(max_new_tokens=90, temperature=0, stop_at_eos=False)
    expected = [tokenizer.decode(reference(model, torch.tensor([tokenizer.encode(p)]), 90)[0].tolist())
                for p in prompts]
    stand_in_decoders(monkeypatch)
    engine = Engine(model, tokenizer)
    assert engine.generate(prompts, cfg) == expected
    assert "".join(engine.stream(prompts[0], cfg)) == expected[0]
    assert engine._decoders


def test_readme_sequence_generates_past_a_tiny_context(checkpoints, tokenizer, capsys, monkeypatch):
    """The README's inference command, default --max_new_tokens 200, on a tiny preset's checkpoint."""
    ckpt = str(checkpoints / "StoryLlama")
    code, out, err = inference_py(monkeypatch, capsys, "--checkpoint", ckpt, "--prompt", "Once upon a time",
                                  "--seed", "0", "--json")
    record = json.loads(out)
    assert code == 0 and record["prompt"] == "Once upon a time" and 128 < record["tokens"] <= 200
    assert "context" not in err
    code, out, err = inference_py(monkeypatch, capsys, "--checkpoint", ckpt, "--prompt", long_prompt(tokenizer, 150),
                                  "--max_new_tokens", "5")
    assert code == 0 and out
    assert err.splitlines()[0] == ("the prompt has 150 tokens, more than the model's context of 128: "
                                   "generating from its last 128")


def test_app_allows_long_generations_and_shows_a_cropped_prompt(checkpoints, tokenizer):
    from smolhub.app import build_app
    from smolhub.inference import generate_text, load_model

    engine = load_model(str(checkpoints / "StoryLlama"), device="cpu")
    stream = next(f.fn for f in build_app(engine, "StoryLlama").fns.values() if f.name == "stream")
    *_, (text, status) = stream("Once upon a time", 200, 0.8, 0, 1.0, 1.0, 3)
    assert text == generate_text(engine, "Once upon a time", 200, seed=3)
    assert "context" not in status
    prompt = long_prompt(tokenizer, 150)
    updates = list(stream(prompt, 5, 0.8, 0, 1.0, 1.0, 3))
    note = "the prompt has 150 tokens, more than the model's context of 128: generating from its last 128"
    assert note in updates[0][1] and note in updates[-1][1]
    assert updates[-1][0] == generate_text(engine, prompt, 5, seed=3)


@pytest.mark.cuda
@pytest.mark.parametrize("name,overrides,compile", [pytest.param(*v.values, False, id=f"{v.id}-captured")
                                                    for v in VARIANTS]
                         + [pytest.param("StoryLlama", STD, True, id="StoryLlama-compiled")])
def test_cuda_graph_decoding_slides_past_the_context(name, overrides, compile):
    """On the GPU, in fp32: the engine's CUDA-graph decoders (captured, or compiled then captured)
    slide past the context with the cache-free reference's tokens, twice in a row on one decoder."""
    torch.manual_seed(1)
    model = tiny_model(name, **overrides).cuda().eval()
    prompt = torch.randint(0, 320, (2, 100), device="cuda")
    greedy = SamplingConfig(max_new_tokens=NEW, temperature=0)
    eager = Engine(model)
    eager.graph_failed = True  # the same loop, every step run eagerly
    expected = torch.stack(list(eager.generate_ids(prompt, greedy)), 1)
    engine = Engine(model, compile=compile)
    for _ in range(2):
        assert torch.equal(torch.stack(list(engine.generate_ids(prompt, greedy)), 1), expected)
    assert not engine.graph_failed and len(engine._decoders) == 1
    # the cache-free reference runs FlexAttention for a sliding window on CUDA, the decoder SDPA on its
    # ring cache: in MoE routing their rounding can flip a token's experts, so there only most tokens agree
    agreement = (expected == reference(model, prompt, NEW)).float().mean().item()
    assert agreement == 1.0 or (name == "StoryMixtral" and agreement > 0.9), agreement


# --- the CLI's output and what it loads --------------------------------------------------------

def test_stream_json_prints_json_lines_then_the_record(checkpoints, capsys, monkeypatch):
    """As an OpenAI-style stream: a JSON line per piece ({"delta": text}), then the --json record."""
    args = ["--checkpoint", str(checkpoints / "StoryLlama"), "--prompt", "ROMEO:", "--max_new_tokens", "30",
            "--seed", "1", "--json"]
    _, out, _ = inference_py(monkeypatch, capsys, *args, "--stream")
    *deltas, record = [json.loads(line) for line in out.splitlines()]
    assert deltas and all(set(d) == {"delta"} for d in deltas)
    assert set(record) == {"prompt", "completion", "tokens", "tokens_per_s"} and record["prompt"] == "ROMEO:"
    assert "".join(d["delta"] for d in deltas) == record["completion"]
    _, out, _ = inference_py(monkeypatch, capsys, *args)
    assert json.loads(out)["completion"] == record["completion"]


@pytest.mark.parametrize("folder", ARCHITECTURES)
def test_every_folders_inference_refuses_another_architecture_as_its_app_does(folder, checkpoints, capsys,
                                                                             monkeypatch):
    """Each folder's inference.py run as a script: one line naming the script to run instead."""
    other = "StoryLlama" if folder == "SmolMixtral" else "SmolMixtral"
    code, out, err = inference_py(monkeypatch, capsys, "--checkpoint", str(checkpoints / other), "--max_new_tokens",
                                  "3", folder=folder)
    assert code == 2 and not out
    assert err == (f"error: {checkpoints / other} holds a {other} model, not {folder}: "
                   f"run {other}/inference.py instead\n")


def test_a_transformers_export_points_to_the_import(checkpoints, tmp_path, capsys, monkeypatch):
    from smolhub_hub.export import export_checkpoint

    exported = export_checkpoint(str(checkpoints / "StoryLlama"), tmp_path / "hf", verify=False)
    capsys.readouterr()  # the export's progress bars
    pointer = (f"error: {exported} is a transformers model folder, not a SmolHub checkpoint: convert it with "
               f"`python -m smolhub_hub import {exported} CHECKPOINT_DIR` and use CHECKPOINT_DIR")
    code, _, err = inference_py(monkeypatch, capsys, "--checkpoint", str(exported))
    assert code == 2 and err == pointer + "\n"
    trainer = run_script(["trainer.py", "--preset", "tiny", "--dataset", "synthetic", "--init_from", str(exported),
                          "--out_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "data")],
                         REPO / "StoryLlama", tmp_path, check=False)
    assert trainer.returncode == 2 and trainer.stderr.strip().splitlines()[-1] == pointer, trainer.stderr[-2000:]


# --- a lone surrogate --------------------------------------------------------------------------

def test_a_lone_surrogate_is_refused_in_one_line_everywhere(checkpoints, capsys, monkeypatch):
    """generate_text, inference.py (where bytes that are not UTF-8 in argv become surrogates) and the app."""
    from smolhub.app import Limits, check_request
    from smolhub.inference import generate_text, load_model

    message = ("the prompt is not valid Unicode text (it holds a lone surrogate): "
               "retype it or paste it from another source")
    engine = load_model(str(checkpoints / "StoryLlama"), device="cpu")
    for call in [lambda: generate_text(engine, "a\ud800b"),
                 lambda: "".join(generate_text(engine, "a\ud800b", stream=True)),
                 lambda: check_request("a\ud800b", 10, 0.8, 0, 1.0, 1.0, 1, Limits(2000, 512))]:
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == message
    code, out, err = inference_py(monkeypatch, capsys, "--checkpoint", str(checkpoints / "StoryLlama"),
                                  "--prompt", "a\udcffb")
    assert code == 2 and not out and err == f"error: {message}\n"


# --- data --------------------------------------------------------------------------------------

def test_a_validation_folder_may_hold_only_validation_files(tmp_path):
    from smolhub.data import iter_documents, prepare_dataset
    from smolhub.tokenizer import gpt2_tokenizer

    books = tmp_path / "books"
    (books / "val").mkdir(parents=True)
    (books / "train.txt").write_text("Once upon a time there was a dragon.\n<|endoftext|>\nIt slept.\n")
    with gzip.open(books / "val" / "valid.txt.gz", "wt", encoding="utf-8") as f:
        f.write("The knight rode home.\n")
    tok = gpt2_tokenizer(str(GPT2_DIR))
    data = prepare_dataset(str(books / "train.txt"), tok, str(tmp_path / "cache"), val_dataset=str(books / "val"))
    assert data.n_val_tokens == len(tok.encode("The knight rode home.")) + 1  # and an EOS
    with pytest.raises(UserError, match="holds only validation files \\(valid.txt.gz\\).*point --dataset"):
        iter_documents(str(books / "val"))
    with pytest.raises(UserError, match="holds only validation files"):
        prepare_dataset(str(books / "val"), tok, str(tmp_path / "cache"))
