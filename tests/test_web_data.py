"""Web-scale data: Hub corpora streamed with `datasets`, tokenised by worker processes, resumable.

The Hub is unreachable here, so a local .jsonl read with `datasets.load_dataset("json",
streaming=True)` (the same streaming path) stands in for the stream."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import GPT2_DIR, script_env
from smolhub.config import TrainConfig
from smolhub.data import has_validation_split, iter_documents, prepare_dataset, synthetic_stories, training_data
from smolhub.data.__main__ import main as prepare_main
from smolhub.data.__main__ import parse_count
from smolhub.errors import UserError
from smolhub.tokenizer import gpt2_tokenizer

N_DOCS, SHARD = 12_000, 20_000  # ~12 batches of documents, ~40 shards: kills land mid-way


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer(str(GPT2_DIR))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    docs = list(synthetic_stories(N_DOCS, seed=5))
    path = tmp_path_factory.mktemp("web") / "web.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "url": f"https://example.org/{i}"}) + "\n" for i, d in enumerate(docs))
    return path, docs


def tokens(prepared, which: str) -> list[int]:
    shards = prepared.train_shards if which == "train" else prepared.val_shards
    return np.concatenate([np.fromfile(s, dtype=prepared.dtype) for s in shards]).tolist()


def prepare_in_subprocess(corpus_path: Path, cache: Path, num_proc: int, log: Path) -> subprocess.Popen:
    # Ctrl-C as a terminal delivers it: a signal mask or ignored SIGINT the test process picked up from the
    # libraries of earlier tests would pass to the child and keep the interrupt from arriving
    code = ("import signal; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"from smolhub.data import prepare_dataset; from smolhub.tokenizer import gpt2_tokenizer; "
            f"prepare_dataset({str(corpus_path)!r}, gpt2_tokenizer({str(GPT2_DIR)!r}), {str(cache)!r}, "
            f"val_fraction=0.05, block_size=64, shard_tokens={SHARD}, num_proc={num_proc})")
    with open(log, "w") as f:  # a file, not a pipe nobody reads while the test waits
        return subprocess.Popen([sys.executable, "-c", code], env=script_env(), stdout=f, stderr=subprocess.STDOUT)


def interrupt_after(proc: subprocess.Popen, cache: Path, documents: int, sig: int) -> int:
    """Send `sig` once the build has recorded at least `documents` documents; return that record."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        progress = list(cache.glob(".*.partial/progress.json"))
        try:
            done = json.loads(progress[0].read_text())["train"]["documents"] if progress else 0
        except (OSError, ValueError, KeyError):  # replaced between glob and read
            done = 0
        if done >= documents:
            proc.send_signal(sig)
            proc.wait(60)
            return done
        time.sleep(0.01)
    pytest.fail(f"the build ended (rc {proc.poll()}) before recording {documents} documents")


def test_interrupted_streaming_preparation_resumes_exactly(tmp_path, corpus, tok, capfd):
    path, docs = corpus
    reference = prepare_dataset(str(path), tok, str(tmp_path / "reference"), val_fraction=0.05, block_size=64,
                                shard_tokens=SHARD)
    everything = [i for d in docs for i in tok(d)["input_ids"] + [tok.eos_token_id]]
    assert tokens(reference, "train") + tokens(reference, "val") == everything  # the tail is held out
    assert reference.n_val_tokens == int(np.ceil(0.05 * len(everything)))

    cache = tmp_path / "cache"
    # killed outright, at whatever point of a batch or shard it is, then stopped with Ctrl-C (which
    # also stops the worker pool) a few batches further on
    first = interrupt_after(prepare_in_subprocess(path, cache, 1, tmp_path / "1.log"), cache, 1, signal.SIGKILL)
    second = interrupt_after(prepare_in_subprocess(path, cache, 2, tmp_path / "2.log"), cache, first + 3000,
                             signal.SIGINT)
    stderr = (tmp_path / "2.log").read_text()
    assert f"{first:,} documents already written" in stderr
    assert "run the same command again to continue" in stderr and "KeyboardInterrupt" in stderr
    assert 0 < first < second < N_DOCS
    assert not [p for p in cache.iterdir() if not p.name.startswith(".")]  # nothing looks finished

    capfd.readouterr()
    resumed = prepare_dataset(str(path), tok, str(cache), val_fraction=0.05, block_size=64, shard_tokens=SHARD)
    assert f"{second:,} documents already written" in capfd.readouterr().err
    assert tokens(resumed, "train") == tokens(reference, "train")
    assert tokens(resumed, "val") == tokens(reference, "val")
    assert (resumed.n_train_tokens, resumed.n_val_tokens) == (reference.n_train_tokens, reference.n_val_tokens)
    assert [Path(s).name for s in resumed.train_shards] == [Path(s).name for s in reference.train_shards]
    assert sorted(p.name for p in cache.iterdir()) == [Path(resumed.folder).name]  # no partial, no lock


