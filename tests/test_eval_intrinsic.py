"""Intrinsic evaluation (loss, perplexity, bits per byte) of tiny checkpoints, their report cards, and the
report card's way into the pushed model card."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smolhub.config import TrainConfig
from smolhub.data import training_data
from smolhub.errors import UserError
from smolhub.eval.intrinsic import evaluate_text
from smolhub.eval.report import report_card, report_card_markdown, write_report_card
from smolhub.inference import load_model
from smolhub.tokenizer import EOS
from conftest import SHAKESPEARE
from test_export import tiny_checkpoint, tiny_tokenizer

BLOCK = 32
WINDOWS = 7
# text of several scripts, so bytes and characters differ
OPENING = "The café’s naïve king — «Ωmega» — said: "

TASKS = {
    "hellaswag": {"alias": "hellaswag", "acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.32,
                  "acc_norm_stderr,none": 0.011},
    "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.02, "exact_match_stderr,strict-match": "N/A"},
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def text_of_tokens(tokenizer, n: int) -> str:
    """A document (no surrounding whitespace) that the tokenizer makes exactly n tokens of."""
    source = OPENING + SHAKESPEARE.read_text()[5000:20000]
    for end in range(len(OPENING), len(source)):
        text = source[:end].strip()
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n:
            return text
    raise AssertionError(f"no prefix of the text is {n} tokens")


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    """A folder dataset whose validation stream, [A, EOS, the text's tokens, EOS], fills WINDOWS windows of
    BLOCK targets exactly, so the targets that are text are the text's tokens, every one of them scored."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text(SHAKESPEARE.read_text()[:20000], encoding="utf-8")
    assert len(tokenizer("A", add_special_tokens=False)["input_ids"]) == 1
    text = text_of_tokens(tokenizer, WINDOWS * BLOCK - 2)
    (folder / "val.txt").write_text(f"A\n{EOS}\n{text}\n", encoding="utf-8")
    return folder, text


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {arch: tiny_checkpoint(arch, tokenizer, root / arch, block_size=BLOCK)
            for arch in ("StoryLlama", "StoryMixtral")}


@pytest.fixture(scope="module")
def engine(checkpoints, one_thread):
    return load_model(str(checkpoints["StoryLlama"]), device="cpu")


def hand_losses(engine, text: str) -> torch.Tensor:
    """Each target's loss in nats: F.cross_entropy over the model's logits, one window at a time."""
    tok = engine.tokenizer
    ids = tok(["A", text], add_special_tokens=False)["input_ids"]
    stream = torch.tensor(ids[0] + [tok.eos_token_id] + ids[1] + [tok.eos_token_id])
    losses = []
    with torch.no_grad():
        for start in range(0, len(stream) - 1, BLOCK):
            x, y = stream[start:start + BLOCK], stream[start + 1:start + BLOCK + 1]
            logits, _ = engine.model(x[None])
            losses.append(F.cross_entropy(logits[0], y, reduction="none"))
    return torch.cat(losses), stream[1:]


def test_bits_per_byte_is_the_summed_losses_over_the_texts_bytes(engine, corpus, tmp_path):
    folder, text = corpus
    result = evaluate_text(engine, str(folder), data_dir=str(tmp_path), batch_size=3)
    losses, targets = hand_losses(engine, text)
    assert len(losses) == WINDOWS * BLOCK
    text_nats = losses[targets != engine.tokenizer.eos_token_id].double().sum().item()
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)  # the multi-byte characters count as their bytes
    assert result["bytes"] == n_bytes
    assert result["bpb"] == pytest.approx(text_nats / (math.log(2) * n_bytes), rel=1e-6)
    assert result["loss"] == pytest.approx(losses.double().mean().item(), rel=1e-6)  # EOS targets count here
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert (result["tokens"], result["windows"], result["block_size"]) == (WINDOWS * BLOCK, WINDOWS, BLOCK)
    assert (result["dataset"], result["split"]) == (str(folder), "val")
    window_losses = losses.double().view(WINDOWS, BLOCK).mean(1)
    assert result["loss_stderr"] == pytest.approx(window_losses.std().item() / math.sqrt(WINDOWS), rel=1e-6)
    assert result["perplexity_stderr"] == pytest.approx(result["perplexity"] * result["loss_stderr"])
    assert 0 < result["bpb_stderr"] < result["bpb"]


