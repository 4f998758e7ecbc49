"""Fine-tuning data: every row form, bad rows reported where they are, truncation counted, packing
layout and targets, exact resume, disjoint DDP shares, preference batches, and a fast offline failure."""
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import GPT2_DIR

from smolhub.chat import add_chat_format, encode_chat, encode_prompt
from smolhub.errors import UserError
from smolhub.finetune.data import (
    PreferenceData,
    PreferenceLoader,
    SFTData,
    SFTLoader,
    encode_sft_example,
    load_examples,
)
from smolhub.objectives import IGNORE_INDEX
from smolhub.tokenizer import gpt2_tokenizer

USER, REPLY = {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}
OTHER = {"role": "assistant", "content": "Seven."}


@pytest.fixture(scope="module")
def tok():
    return add_chat_format(gpt2_tokenizer(str(GPT2_DIR)))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat(i: int, words: int = 3) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": " ".join(f"word{i}" for _ in range(words))}]


def test_every_sft_row_form(tmp_path):
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Name a colour", "input": "of the sky.", "output": "Blue."},
        {"messages": [{"role": "system", "content": "Be brief."}, USER, REPLY]},
        {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"prompt": [USER, OTHER, USER], "completion": [REPLY]},
    ]
    train, val = load_examples(str(write_jsonl(tmp_path / "rows.jsonl", rows)), "sft", val_fraction=0)
    assert val == []
    assert train == [
        ([USER, REPLY], 0),
        ([{"role": "user", "content": "Name a colour\n\nof the sky."}, REPLY], 0),
        ([{"role": "system", "content": "Be brief."}, USER, REPLY], 0),
        ([USER, REPLY], 0),
        ([USER, REPLY], 1),
        ([USER, OTHER, USER, REPLY], 3),
    ]


def test_prompt_completion_trains_only_the_completion(tok):
    """An assistant turn inside the prompt is context, not a target; in `messages` every assistant turn trains."""
    messages = [USER, OTHER, USER, REPLY]
    ids, mask = encode_sft_example(tok, messages, 3)
    full_ids, full_mask = encode_chat(tok, messages)
    assert ids == full_ids
    n_prompt = len(encode_chat(tok, messages[:3])[0])
    assert mask == [0] * n_prompt + full_mask[n_prompt:]
    assert sum(full_mask[:n_prompt]) > 0 and sum(mask) == sum(full_mask[n_prompt:]) > 0


def test_every_preference_row_form(tmp_path):
    want = ([USER], [REPLY], [OTHER])
    rows = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
        {"prompt": [USER], "chosen": [REPLY], "rejected": [OTHER]},
        {"prompt": "Name a colour.", "chosen": [USER, REPLY], "rejected": [USER, OTHER]},  # ultrafeedback
        {"chosen": [USER, REPLY], "rejected": [USER, OTHER]},  # implicit prompt
    ]
    assert load_examples(str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "dpo", val_fraction=0)[0] == [want] * 4
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows[2:3] * 2), path)
    assert load_examples(str(path), "dpo", val_fraction=0)[0] == [want] * 2


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}', "line 2: not valid JSON"),
    ('{"text": "plain"}', "line 2: a fine-tuning row needs .*this one has 'text'"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "line 2: message 0 of 'messages' is"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: 'messages' has no assistant message"),
    ('{"instruction": "", "output": "x"}', "line 2: 'instruction' must be non-empty text"),
    ('{"prompt": "hi", "completion": [{"role": "user", "content": "x"}]}', "line 2: 'completion' must end with"),
    ('["a", "list"]', "line 2: a row must be an object"),
])
def test_bad_sft_rows_are_reported_with_their_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": chat(0)}, line, {"messages": chat(1)}])
    with pytest.raises(UserError, match=f"{path} {message}"):
        load_examples(str(path), "sft")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "need a 'prompt'"),
    ({"chosen": [USER, REPLY], "rejected": [{"role": "user", "content": "other"}, OTHER]}, "share|first messages differ"),
    ({"prompt": [USER], "chosen": [USER], "rejected": [OTHER]}, "'chosen' holds no reply after the prompt"),
    ({"prompt": "hi", "chosen": [USER, REPLY, USER], "rejected": "x"}, "'chosen' must end with an assistant message"),
])
def test_bad_preference_rows_are_reported_with_their_item_or_row_index(tmp_path, row, message):
    good = {"prompt": [USER], "chosen": [REPLY], "rejected": [OTHER]}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good, good, row], indent=1))
    with pytest.raises(UserError, match=f"{path} item 3: .*({message})"):
        load_examples(str(path), "dpo")
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": "a"}]), parquet)
    with pytest.raises(UserError, match=f"{parquet} row index 1: a preference row needs"):
        load_examples(str(parquet), "dpo")


