import gzip
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from smolhub.config import TrainConfig
from smolhub.data import (PackedLoader, dataset_identity, has_validation_split, iter_documents,
                          prepare_dataset, synthetic_stories, training_data)
from smolhub.errors import UserError
from smolhub.tokenizer import EOS, gpt2_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
DOCS = ["Once upon a time there was a cat.", "The cat sat.\n\nThen it slept.", "Ünïcode 😀 story."]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer(str(SHARED / "gpt2"))


def stream(tok, docs) -> list[int]:
    """The token stream prepare_dataset should write for `docs`."""
    return [i for doc in docs for i in tok(doc)["input_ids"] + [tok.eos_token_id]]


def read(shards, dtype) -> list[int]:
    return np.concatenate([np.fromfile(s, dtype=dtype) for s in shards]).tolist()


def write_jsonl(path: Path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------- sources


def test_txt_documents_are_separated_by_eos_lines(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(f"{DOCS[0]}\n{EOS}\n{DOCS[1]}\n  {EOS}  \n\n{DOCS[2]}\n{EOS}\n\n")
    assert list(iter_documents(str(path))) == DOCS
    whole = tmp_path / "book.txt"
    whole.write_text("Line one.\n\nLine two.\n")
    assert list(iter_documents(str(whole))) == ["Line one.\n\nLine two."]
    with gzip.open(tmp_path / "stories.txt.gz", "wt", encoding="utf-8") as f:
        f.write(path.read_text())
    assert list(iter_documents(str(tmp_path / "stories.txt.gz"))) == DOCS


def test_jsonl_json_and_parquet(tmp_path):
    rows = [{"id": i, "text": d} for i, d in enumerate(DOCS)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl.gz", rows, opener=gzip.open)
    (tmp_path / "c.json").write_text(json.dumps(rows))
    pq.write_table(pa.table({"text": DOCS, "n": [1, 2, 3]}), tmp_path / "d.parquet")
    for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.parquet"):
        assert list(iter_documents(str(tmp_path / name))) == DOCS, name
    write_jsonl(tmp_path / "nocol.jsonl", [{"body": "x", "title": "y"}])
    with pytest.raises(UserError, match="no 'text' column.*body, title"):
        list(iter_documents(str(tmp_path / "nocol.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
    with pytest.raises(UserError, match="cannot read"):
        list(iter_documents(str(tmp_path / "broken.jsonl")))


def test_folder_is_recursive_sorted_and_splits_validation_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "part2.txt").write_text(f"two\n{EOS}\nthree\n")
    (tmp_path / "a.txt").write_text("one\n")
    write_jsonl(tmp_path / "b" / "part3.jsonl", [{"text": "four"}])
    (tmp_path / "valid.txt").write_text(f"held\n{EOS}\nout\n")
    (tmp_path / "notes.md").write_text("not data")
    assert list(iter_documents(str(tmp_path))) == ["one", "two", "three", "four"]
    many = tmp_path / "many"
    many.mkdir()
    for i in reversed(range(30)):  # created out of order: the listing order must not leak through
        (many / f"{i:02d}.txt").write_text(str(i))
    assert list(iter_documents(str(many))) == [str(i) for i in range(30)]
    assert has_validation_split(str(tmp_path))
    assert list(iter_documents(str(tmp_path), "validation")) == ["held", "out"]
    assert not has_validation_split(str(tmp_path / "a.txt"))
    with pytest.raises(ValueError):
        iter_documents(str(tmp_path / "a.txt"), "validation")


def test_bad_local_sources(tmp_path):
    with pytest.raises(UserError, match="--dataset"):
        iter_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(UserError, match="not a supported file"):
        iter_documents(str(tmp_path / "data.csv"))
    with pytest.raises(UserError, match="holds no .txt"):
        iter_documents(str(tmp_path))
    (tmp_path / "empty.txt").write_text(f"\n{EOS}\n\n")
    with pytest.raises(UserError, match="holds no text"):
        list(iter_documents(str(tmp_path / "empty.txt")))


def test_dataset_identity_follows_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = dataset_identity(str(path))
    path.write_text("one, changed")
    assert dataset_identity(str(path)) != before
    assert dataset_identity("synthetic") == "synthetic"


def test_synthetic_stories_are_deterministic_and_varied():
    a, b = list(synthetic_stories(500, seed=3)), list(synthetic_stories(500, seed=3))
    assert a == b
    assert a != list(synthetic_stories(500, seed=4))
    assert len(set(a)) == 500
    for story in a:
        sentences = re.split(r'(?<=[.!])"? (?=[A-Z"])', story)
        assert 3 <= len(sentences) <= 9, story  # "Oh no!" counts as its own
        assert story.count('"') % 2 == 0, story
    words = {w for s in a for w in re.findall(r"[a-z]+", s)}
    assert len(words) > 200
    train, val = iter_documents("synthetic"), iter_documents("synthetic", "validation")
    assert next(train) != next(val)


def test_unreachable_hub_dataset_is_a_fast_user_error():
    start = time.monotonic()
    with pytest.raises(UserError, match="--dataset path/to/file"):
        iter_documents("tinystories")
    assert time.monotonic() - start < 30


def test_tinyshakespeare_download_or_clear_error(tmp_path):
    try:
        docs = list(iter_documents("tinyshakespeare", cache_dir=str(tmp_path)))
    except UserError as e:
        assert "--dataset path/to/input.txt" in str(e)
        assert not list(tmp_path.rglob("input.txt"))  # nothing half-downloaded looks complete
    else:
        assert len(docs) == 1 and docs[0].startswith("First Citizen")


# ---------------------------------------------------------------- prepare


def test_prepare_writes_exact_token_stream(tmp_path, tok):
    data = tmp_path / "corpus"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"text": d} for d in DOCS])
    (data / "validation.txt").write_text(f"Held out one.\n{EOS}\nHeld out two.\n")
    p = prepare_dataset(str(data), tok, str(tmp_path / "cache"))
    assert p.dtype == "uint16" and p.vocab_size == 50257
    assert read(p.train_shards, p.dtype) == stream(tok, DOCS)
    assert read(p.val_shards, p.dtype) == stream(tok, ["Held out one.", "Held out two."])
    assert p.n_train_tokens == len(stream(tok, DOCS))
    meta = json.loads((Path(p.folder) / "meta.json").read_text())
    assert meta["n_val_tokens"] == p.n_val_tokens and meta["eos_id"] == 50256
    assert meta["train_shards"] == ["train_000.bin"]


def test_prepare_shards_and_caps(tmp_path, tok):
    docs = list(synthetic_stories(40, seed=0))
    write_jsonl(tmp_path / "s.jsonl", [{"text": d} for d in docs])
    val = tmp_path / "v.txt"
    val.write_text("A separate validation text.")
    p = prepare_dataset(str(tmp_path / "s.jsonl"), tok, str(tmp_path / "c"), val_dataset=str(val),
                        shard_tokens=500)
    assert len(p.train_shards) == math.ceil(len(stream(tok, docs)) / 500)
    assert all(Path(s).stat().st_size <= 500 * 2 for s in p.train_shards)
    assert read(p.train_shards, p.dtype) == stream(tok, docs)
    assert read(p.val_shards, p.dtype) == stream(tok, ["A separate validation text."])
    capped = prepare_dataset(str(tmp_path / "s.jsonl"), tok, str(tmp_path / "c"), val_dataset=str(val),
                             max_tokens=777)
    assert capped.folder != p.folder
    assert read(capped.train_shards, capped.dtype) == stream(tok, docs)[:777]


def test_prepare_holds_out_the_tail(tmp_path, tok):
    text = SHAKESPEARE.read_text()[:60_000]
    (tmp_path / "play.txt").write_text(text)
    full = stream(tok, [text.strip()])
    p = prepare_dataset(str(tmp_path / "play.txt"), tok, str(tmp_path / "c"), val_fraction=0.1,
                        block_size=64, shard_tokens=4096)
    n_val = math.ceil(0.1 * len(full))
    assert (p.n_train_tokens, p.n_val_tokens) == (len(full) - n_val, n_val)
    assert read(p.train_shards, p.dtype) + read(p.val_shards, p.dtype) == full
    small_val = prepare_dataset(str(tmp_path / "play.txt"), tok, str(tmp_path / "c"),
                                val_fraction=0.0001, block_size=64)
    assert small_val.n_val_tokens == 65  # never less than one block
    capped = prepare_dataset(str(tmp_path / "play.txt"), tok, str(tmp_path / "c"), val_fraction=0.1,
                             block_size=64, max_tokens=5000)
    assert capped.n_train_tokens == 5000
    assert read(capped.train_shards, p.dtype) == full[:5000]
    assert read(capped.val_shards, p.dtype) == full[5000:5000 + capped.n_val_tokens]
    assert capped.n_val_tokens == math.ceil(0.1 * math.ceil(5000 / 0.9))  # 10% of what was read
    (tmp_path / "tiny.txt").write_text("Too short to train on.")
    with pytest.raises(UserError, match="too few"):
        prepare_dataset(str(tmp_path / "tiny.txt"), tok, str(tmp_path / "c"), block_size=64)
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]


def test_prepare_reuses_cache_and_ignores_killed_builds(tmp_path, tok):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, [{"text": d} for d in list(synthetic_stories(30, seed=1))])
    cache = tmp_path / "cache"
    first = prepare_dataset(str(src), tok, str(cache), block_size=32)
    stamp = [Path(s).stat().st_mtime_ns for s in first.train_shards + first.val_shards]
    # garble the source but keep its size and mtime (what identifies it): reading it again would fail
    st = src.stat()
    original = src.read_bytes()
    src.write_bytes(b"x" * len(original))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = prepare_dataset(str(src), tok, str(cache), block_size=32)
    assert again == first
    src.write_bytes(original)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [Path(s).stat().st_mtime_ns for s in again.train_shards + again.val_shards] == stamp

    # a build killed just before its rename leaves a temp folder that must never be taken for a
    # finished one, even with a meta.json inside
    folder = Path(first.folder)
    killed = cache / f".{folder.name}.tmp-killed"
    folder.rename(killed)
    (killed / "train_000.bin").write_bytes(b"\0\0" * 10)
    rebuilt = prepare_dataset(str(src), tok, str(cache), block_size=32)
    assert rebuilt.folder == first.folder
    assert read(rebuilt.train_shards, rebuilt.dtype) + read(rebuilt.val_shards, rebuilt.dtype) == \
        stream(tok, list(synthetic_stories(30, seed=1)))

    # a build that fails half-way leaves nothing behind
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}])
    with open(tmp_path / "bad.jsonl", "a") as f:
        f.write('{"text": broken\n')
    with pytest.raises(UserError):
        prepare_dataset(str(tmp_path / "bad.jsonl"), tok, str(cache), val_dataset=str(src))
    assert sorted(p.name for p in cache.iterdir()) == sorted([folder.name, killed.name])

    # editing the source makes a new folder
    write_jsonl(src, [{"text": d} for d in list(synthetic_stories(31, seed=1))])
    assert prepare_dataset(str(src), tok, str(cache), block_size=32).folder != first.folder


