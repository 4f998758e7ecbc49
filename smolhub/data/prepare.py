"""Documents -> token ids on disk, once per (data, tokenizer).

A prepared dataset is a folder of flat binary shards (uint16 when the vocabulary fits, else
uint32) holding every document's ids followed by EOS, plus meta.json. The folder is built under a
temporary name and renamed when complete, so a killed run never leaves one that looks finished,
and the next run with the same data and tokenizer reuses it without tokenising again.
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from smolhub.data.sources import dataset_identity, has_validation_split, iter_documents
from smolhub.errors import UserError
from smolhub.tokenizer import tokenizer_fingerprint

FORMAT_VERSION = 1  # bump when the layout or the tokenisation rules change, to invalidate caches
SHARD_TOKENS = 100_000_000
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
    """Appends token ids to `{prefix}_000.bin`, `{prefix}_001.bin`, ... of at most `shard_tokens` each."""

    def __init__(self, folder: Path, prefix: str, dtype: str, shard_tokens: int):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.names: list[str] = []
        self.n_tokens = 0
        self._file = None
        self._room = 0  # tokens the open shard can still take

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

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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


def _tokenize(documents: Iterable[str], tokenizer, writer: _ShardWriter, limit: int | None, desc: str) -> None:
    """Write each document's ids and an EOS through `writer`, stopping after `limit` tokens."""
    eos = tokenizer.eos_token_id
    with tqdm(total=limit, desc=desc, unit="tok", unit_scale=True) as bar:
        for batch in _batches(documents):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            flat = np.fromiter(chain.from_iterable(chain(doc, (eos,)) for doc in ids),
                               dtype=np.int64, count=sum(len(doc) + 1 for doc in ids))
            if limit is not None:
                flat = flat[:limit - writer.n_tokens]
            writer.write(flat)
            bar.update(len(flat))
            if limit is not None and writer.n_tokens >= limit:
                return


def _split_tail(folder: Path, train: _ShardWriter, val: _ShardWriter, n_keep: int, n_val: int) -> None:
    """Move the last `n_val` train tokens to `val`, and cut train to its first `n_keep` tokens."""
    start = 0
    for name in list(train.names):
        path = folder / name
        n = path.stat().st_size // np.dtype(train.dtype).itemsize
        lo = max(train.n_tokens - n_val - start, 0)  # where the held-out tail begins in this shard
        if lo < n:
            val.write(np.memmap(path, dtype=train.dtype, mode="r")[lo:])
        keep = min(max(n_keep - start, 0), n)
        if keep == 0:
            path.unlink()
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


def _build(tmp: Path, dataset: str, tokenizer, fingerprint: str, cache_dir: str, val_dataset: str | None,
           held_out: bool, val_fraction: float, max_tokens: int | None, block_size: int,
           shard_tokens: int) -> None:
    vocab_size = len(tokenizer)
    dtype = "uint16" if vocab_size < 2 ** 16 else "uint32"
    train = _ShardWriter(tmp, "train", dtype, shard_tokens)
    val = _ShardWriter(tmp, "val", dtype, shard_tokens)
    documents = iter_documents(dataset, cache_dir=cache_dir)
    if held_out:
        # read just enough that holding out val_fraction of it leaves max_tokens for training
        limit = None if max_tokens is None else max(math.ceil(max_tokens / (1 - val_fraction)),
                                                    max_tokens + block_size + 1)
        _tokenize(documents, tokenizer, train, limit, f"tokenising {dataset}")
        train.close()
        n_val = max(math.ceil(val_fraction * train.n_tokens), block_size + 1)
        if train.n_tokens - n_val < block_size + 1:
            raise UserError(
                f"{dataset} has only {train.n_tokens} tokens, too few to hold out {n_val} for "
                f"validation and keep {block_size + 1} for training: use more data, a smaller "
                f"block size, or a separate validation dataset")
        _split_tail(tmp, train, val, min(train.n_tokens - n_val, max_tokens or train.n_tokens), n_val)
    else:
        _tokenize(documents, tokenizer, train, max_tokens, f"tokenising {dataset}")
        val_source = val_dataset or dataset
        val_split = "validation" if has_validation_split(val_source) else "train"
        _tokenize(iter_documents(val_source, val_split, cache_dir=cache_dir), tokenizer, val, None,
                  f"tokenising {val_source} ({val_split})")
    train.close()
    val.close()
    (tmp / "meta.json").write_text(json.dumps({
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "val_dataset": val_dataset,
        "val_from": "held-out tail of train" if held_out else "validation documents",
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": vocab_size,
        "eos_id": tokenizer.eos_token_id,
        "dtype": dtype,
        "n_train_tokens": train.n_tokens,
        "n_val_tokens": val.n_tokens,
        "train_shards": train.names,
        "val_shards": val.names,
    }, indent=2))


def prepare_dataset(dataset: str, tokenizer: PreTrainedTokenizerFast, cache_dir: str, *,
                    val_dataset: str | None = None, val_fraction: float = 0.01,
                    max_tokens: int | None = None, block_size: int = 1024,
                    shard_tokens: int = SHARD_TOKENS) -> PreparedData:
    """Tokenise `dataset` (see `iter_documents`) into shards under `cache_dir`, or reuse them.

    Validation tokens come from `val_dataset` when given, else from the dataset's own validation
    split, else from the last `val_fraction` of the tokens read (at least `block_size + 1`).
    `max_tokens` caps the train tokens.
    """
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be positive, not {max_tokens}")
    held_out = val_dataset is None and not has_validation_split(dataset)
    if held_out and not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = json.dumps({
        "format": FORMAT_VERSION,
        "dataset": dataset_identity(dataset),
        "val_dataset": dataset_identity(val_dataset) if val_dataset else None,
        # the held-out size only matters when validation is held out of the train tokens
        "val_fraction": val_fraction if held_out else None,
        "block_size": block_size if held_out else None,
        "max_tokens": max_tokens,
        "shard_tokens": shard_tokens,
        "tokenizer": fingerprint,
    })
    cache = Path(cache_dir).expanduser()
    folder = cache / f"{Path(dataset).name or 'data'}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (folder / "meta.json").is_file():
        return _load(folder)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=cache))
    try:
        _build(tmp, dataset, tokenizer, fingerprint, cache_dir, val_dataset, held_out, val_fraction,
               max_tokens, block_size, shard_tokens)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, folder)
    except OSError:
        # another process (a DDP rank) finished the same folder first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
    return _load(folder)