def test_worker_processes_give_the_same_tokens(tmp_path, corpus, tok):
    path, docs = corpus
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_stories(2500, seed=6)))
    one, two = (prepare_dataset(str(path), tok, str(tmp_path / f"c{n}"), val_dataset=str(val), max_tokens=400_000,
                                shard_tokens=SHARD, num_proc=n) for n in (1, 2))
    assert one.n_train_tokens == 400_000 and one.n_val_tokens > 100_000  # several batches each
    assert tokens(one, "train") == tokens(two, "train")
    assert tokens(one, "val") == tokens(two, "val")
    assert Path(one.folder).name == Path(two.folder).name  # one cache key whatever num_proc
    assert tokens(one, "train")[:100] == [i for d in docs[:10] for i in tok(d)["input_ids"] + [50256]][:100]


@pytest.mark.parametrize("name,repo", [("fineweb-edu", "HuggingFaceFW/fineweb-edu"),
                                       ("fineweb", "HuggingFaceFW/fineweb"),
                                       ("openwebtext", "Skylion007/openwebtext")])
def test_web_corpora_are_streamed_and_fail_fast_offline(name, repo):
    assert not has_validation_split(name)  # validation is a held-out tail of the stream
    start = time.monotonic()
    with pytest.raises(UserError, match=f"{repo}.*--dataset path/to/file"):
        iter_documents(name)
    assert time.monotonic() - start < 30


def test_prepare_command_line(tmp_path, corpus, tok, capsys):
    """`python -m smolhub.data prepare` (run as a script in test_smoltransformer.py) writes what the
    trainer's call then finds; bad input is a UserError naming the fix."""
    path, docs = corpus
    cache = tmp_path / "cache"
    prepare_main(["prepare", "--dataset", str(path), "--tokenizer", str(GPT2_DIR), "--max_tokens", "20K",
                  "--val_fraction", "0.1", "--data_dir", str(cache), "--num_proc", "2"])
    out = capsys.readouterr().out
    assert "20,000 train and" in out
    assert f"--dataset {path} --val_fraction 0.1 --max_tokens 20000 --tokenizer {GPT2_DIR} --data_dir {cache}" in out
    folder = training_data(TrainConfig(dataset=str(path), val_fraction=0.1, max_tokens=20_000, data_dir=str(cache)),
                           tok, block_size=512).folder
    assert sorted(p.name for p in cache.iterdir()) == [Path(folder).name]
    with pytest.raises(UserError, match="HuggingFaceFW/fineweb-edu.*--dataset path/to/file"):
        prepare_main(["prepare", "--dataset", "fineweb-edu", "--tokenizer", str(GPT2_DIR), "--data_dir", str(cache)])
    with pytest.raises(UserError, match="100M"):
        prepare_main(["prepare", "--dataset", str(path), "--tokenizer", "gpt2", "--max_tokens", "lots"])
    with pytest.raises(UserError, match="required: --tokenizer"):
        prepare_main(["prepare", "--dataset", str(path)])


def test_token_counts():
    assert [parse_count(s) for s in ("5000", "100M", "1B", "1.5B", "20k")] == \
        [5000, 100_000_000, 1_000_000_000, 1_500_000_000, 20_000]
    for bad in ("1.0001K", "-5", "1e9", "M"):
        with pytest.raises(Exception, match="whole number of tokens"):
            parse_count(bad)
