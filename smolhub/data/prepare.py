"""Documents -> token ids on disk, once per (data, tokenizer).

A prepared dataset is a folder of flat binary shards (uint16 when the vocabulary fits, else
uint32) holding every document's ids followed by EOS, plus meta.json. The folder is built under a
hidden `.partial` name and renamed when complete, so a killed run never leaves one that looks
finished, and the next run with the same data and tokenizer reuses it without tokenising again.

A build is resumable, which is what makes corpora streamed from the Hub practical: after every
batch of documents, the partial folder's progress.json records how many documents and tokens are
safely on disk. A run that finds a partial folder cuts its shards back to that count, skips that
many documents of the stream and carries on, so the result equals an uninterrupted build's.
`num_proc` worker processes tokenise batches in parallel; the batches are written in stream order.
"""
import contextlib
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
from collections import deque
from dataclasses import dataclass
from functools import partial
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from smolhub.config import TrainConfig
from smolhub.data.sources import HUB_DATASETS, dataset_identity, has_validation_split, iter_documents
from smolhub.errors import UserError
from smolhub.tokenizer import build_tokenizer, tokenizer_fingerprint

FORMAT_VERSION = 1  # bump when the layout or the tokenisation rules change, to invalidate caches
SHARD_TOKENS = 100_000_000
HELD_OUT_WINDOW = 1024  # a run's held-out validation is never shorter than one window of this many tokens
_BATCH_DOCS, _BATCH_CHARS = 1024, 4_000_000  # one tokenizer call: parallel across docs, bounded RAM


@dataclass(frozen=True)
class PreparedData:
    folder: str
    train_shards: list[str]
    val_shards: list[str]
    dtype: str
    n_train_tokens: int
    n_val_tokens: int
    vocab_size: int