@pytest.mark.parametrize("arch", ["StoryLlama", "StoryMixtral"])
def test_the_numbers_do_not_depend_on_the_batch_size(arch, checkpoints, corpus, tmp_path, one_thread):
    engine = load_model(str(checkpoints[arch]), device="cpu")
    folder, _ = corpus
    one, five = (evaluate_text(engine, str(folder), data_dir=str(tmp_path), batch_size=b) for b in (1, 5))
    for key in ("loss", "loss_stderr", "perplexity", "bpb", "bpb_stderr"):
        assert five[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert (five["tokens"], five["bytes"]) == (one["tokens"], one["bytes"])


def test_a_token_budget_scores_the_first_whole_windows(engine, corpus, tmp_path):
    folder, text = corpus
    result = evaluate_text(engine, str(folder), data_dir=str(tmp_path), max_tokens=2 * BLOCK + 1)
    assert (result["windows"], result["tokens"]) == (3, 3 * BLOCK)
    losses, _ = hand_losses(engine, text)
    assert result["loss"] == pytest.approx(losses[:3 * BLOCK].double().mean().item(), rel=1e-6)
    single = evaluate_text(engine, str(folder), data_dir=str(tmp_path), max_tokens=1)
    assert single["windows"] == 1 and single["loss_stderr"] is None and single["bpb_stderr"] is None


def test_a_held_out_tail_is_the_trainers_validation_text(engine, tmp_path):
    """A file without a validation split: its last val_fraction, prepared in the folder the trainer's run
    reads (no second preparation), and its train split too."""
    cfg = TrainConfig(dataset=str(SHAKESPEARE), data_dir=str(tmp_path / "cache"), val_fraction=0.05)
    data = training_data(cfg, engine.tokenizer, BLOCK)
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    val = evaluate_text(engine, str(SHAKESPEARE), data_dir=str(tmp_path / "cache"), val_fraction=0.05,
                        max_tokens=20 * BLOCK)
    train = evaluate_text(engine, str(SHAKESPEARE), data_dir=str(tmp_path / "cache"), val_fraction=0.05,
                          split="train", max_tokens=20 * BLOCK)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before
    assert val["tokens"] == train["tokens"] == 20 * BLOCK
    assert data.n_val_tokens > val["tokens"] and val["loss"] != train["loss"]
    whole = evaluate_text(engine, str(SHAKESPEARE), data_dir=str(tmp_path / "cache"), val_fraction=0.05,
                          batch_size=64)
    assert whole["tokens"] == (data.n_val_tokens - 1) // BLOCK * BLOCK
    targets = np.concatenate([np.fromfile(shard, dtype=data.dtype) for shard in data.val_shards])[1:whole["tokens"] + 1]
    assert whole["bytes"] == len(engine.tokenizer.decode(targets.tolist()).encode("utf-8"))


def test_user_mistakes_are_one_line(engine, corpus, tmp_path, monkeypatch):
    folder, _ = corpus
    with pytest.raises(UserError, match="split must be one of val, train"):
        evaluate_text(engine, str(folder), data_dir=str(tmp_path), split="test")
    with pytest.raises(UserError, match="batch size must be positive"):
        evaluate_text(engine, str(folder), data_dir=str(tmp_path), batch_size=0)
    with pytest.raises(UserError, match="neither a known name nor an existing path"):
        evaluate_text(engine, str(tmp_path / "missing.txt"), data_dir=str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub to stream HuggingFaceFW/fineweb-edu"):
        evaluate_text(engine, "fineweb-edu", data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def card(engine, corpus, tmp_path_factory):
    folder, _ = corpus
    intrinsic = evaluate_text(engine, str(folder), data_dir=str(tmp_path_factory.mktemp("cache")))
    return report_card(engine, intrinsic, TASKS)


def test_report_card_json_and_markdown(engine, card, corpus, tmp_path):
    assert card["architecture"] == "StoryLlama" and card["checkpoint"] == "ckpt-0000007"
    intrinsic = card["intrinsic"]
    assert intrinsic["dataset"] == corpus[0].name  # a local dataset by its name: no local paths in a card
    assert (card["step"], card["tokens_trained"], card["dataset"]) == (7, 7 * 2048, "tinyshakespeare")
    assert card["params"] == card["active_params"] == engine.model.num_params()
    assert card["tasks"] == [
        {"task": "hellaswag", "metric": "acc", "value": 0.3, "stderr": 0.01},
        {"task": "hellaswag", "metric": "acc_norm", "value": 0.32, "stderr": 0.011},
        {"task": "gsm8k", "metric": "exact_match (strict-match)", "value": 0.02, "stderr": None},
    ]
    md_path, json_path = write_report_card(tmp_path / "cards", card)
    assert json.loads(json_path.read_text()) == card
    assert sorted(p.name for p in (tmp_path / "cards").iterdir()) == ["report_card.json", "report_card.md"]
    md = md_path.read_text()
    assert md == report_card_markdown(card)
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == len(md.splitlines()) - 2  # a heading, a blank line, one table, nothing else
    for row in [f"| date | {card['date']} | |", "| architecture | StoryLlama | |",
                "| tokens trained | 14,336 | |", "| training steps | 7 | |", "| trained on | tinyshakespeare | |",
                f"| evaluated on | {corpus[0].name} (val), {WINDOWS * BLOCK} tokens, {intrinsic['bytes']:,} bytes | |",
                f"| bits per byte | {intrinsic['bpb']:.4f} | {intrinsic['bpb_stderr']:.4f} |",
                f"| perplexity | {intrinsic['perplexity']:.4f} | {intrinsic['perplexity_stderr']:.4f} |",
                f"| loss (nats/token) | {intrinsic['loss']:.4f} | {intrinsic['loss_stderr']:.4f} |",
                "| hellaswag: acc | 0.3000 | 0.0100 |", "| gsm8k: exact_match (strict-match) | 0.0200 |  |"]:
        assert row in table, row

    tasks_only = report_card(engine, None, None)
    assert tasks_only["intrinsic"] is None and tasks_only["tasks"] == []
    assert "bits per byte" not in report_card_markdown(tasks_only)


def test_push_puts_the_report_card_into_the_model_card(checkpoints, card, capsys, monkeypatch):
    from smolhub_hub.cli import main
    from smolhub_hub.hub import plan_upload

    folder = checkpoints["StoryLlama"]
    write_report_card(folder, card)
    plan = plan_upload(str(folder), "someone/StoryLlama-tiny", max_new_tokens=8)
    assert plan.files["report_card.json"] == folder / "report_card.json"
    assert "report_card.md" not in plan.files
    bpb_row = f"| bits per byte | {card['intrinsic']['bpb']:.4f} |"
    assert "## Evaluation" in plan.card and bpb_row in plan.card and "| hellaswag: acc | 0.3000 | 0.0100 |" in plan.card
    assert "# Report card" not in plan.card

    monkeypatch.setenv("HF_TOKEN", "hf_unused")
    main(["push", str(folder), "someone/StoryLlama-tiny", "--dry_run", "--max_new_tokens", "8"])
    out = capsys.readouterr().out
    assert "  report_card.json  (" in out and bpb_row in out