def test_held_out_rows_are_fixed_and_disjoint(tmp_path):
    rows = [{"messages": chat(i)} for i in range(40)]
    path = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    train, val = load_examples(path, "sft", val_fraction=0.1)
    assert (len(train), len(val)) == (36, 4)
    assert sorted(m[0]["content"] for m, _ in train + val) == sorted(r["messages"][0]["content"] for r in rows)
    assert load_examples(path, "sft", val_fraction=0.1) == (train, val)
    other = str(write_jsonl(tmp_path / "other.jsonl", rows[:3]))
    assert load_examples(path, "sft", val_dataset=other) == ([(r["messages"], 0) for r in rows], [(chat(i), 0) for i in range(3)])
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows[:5])
    write_jsonl(folder / "validation.jsonl", rows[5:7])
    assert load_examples(str(folder), "sft", val_fraction=0.5) == ([(chat(i), 0) for i in range(5)],
                                                                  [(chat(i), 0) for i in range(5, 7)])
    with pytest.raises(UserError, match="too few to hold out"):
        load_examples(str(write_jsonl(tmp_path / "tiny.jsonl", rows[:2])), "sft", val_fraction=0.1)


def test_packing_layout_targets_and_truncation(tok):
    examples = [(chat(i, words), 0) for i, words in enumerate([2, 30, 5, 1, 8, 3, 12, 4])]
    block = 64
    data = SFTData(examples, tok, block)
    encoded = [encode_chat(tok, m) for m, _ in examples]
    long = [len(ids) > block + 1 for ids, _ in encoded]
    assert data.truncated == sum(long) == 1 and data.skipped == 0
    assert data.n_rows < len(examples)  # rows hold several examples
    seen = []
    for r in range(data.n_rows):
        tokens, targets, docs = data.tokens[r].tolist(), data.targets[r].tolist(), data.documents[r].tolist()
        assert len(tokens) == block + 1 and len(targets) == len(docs) == block
        at = 0
        for doc in range(max(docs) + 1):
            span = [t for t, d in enumerate(docs) if d == doc]
            assert span == list(range(at, at + len(span)))  # a document is one run, numbered in order
            piece = tokens[at:at + len(span)]
            # a document's last token may be the row's extra one, which is only ever a target
            match = [i for i, (ids, _) in enumerate(encoded)
                     if ids[:len(piece)] == piece and len(ids[:block + 1]) - len(piece) in (0, 1)]
            if doc < max(docs) or match:
                (i,) = match
                ids, mask = encoded[i][0][:block + 1], encoded[i][1][:block + 1]
                seen.append(i)
                assert targets[at:at + len(span)] == [ids[k] if k < len(ids) and mask[k] else IGNORE_INDEX
                                                      for k in range(1, len(span) + 1)]
            else:  # the padded tail: its own document, nothing to learn
                assert set(targets[at:]) == {IGNORE_INDEX} and set(tokens[at:]) == {tok.eos_token_id}
            at += len(span)
    assert sorted(seen) == list(range(len(examples)))
    assert data.n_targets == sum(sum(m[1:block + 1]) for _, m in encoded)

    only_prompt = [([{"role": "user", "content": "long " * 200}, REPLY], 0)]
    skipped = SFTData(examples + only_prompt, tok, block)
    assert (skipped.truncated, skipped.skipped) == (2, 1)
    assert "9 examples (2 truncated to 65 tokens, 1 of them left out" in skipped.describe()