class _ShardWriter:
    """Appends token ids to `{prefix}_000.bin`, `{prefix}_001.bin`, ... of at most `shard_tokens` each.

    Every shard but the last is full, so a token count alone says which shards hold what: that
    is how a resumed build finds its shards (`restore`)."""

    def __init__(self, folder: Path, prefix: str, dtype: str, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.names: list[str] = []
        self.n_tokens = 0
        self._file = None
        self._room = 0  # tokens the open shard can still take

    def restore(self, n_tokens: int) -> None:
        """Count the first `n_tokens`, as an earlier run recorded them, as written."""
        self.n_tokens = n_tokens
        self.names = [f"{self.prefix}_{i:03d}.bin" for i in range(-(-n_tokens // self.shard_tokens))]

    def sizes(self) -> list[int]:
        return [min(self.shard_tokens, self.n_tokens - i * self.shard_tokens) for i in range(len(self.names))]

    def reopen(self) -> None:
        """Cut the shards on disk back to the first n_tokens (dropping whatever a killed build wrote
        after its last record) and continue appending there."""
        itemsize = np.dtype(self.dtype).itemsize
        for path in self.folder.glob(f"{self.prefix}_*.bin"):
            if path.name not in self.names:
                path.unlink()
        if not self.names:
            return
        for name, n in zip(self.names, self.sizes()):
            path = self.folder / name
            if not path.is_file() or path.stat().st_size < n * itemsize:
                raise UserError(f"the unfinished preparation in {self.folder} is damaged ({name} is missing "
                                f"or short): delete that folder and run again")
        path = self.folder / self.names[-1]
        os.truncate(path, self.sizes()[-1] * itemsize)
        self._file = open(path, "ab")
        self._room = self.shard_tokens - self.sizes()[-1]

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._room == 0:
                self._next_shard()
            piece, ids = ids[:self._room], ids[self._room:]
            piece.tofile(self._file)
            self._room -= len(piece)
            self.n_tokens += len(piece)

    def _next_shard(self) -> None:
        self.close()
        self.names.append(f"{self.prefix}_{len(self.names):03d}.bin")
        self._file = open(self.folder / self.names[-1], "wb")
        self._room = self.shard_tokens

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Progress:
    """progress.json of a partial build: what is safely on disk, per part ("train", "val")."""

    def __init__(self, folder: Path):
        self.path = folder / "progress.json"
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def part(self, name: str) -> dict:
        return self.state.setdefault(name, {"documents": 0, "tokens": 0, "done": False})

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous record, never half of one

    def documents(self) -> int:
        return sum(self.state[part]["documents"] for part in ("train", "val") if part in self.state)


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tokenizer, dtype: str, batch: list[str]) -> np.ndarray:
    """The documents' ids, each followed by EOS, end to end."""
    ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.fromiter(chain.from_iterable(chain(doc, (eos,)) for doc in ids), dtype=dtype,
                       count=sum(len(doc) + 1 for doc in ids))


_worker_args: tuple = ()  # (tokenizer, dtype) in a tokenising worker process


def _start_worker(tokenizer, dtype: str) -> None:
    global _worker_args
    # the processes already use every core; the tokenizer's own thread pool would oversubscribe them
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the pool
    _worker_args = (tokenizer, dtype)


def _encode_in_worker(batch: list[str]) -> np.ndarray:
    return _encode(*_worker_args, batch)


def _encoded(batches: Iterable[list[str]], tokenizer, dtype: str, num_proc: int) -> Iterator[tuple[int, np.ndarray]]:
    """(number of documents, ids) of each batch, in order, tokenised by `num_proc` processes."""
    if num_proc == 1:
        for batch in batches:
            yield len(batch), _encode(tokenizer, dtype, batch)
        return
    # fork on Linux, as torch's DataLoader and datasets.map do: workers start at once, inherit the
    # tokenizer, and the caller's script needs no `if __name__ == "__main__"` guard
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(num_proc, _start_worker, (tokenizer, dtype)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((len(batch), pool.apply_async(_encode_in_worker, (batch,))))
            if len(pending) > 2 * num_proc:  # a bounded window: never read a stream far ahead of the workers
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()


def _tokenize(documents: Callable[[], Iterable[str]], tokenizer, writer: _ShardWriter, limit: int | None,
              desc: str, progress: _Progress, part: str, num_proc: int) -> None:
    """Write each document's ids and an EOS through `writer`, stopping after `limit` tokens.

    Continues from what `progress` recorded for `part`, recording again after every batch."""
    state = progress.part(part)
    writer.restore(state["tokens"])
    if state["done"]:
        return
    writer.reopen()
    docs = iter(documents())
    if state["documents"]:
        for _ in tqdm(islice(docs, state["documents"]), total=state["documents"], unit=" docs",
                      desc=f"{desc}: skipping the documents already written"):
            pass
    with tqdm(total=limit, initial=writer.n_tokens, desc=desc, unit="tok", unit_scale=True) as bar, \
            contextlib.closing(_encoded(_batches(docs), tokenizer, writer.dtype, num_proc)) as batches:
        for n_docs, ids in batches:
            if limit is not None:
                ids = ids[:limit - writer.n_tokens]
            writer.write(ids)
            writer.flush()
            state["documents"] += n_docs
            state["tokens"] = writer.n_tokens
            progress.save()
            bar.update(len(ids))
            if limit is not None and writer.n_tokens >= limit:
                break
    writer.close()
    state["done"] = True
    progress.save()


def _split_tail(folder: Path, train: _ShardWriter, val: _ShardWriter, n_keep: int, n_val: int,
                progress: _Progress) -> None:
    """Move the last `n_val` train tokens to `val`, and cut train to its first `n_keep` tokens.

    The tail is copied and recorded before any train shard is cut, and cutting is idempotent, so
    a build killed in here redoes only the step it was in."""
    sizes = train.sizes()
    split = progress.state.setdefault("split", {"val_tokens": None})
    if split["val_tokens"] is None:
        val.reopen()  # drops what a killed copy left
        start = 0
        for name, n in zip(train.names, sizes):
            lo = max(train.n_tokens - n_val - start, 0)  # where the held-out tail begins in this shard
            if lo < n:
                val.write(np.memmap(folder / name, dtype=train.dtype, mode="r")[lo:])
            start += n
        val.close()
        split["val_tokens"] = val.n_tokens
        progress.save()
    val.restore(split["val_tokens"])
    start = 0
    for name, n in zip(list(train.names), sizes):
        path = folder / name
        keep = min(max(n_keep - start, 0), n)
        if keep == 0:
            path.unlink(missing_ok=True)
            train.names.remove(name)
        elif keep < n:
            os.truncate(path, keep * np.dtype(train.dtype).itemsize)
        start += n
    train.n_tokens = n_keep


def _load(folder: Path) -> PreparedData:
    meta = json.loads((folder / "meta.json").read_text())
    itemsize = np.dtype(meta["dtype"]).itemsize
    for key in ("train", "val"):
        size = sum((folder / name).stat().st_size for name in meta[f"{key}_shards"]
                   if (folder / name).is_file())
        if size != meta[f"n_{key}_tokens"] * itemsize:
            raise UserError(f"prepared data in {folder} is damaged ({key} shards are missing or "
                            f"the wrong size): delete that folder and run again")
    return PreparedData(
        folder=str(folder),
        train_shards=[str(folder / name) for name in meta["train_shards"]],
        val_shards=[str(folder / name) for name in meta["val_shards"]],
        dtype=meta["dtype"],
        n_train_tokens=meta["n_train_tokens"],
        n_val_tokens=meta["n_val_tokens"],
        vocab_size=meta["vocab_size"],
    )


class _TooLittleData(UserError):
    """The whole dataset is too small: no rerun of the same build can succeed."""


@dataclass(frozen=True)
class _Request:
    """One preparation: where the documents come from, how validation is made, and how much to write."""

    dataset: str
    cache_dir: str
    val_dataset: str | None
    held_out: bool  # validation is the tail of the dataset's own tokens
    val_fraction: float
    max_tokens: int | None
    block_size: int
    shard_tokens: int
    num_proc: int

    def key(self, fingerprint: str) -> str:
        """Everything that decides the tokens written: equal keys, equal folders."""
        return json.dumps({
            "format": FORMAT_VERSION,
            "dataset": dataset_identity(self.dataset),
            "val_dataset": dataset_identity(self.val_dataset) if self.val_dataset else None,
            # the held-out size only matters when validation is held out of the train tokens
            "val_fraction": self.val_fraction if self.held_out else None,
            "block_size": self.block_size if self.held_out else None,
            "max_tokens": self.max_tokens,
            "shard_tokens": self.shard_tokens,
            "tokenizer": fingerprint,
        })

    def documents(self, dataset: str, split: str = "train") -> Callable[[], Iterable[str]]:
        return partial(iter_documents, dataset, split, cache_dir=self.cache_dir)


def _build(tmp: Path, req: _Request, tokenizer, fingerprint: str, progress: _Progress) -> None:
    vocab_size = len(tokenizer)
    dtype = "uint16" if vocab_size < 2 ** 16 else "uint32"
    train = _ShardWriter(tmp, "train", dtype, req.shard_tokens)
    val = _ShardWriter(tmp, "val", dtype, req.shard_tokens)
    if req.held_out:
        _hold_out_tail(tmp, req, tokenizer, train, val, progress)
    else:
        _tokenize(req.documents(req.dataset), tokenizer, train, req.max_tokens, f"tokenising {req.dataset}",
                  progress, "train", req.num_proc)
        val_source = req.val_dataset or req.dataset
        val_split = "validation" if has_validation_split(val_source) else "train"
        _tokenize(req.documents(val_source, val_split), tokenizer, val, None,
                  f"tokenising {val_source} ({val_split})", progress, "val", req.num_proc)
    (tmp / "meta.json").write_text(json.dumps({
        "format": FORMAT_VERSION,
        "dataset": req.dataset,
        "val_dataset": req.val_dataset,
        "val_from": "held-out tail of train" if req.held_out else "validation documents",
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": vocab_size,
        "eos_id": tokenizer.eos_token_id,
        "dtype": dtype,
        "n_train_tokens": train.n_tokens,
        "n_val_tokens": val.n_tokens,
        "train_shards": train.names,
        "val_shards": val.names,
    }, indent=2))


def _hold_out_tail(tmp: Path, req: _Request, tokenizer, train: _ShardWriter, val: _ShardWriter,
                   progress: _Progress) -> None:
    """Tokenise the dataset into `train`, then move its last val_fraction (at least one window of
    block_size + 1 tokens) to `val`."""
    window = req.block_size + 1
    max_tokens = req.max_tokens
    # read just enough that holding out val_fraction of it leaves max_tokens for training
    limit = None if max_tokens is None else max(math.ceil(max_tokens / (1 - req.val_fraction)), max_tokens + window)
    _tokenize(req.documents(req.dataset), tokenizer, train, limit, f"tokenising {req.dataset}", progress, "train",
              req.num_proc)
    n_val = max(math.ceil(req.val_fraction * train.n_tokens), window)
    if train.n_tokens - n_val < window:
        raise _TooLittleData(
            f"{req.dataset} has only {train.n_tokens} tokens, too few to hold out {n_val} for "
            f"validation and keep {window} for training: use more data, a smaller "
            f"block size, or a separate validation dataset")
    _split_tail(tmp, train, val, min(train.n_tokens - n_val, max_tokens or train.n_tokens), n_val, progress)


@contextlib.contextmanager
def _exclusive(path: Path):
    """Hold an exclusive lock on the file `path` (removed on exit): one builder per folder at a
    time, whether the others are DDP ranks, other nodes or a separate prepare step."""
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is preparing the same data ({path})", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        # the holder we waited for removes the file on exit: a lock on a removed file guards nothing
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        f.close()


def prepare_dataset(dataset: str, tokenizer: PreTrainedTokenizerFast, cache_dir: str, *,
                    val_dataset: str | None = None, val_fraction: float = 0.01,
                    max_tokens: int | None = None, block_size: int = HELD_OUT_WINDOW,
                    shard_tokens: int = SHARD_TOKENS, num_proc: int = 1) -> PreparedData:
    """Tokenise `dataset` (see `iter_documents`) into shards under `cache_dir`, or reuse them.

    Validation tokens come from `val_dataset` when given, else from the dataset's own validation
    split, else from the last `val_fraction` of the tokens read (at least `block_size + 1`).
    `max_tokens` caps the train tokens. `num_proc` processes tokenise in parallel (same result).
    An interrupted build is continued by the next call with the same arguments.
    """
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be positive, not {max_tokens}")
    if num_proc < 1:
        raise UserError(f"num_proc must be at least 1, not {num_proc}")
    held_out = val_dataset is None and not has_validation_split(dataset)
    if held_out and not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    req = _Request(dataset, cache_dir, val_dataset, held_out, val_fraction, max_tokens, block_size, shard_tokens,
                   num_proc)
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = req.key(fingerprint)
    cache = Path(cache_dir).expanduser()
    folder = cache / f"{Path(dataset).name or 'data'}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "meta.json").is_file():
        return _load(folder)

    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive(cache / f".{folder.name}.lock"):
        if (folder / "meta.json").is_file():  # the process we waited for built it
            return _load(folder)
        unfinished = cache / f".{folder.name}.partial"
        unfinished.mkdir(exist_ok=True)
        progress = _Progress(unfinished)
        if progress.documents():
            print(f"continuing the unfinished preparation in {unfinished} "
                  f"({progress.documents():,} documents already written)", file=sys.stderr)
        try:
            _build(unfinished, req, tokenizer, fingerprint, progress)
        except BaseException as e:
            if progress.documents() and _rerun_can_finish(e, dataset, val_dataset):
                print(f"preparation stopped; the {progress.documents():,} documents written so far are kept "
                      f"in {unfinished}: run the same command again to continue", file=sys.stderr)
            else:
                shutil.rmtree(unfinished, ignore_errors=True)
            raise
        progress.path.unlink()
        os.rename(unfinished, folder)
    return _load(folder)


def _rerun_can_finish(error: BaseException, dataset: str, val_dataset: str | None) -> bool:
    """Whether running the same build again can finish it, so what it wrote is worth keeping.

    Yes after an interruption (Ctrl-C, a dropped connection) or an unreachable Hub. No after a
    broken local file or too little data: the fix changes the data or the flags, hence the cache key."""
    if isinstance(error, _TooLittleData):
        return False
    return not isinstance(error, UserError) or dataset in HUB_DATASETS or val_dataset in HUB_DATASETS


def training_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerFast:
    """The tokenizer a new run of `cfg` uses (--tokenizer); a BPE trained on --dataset is cached in
    --data_dir."""
    if not cfg.tokenizer:
        raise UserError("no tokenizer given: pass --tokenizer gpt2, bpe or a tokenizer folder")
    return build_tokenizer(cfg.tokenizer, texts=lambda: iter_documents(cfg.dataset),
                           bpe_vocab_size=cfg.bpe_vocab_size, cache_dir=cfg.data_dir,
                           cache_key=dataset_identity(cfg.dataset))


def training_data(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast, block_size: int) -> PreparedData:
    """`prepare_dataset` with a run's flags, for a model of context `block_size`. The trainer and
    `python -m smolhub.data prepare` both call this, so a preparation made ahead of training lands
    in the cache folder the run reads.

    A held-out validation tail keeps at least one window of max(block_size, HELD_OUT_WINDOW)
    tokens: every model of context up to HELD_OUT_WINDOW then reads the same preparation (prepared
    once, for any of them), and a longer-context model gets a tail it can evaluate on."""
    return prepare_dataset(cfg.dataset, tokenizer, cfg.data_dir, val_dataset=cfg.val_dataset or None,
                           val_fraction=cfg.val_fraction, max_tokens=cfg.max_tokens or None,
                           block_size=max(block_size, HELD_OUT_WINDOW), num_proc=cfg.num_proc)