def test_training_data_holds_out_a_window_of_the_model_context(tmp_path, tok):
    """Every model of context up to 1024 reads one preparation; a longer one gets a validation tail
    it can evaluate on (one window of block_size + 1 tokens), not the 1025 tokens of a 1024 model."""
    (tmp_path / "play.txt").write_text(SHAKESPEARE.read_text()[:20_000])
    cfg = TrainConfig(dataset=str(tmp_path / "play.txt"), data_dir=str(tmp_path / "c"))
    short, default = (training_data(cfg, tok, block_size) for block_size in (128, 1024))
    assert short.folder == default.folder and default.n_val_tokens == 1025
    assert training_data(cfg, tok, 2048).n_val_tokens == 2049


def test_trainer_prepares_data_for_its_context(tmp_path):
    """A 2048-token model on a small held-out corpus: its validation batch needs 2049 tokens."""
    from StoryLlama.trainer import main as train_main

    (tmp_path / "play.txt").write_text(SHAKESPEARE.read_text()[:40_000])
    result = train_main(["--preset", "tiny", "--dataset", str(tmp_path / "play.txt"), "--block_size", "2048",
                         "--batch_size", "1", "--max_steps", "1", "--warmup_steps", "0", "--eval_interval", "1",
                         "--eval_batches", "1", "--sample_interval", "0", "--data_dir", str(tmp_path / "data"),
                         "--out_dir", str(tmp_path / "out")])
    assert result["val_loss"] is not None