def test_sft_loader_batches_resume_and_ddp_shares(tok):
    data = SFTData([(chat(i, 1 + i % 7), 0) for i in range(60)], tok, 32)
    loader = SFTLoader(data, 3, seed=5)
    assert loader.batches_per_epoch == data.n_rows // 3
    x, y, docs = loader.next_batch()
    assert x.shape == y.shape == docs.shape == (3, 32) and x.dtype == y.dtype == docs.dtype == torch.long
    for _ in range(loader.batches_per_epoch + 2):  # over an epoch edge
        loader.next_batch()
    state = loader.state_dict()
    ahead = [loader.next_batch() for _ in range(loader.batches_per_epoch)]
    resumed = SFTLoader(data, 3, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(ahead, [resumed.next_batch() for _ in ahead]):
        assert all(torch.equal(s, t) for s, t in zip(a, b))
    with pytest.raises(UserError, match="same dataset"):
        SFTLoader(SFTData([(chat(i), 0) for i in range(60)], tok, 16), 3).load_state_dict(state)
    with pytest.raises(ValueError, match="whole rows"):
        loader.next_batch(16)

    def rows(batch):
        return {tuple(r) for r in batch[0].tolist()}

    ranks = [SFTLoader(data, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    single = SFTLoader(data, 4, seed=1)
    for _ in range(ranks[0].batches_per_epoch):
        a, b = (rows(r.next_batch()) for r in ranks)
        assert not a & b and a | b == rows(single.next_batch())
    val = SFTLoader(data, 4, shuffle=False)
    assert torch.equal(val.next_batch()[0], data.tokens[:4, :-1].long())
    with pytest.raises(UserError, match="too few for one batch"):
        SFTLoader(data, data.n_rows + 1)


def test_preference_batches(tok):
    examples = [([{"role": "user", "content": f"Q{i}"}], [{"role": "assistant", "content": "yes " * i}],
                 [{"role": "assistant", "content": "no"}]) for i in range(1, 9)]
    data = PreferenceData(examples, tok, 20)
    lengths = [len(encode_chat(tok, p + c)[0]) for p, c, _ in examples]
    assert min(lengths) < 20 < max(lengths)
    assert (data.truncated, data.skipped) == (sum(n > 20 for n in lengths), 0)
    loader = PreferenceLoader(data, 4, shuffle=False)
    chosen, chosen_labels, rejected, rejected_labels = loader.next_batch()
    width = max(max(len(c), len(r)) for _, c, r in data.pairs[:4])
    assert chosen.shape == rejected.shape == chosen_labels.shape == (4, width)
    for row, (prompt, good, bad) in enumerate(examples[:4]):
        n = len(encode_prompt(tok, prompt))
        for ids, labels, reply in ((chosen, chosen_labels, good), (rejected, rejected_labels, bad)):
            full = encode_chat(tok, prompt + reply)[0][:20]
            assert ids[row, :len(full)].tolist() == full
            assert labels[row, :n].eq(IGNORE_INDEX).all() and labels[row, len(full):].eq(IGNORE_INDEX).all()
            assert labels[row, n:len(full)].tolist() == full[n:]
    assert PreferenceLoader(data, 4, shuffle=False, fixed_width=True).next_batch()[0].shape == (4, 20)

    state = loader.state_dict()
    ahead = [loader.next_batch() for _ in range(3)]
    resumed = PreferenceLoader(data, 4, shuffle=False)
    resumed.load_state_dict(state)
    assert all(torch.equal(s, t) for a in ahead for s, t in zip(a, resumed.next_batch()))

    data.precompute_reference(lambda batch: (-batch[1].ne(IGNORE_INDEX).sum(1).float(), batch[3][:, 0].float()), 3)
    batch = PreferenceLoader(data, 4, shuffle=False).next_batch()
    assert len(batch) == 6
    assert batch[4].tolist() == (-batch[1].ne(IGNORE_INDEX).sum(1)).float().tolist()
    assert batch[5].tolist() == [float(IGNORE_INDEX)] * 4
    long_prompt = PreferenceData([([{"role": "user", "content": "long " * 30}], [REPLY], [OTHER])] + examples, tok, 20)
    assert long_prompt.skipped == 1 and len(long_prompt) == len(examples)


def test_tokenised_examples_are_cached(tok, tmp_path):
    examples = [(chat(i), 0) for i in range(6)]
    first = SFTData(examples, tok, 32, cache_dir=str(tmp_path))
    cached = list(tmp_path.glob("finetune-sft-*.pt"))
    assert len(cached) == 1
    again = SFTData(examples, tok, 32, cache_dir=str(tmp_path))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.targets, again.targets)
    SFTData(examples[:5], tok, 32, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("finetune-sft-*.pt"))) == 2


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_offline_hub_dataset_fails_fast_with_one_line(tmp_path, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub to load yahma/alpaca-cleaned") as e:
        load_examples("yahma/alpaca-cleaned", "sft")
    assert time.perf_counter() - start < 5
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="neither an existing path nor a Hub id"):
        load_examples(str(tmp_path / "missing.jsonl"), "sft")