def test_prepare_synthetic_uses_its_validation_split(tmp_path, tok):
    p = prepare_dataset("synthetic", tok, str(tmp_path), max_tokens=20_000)
    assert p.n_train_tokens == 20_000
    val = read(p.val_shards, p.dtype)
    assert val[:50] == stream(tok, [next(iter_documents("synthetic", "validation"))])[:50]
    loader = PackedLoader(p.train_shards, p.dtype, batch_size=2, block_size=64)
    x, y = loader.next_batch()
    assert tok.decode(x[0]) in tok.decode(read(p.train_shards, p.dtype))


# ---------------------------------------------------------------- loader


def arange_shards(tmp_path, n, cuts=(), dtype="uint32") -> list[str]:
    """Shards holding the tokens 0..n-1, split at `cuts`, so a token's value is its position."""
    paths = []
    for i, part in enumerate(np.split(np.arange(n, dtype=dtype), list(cuts))):
        paths.append(str(tmp_path / f"train_{i:03d}.bin"))
        part.tofile(paths[-1])
    return paths


def test_loader_packs_every_chunk_once_per_epoch(tmp_path):
    block, batch = 8, 3
    shards = arange_shards(tmp_path, 8 * 30 + 1, cuts=(50, 51, 200))
    loader = PackedLoader(shards, "uint32", batch, block, seed=5)
    assert loader.n_chunks == 30 and len(loader) == loader.batches_per_epoch == 10
    epochs = []
    for _ in range(2):
        starts = []
        for _ in range(len(loader)):
            x, y = loader.next_batch()
            assert x.shape == y.shape == (batch, block) and x.dtype == y.dtype == torch.int64
            assert torch.equal(y, x + 1)  # targets are the next tokens
            assert torch.equal(x, x[:, :1] + torch.arange(block))  # contiguous chunks ...
            starts += (x[:, 0] // block).tolist()
            assert (x[:, 0] % block == 0).all()  # ... starting on block boundaries
        assert sorted(starts) == list(range(30))
        epochs.append(starts)
    assert epochs[0] != epochs[1]  # each epoch has its own order
    ordered = PackedLoader(shards, "uint32", batch, block, shuffle=False)
    assert (ordered.next_batch()[0][:, 0] // block).tolist() == [0, 1, 2]


def test_loader_drops_the_remainder_and_rolls_over(tmp_path):
    loader = PackedLoader(arange_shards(tmp_path, 8 * 7 + 1), "uint32", batch_size=3, block_size=8)
    seen = [(loader.next_batch()[0][:, 0] // 8).tolist() for _ in range(2)]
    assert len(set(sum(seen, []))) == 6
    loader.next_batch()
    assert loader.epoch == 1


def test_ranks_are_disjoint_and_add_up_to_one_process(tmp_path):
    shards = arange_shards(tmp_path, 16 * 41 + 5, cuts=(100,))
    single = PackedLoader(shards, "uint32", batch_size=6, block_size=16, seed=1)
    ranks = [PackedLoader(shards, "uint32", batch_size=2, block_size=16, rank=r, world_size=3, seed=1)
             for r in range(3)]
    assert len(single) == len(ranks[0]) == 6
    for _ in range(15):  # more than two epochs
        xs = [r.next_batch()[0] for r in ranks]
        starts = [set((x[:, 0] // 16).tolist()) for x in xs]
        assert not (starts[0] & starts[1] or starts[0] & starts[2] or starts[1] & starts[2])
        assert torch.equal(torch.cat(xs), single.next_batch()[0])


def test_resume_sees_the_same_batches(tmp_path):
    shards = arange_shards(tmp_path, 16 * 23 + 1)
    loader = PackedLoader(shards, "uint32", batch_size=4, block_size=16, seed=7)
    for _ in range(7):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # it must survive a checkpoint file
    expected = [loader.next_batch(8) for _ in range(10)]
    resumed = PackedLoader(shards, "uint32", batch_size=4, block_size=16, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch(8) for _ in range(10)]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    other = PackedLoader(shards, "uint32", batch_size=4, block_size=8)
    with pytest.raises(UserError, match="same dataset"):
        other.load_state_dict(state)


def test_progressive_seq_len_splits_each_chunk(tmp_path):
    shards = arange_shards(tmp_path, 2000, dtype="uint16")
    full = PackedLoader(shards, "uint16", batch_size=3, block_size=16, seed=2)
    short = PackedLoader(shards, "uint16", batch_size=3, block_size=16, seed=2)
    x, y = full.next_batch()
    sx, sy = short.next_batch(seq_len=4)
    assert sx.shape == sy.shape == (12, 4)
    assert torch.equal(sx, x.reshape(12, 4)) and torch.equal(sy, y.reshape(12, 4))
    chunk = torch.arange(int(x[1, 0]), int(x[1, 0]) + 17)
    for j in range(4):
        assert torch.equal(sx[4 + j], chunk[j * 4:(j + 1) * 4])
        assert torch.equal(sy[4 + j], chunk[j * 4 + 1:(j + 1) * 4 + 1])
    for bad in (5, 32, -4):
        with pytest.raises(ValueError):
            short.next_batch(seq_len=bad)


def test_loader_too_little_data(tmp_path):
    shards = arange_shards(tmp_path, 100)
    with pytest.raises(UserError, match=r"100 tokens are too few for one batch, which needs 129"):
        PackedLoader(shards, "uint32", batch_size=2, block_size=32, world_size=2)
