"""Fine-tuning data: rows from a file or the Hub -> chat token ids -> shuffled, resumable, DDP-aware batches.

Every row becomes a conversation in the chat format (smolhub.chat). Supported rows:

  SFT   messages / conversations   a list of {"role", "content"} (or ShareGPT's {"from", "value"})
        instruction, input, output  Alpaca: user = instruction (+ "\\n\\n" + input), assistant = output
        prompt, completion          strings, or message lists (TRL's conversational prompt-completion)
  DPO   prompt, chosen, rejected    strings, or message lists; chosen/rejected may repeat the prompt's
                                    turns (trl-lib/ultrafeedback_binarized) or the prompt may be left
                                    implicit as their common first turns

SFT trains on assistant tokens (a prompt-completion row: only on the completion's). Its examples are
packed, best fit first, into rows of block_size + 1 tokens with a document id per example, so
attention stays within an example and positions restart at each. DPO pairs are padded per batch;
their labels cover the completion only, as TRL's DPOTrainer has them.

A bad row raises a UserError naming its file and line (.jsonl), item (.json) or row index (.parquet,
the Hub); nothing is dropped without being counted.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from smolhub.chat import IM_END, IM_START, ROLES, encode_chat, encode_prompt
from smolhub.data.loader import DrawnBatches
from smolhub.data.sources import _format, _local_files, _open_text
from smolhub.errors import UserError
from smolhub.objectives import IGNORE_INDEX
from smolhub.tokenizer import hub_reachable

ROW_FORMS = ("'messages' (or 'conversations'), 'instruction'/'output' (Alpaca) or 'prompt'/'completion'")
PAIR_FORMS = "'chosen' and 'rejected' (with or without 'prompt')"
VAL_SPLITS = ("validation", "valid", "test")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")
_DATASET_HINT = ("--dataset takes a .jsonl/.json/.parquet file (optionally .gz for JSON), a folder of them "
                 "(val*/valid*/validation* files are the held-out split), or a Hub dataset id owner/name[:split]")


# --- rows --------------------------------------------------------------------------------------

def _json_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) of a JSON Lines file, or of a .json file holding one array of rows (or JSON Lines)."""
    try:
        with _open_text(path) as f:
            text = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise UserError(f"cannot read {path} as UTF-8 text ({e}): fix or remove the file") from None
    if _format(path) == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg}): fix the file") from None
        for i, row in enumerate(rows, 1):
            yield f"{path} item {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg}): fix or remove the line") from None
        yield f"{path} line {lineno}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet as pq

    if path.name.lower().endswith(".gz"):
        raise UserError(f"{path}: parquet files are compressed inside; pass it without the .gz")
    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path} as parquet ({e}): fix or remove the file") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row index {i}", row


def _file_rows(files: list[Path]) -> Iterator[tuple[str, object]]:
    for path in files:
        fmt = _format(path)
        if fmt == ".txt":
            raise UserError(f"{path} is plain text, but fine-tuning needs rows: {_DATASET_HINT}")
        yield from _parquet_rows(path) if fmt == ".parquet" else _json_rows(path)


def _hub_splits(dataset: str) -> tuple[str, str | None, list[str]]:
    """(repo, the split asked for or None, the splits the repo has), failing fast without the Hub."""
    repo, _, split = dataset.partition(":")
    hint = "download its rows where the Hub is reachable and pass --dataset path/to/rows.jsonl (or .parquet)"
    if not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face Hub to load {repo} "
                        f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}): {hint}")
    import datasets

    try:
        splits = list(datasets.get_dataset_split_names(repo))
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        raise UserError(f"cannot load {repo} from the Hugging Face Hub ({e}): {hint}") from None
    if split and split not in splits:
        raise UserError(f"{repo} has no split {split!r}; it has {', '.join(splits)}: pass {repo}:<split>")
    return repo, split or None, splits


def _hub_rows(repo: str, split: str) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        rows = datasets.load_dataset(repo, split=split)
    except ConnectionError as e:
        raise UserError(f"cannot download {repo} from the Hugging Face Hub ({e}): download its rows where the "
                        f"Hub is reachable and pass --dataset path/to/rows.jsonl (or .parquet)") from None
    for i, row in enumerate(rows):
        yield f"{repo} ({split} split) row index {i}", row


def _is_hub_id(dataset: str) -> bool:
    path = Path(dataset).expanduser()
    return not path.exists() and _format(path) is None and bool(_HUB_ID.fullmatch(dataset))


def _sources(dataset: str) -> tuple[Callable[[], Iterator], Callable[[], Iterator] | None]:
    """Row iterators for the train split of `dataset` and for its own held-out split (None if it has none)."""
    if _is_hub_id(dataset):
        repo, split, splits = _hub_splits(dataset)
        if split is None:
            if "train" not in splits and len(splits) != 1:
                raise UserError(f"{repo} has no 'train' split but {', '.join(splits)}: pass {repo}:<split>")
            split = "train" if "train" in splits else splits[0]
            val = next((s for s in VAL_SPLITS if s in splits), None)
        else:
            val = None  # a chosen split says nothing about which other split pairs with it
        return (lambda: _hub_rows(repo, split)), (None if val is None else lambda: _hub_rows(repo, val))
    if not Path(dataset).expanduser().exists():
        raise UserError(f"dataset {dataset!r} is neither an existing path nor a Hub id: {_DATASET_HINT}")
    train, val = _local_files(dataset)
    if not train:
        raise UserError(f"{dataset} holds only held-out files ({', '.join(p.name for p in val)}): "
                        f"add training files or point --dataset at them")
    return (lambda: _file_rows(train)), (lambda: _file_rows(val)) if val else None


# --- row forms ---------------------------------------------------------------------------------

def _text(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not (value.strip() or allow_empty):
        raise UserError(f"{where}: {key!r} must be {'a' if allow_empty else 'non-empty'} text, not {value!r}")
    return value


def _messages(value, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} messages, "
                        f"not {value!r:.80}")
    messages = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and "from" in m and "role" not in m:  # ShareGPT
            m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m.get("value")}
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i} of {key!r} is {m!r:.80}; each message must be "
                            f"{{'role': one of {', '.join(ROLES)}, 'content': text}}")
        if IM_START in m["content"] or IM_END in m["content"]:
            raise UserError(f"{where}: message {i} of {key!r} contains a chat control token "
                            f"({IM_START} or {IM_END}): remove it from the text")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _turns(row: dict, key: str, where: str, role: str) -> list[dict]:
    """A column that is either text (one message of `role`) or a list of messages."""
    value = row.get(key)
    if isinstance(value, str):
        return _messages([{"role": role, "content": _text(row, key, where, allow_empty=role == "assistant")}],
                         where, key)
    return _messages(value, where, key)


def _needs_assistant(messages: list[dict], where: str, what: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: {what} must end with an assistant message (the reply to learn), "
                        f"not a {messages[-1]['role']} message")


def sft_example(row, where: str) -> tuple[list[dict], int]:
    """(messages, prompt_len): a row as a conversation whose messages from prompt_len on are trained."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be an object with named fields, not {row!r:.80}")
    row = {k: v for k, v in row.items() if v is not None}  # a table's missing values
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = _messages(row[key], where, key)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: {key!r} has no assistant message, so there is nothing to learn")
        return messages, 0
    if "instruction" in row and "output" in row:
        user = _text(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise UserError(f"{where}: 'input' must be text, not {extra!r:.80}")
        if extra.strip():
            user = f"{user}\n\n{extra}"
        reply = _text(row, "output", where, allow_empty=True)
        return _messages([{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                         where, "instruction/input/output"), 0
    if "prompt" in row and "completion" in row:
        prompt = _turns(row, "prompt", where, "user")
        completion = _turns(row, "completion", where, "assistant")
        _needs_assistant(completion, where, "'completion'")
        return prompt + completion, len(prompt)
    raise UserError(f"{where}: a fine-tuning row needs {ROW_FORMS}; this one has "
                    f"{', '.join(map(repr, row)) or 'no fields'}")


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def preference_example(row, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) message lists of a preference row; chosen and rejected hold only the replies."""
    if isinstance(row, dict):
        row = {k: v for k, v in row.items() if v is not None}  # a table's missing values
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        fields = ", ".join(map(repr, row)) if isinstance(row, dict) else repr(row)[:80]
        raise UserError(f"{where}: a preference row needs {PAIR_FORMS}; this one has {fields or 'no fields'}")
    chosen = _turns(row, "chosen", where, "assistant")
    rejected = _turns(row, "rejected", where, "assistant")
    if "prompt" not in row:
        if isinstance(row["chosen"], str):
            raise UserError(f"{where}: text 'chosen' and 'rejected' need a 'prompt' column")
        n = _common_prefix(chosen, rejected)
        if n == 0:
            raise UserError(f"{where}: without a 'prompt', chosen and rejected must start with the same "
                            f"prompt messages, but their first messages differ")
        prompt = chosen[:n]
    else:
        prompt = _turns(row, "prompt", where, "user")
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[:len(prompt)] == prompt:  # the conversation repeats the prompt's turns
            reply[:len(prompt)] = []
        if not reply:
            raise UserError(f"{where}: {key!r} holds no reply after the prompt")
        _needs_assistant(reply, where, repr(key))
    return prompt, chosen, rejected


# --- loading and the held-out split --------------------------------------------------------------

def _examples(rows: Iterator[tuple[str, object]], method: str, what: str) -> list:
    parse = sft_example if method == "sft" else preference_example
    examples = [parse(row, where) for where, row in rows]
    if not examples:
        raise UserError(f"{what} holds no rows: {_DATASET_HINT}")
    return examples


def load_examples(dataset: str, method: str, *, val_dataset: str | None = None,
                  val_fraction: float = 0.05) -> tuple[list, list]:
    """(train, held-out) examples of `dataset` for `method` ("sft" or "dpo").

    The held-out examples are `val_dataset`'s, else the dataset's own (a Hub validation/test split,
    val* files in a folder), else `val_fraction` of its rows, the same rows whatever the run's seed
    (so runs compare on one held-out set). With none of those the held-out list is empty."""
    if method not in ("sft", "dpo"):
        raise ValueError(f"method must be 'sft' or 'dpo', not {method!r}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), not {val_fraction}")
    train_rows, own_val = _sources(dataset)
    train = _examples(train_rows(), method, dataset)
    if val_dataset is not None:
        return train, _examples(_sources(val_dataset)[0](), method, val_dataset)
    if own_val is not None:
        return train, _examples(own_val(), method, f"the held-out split of {dataset}")
    n_val = round(len(train) * val_fraction)
    if val_fraction > 0 and not 0 < n_val < len(train):
        raise UserError(f"{len(train)} rows are too few to hold out {val_fraction:g} of them: "
                        f"use more rows, another --val_fraction, or a --val_dataset")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    held_out = set(order[:n_val])
    return ([e for i, e in enumerate(train) if i not in held_out],
            [e for i, e in enumerate(train) if i in held_out])


# --- tokenising ----------------------------------------------------------------------------------

def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((spec + str(tokenizer.chat_template)).encode()).hexdigest()


def _cached(kind: str, examples: list, tokenizer, cache_dir: str | None, encode: Callable[[], list]) -> list:
    """encode(), kept under cache_dir keyed by the examples' content and the tokenizer, so a rerun (or
    a resume) on the same data skips tokenising."""
    if cache_dir is None:
        return encode()
    key = hashlib.sha256((kind + json.dumps(examples) + _tokenizer_fingerprint(tokenizer)).encode()).hexdigest()
    path = Path(cache_dir).expanduser() / f"finetune-{kind}-{key[:24]}.pt"
    if path.is_file():
        return torch.load(path)
    encoded = encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(encoded, tmp)
    os.replace(tmp, path)
    return encoded


def encode_sft_example(tokenizer, messages: list[dict], prompt_len: int) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one SFT example: the assistant mask, cleared over the first prompt_len messages."""
    ids, mask = encode_chat(tokenizer, messages)
    if prompt_len:
        n = _common_prefix(ids, encode_chat(tokenizer, messages[:prompt_len])[0])
        mask = [0] * n + mask[n:]
    return ids, mask


def encode_pair(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]
                ) -> tuple[int, list[int], list[int]]:
    """(prompt length, prompt + chosen ids, prompt + rejected ids), split as TRL's DPOTrainer splits them:
    the completion starts where the prompt with its generation prompt and the whole conversation diverge."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    chosen_ids = encode_chat(tokenizer, prompt + chosen)[0]
    rejected_ids = encode_chat(tokenizer, prompt + rejected)[0]
    return (min(_common_prefix(prompt_ids, chosen_ids), _common_prefix(prompt_ids, rejected_ids)),
            chosen_ids, rejected_ids)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class SFTData:
    """SFT examples tokenised, truncated to block_size + 1 tokens and packed into rows.

    Packing is best-fit decreasing: the longest example first, each into the fullest row it fits.
    A row holds `tokens`, `targets` (the next token where it is a trained token of the same example,
    else IGNORE_INDEX) and `documents` (the example's index in the row; the padded tail its own)."""

    def __init__(self, examples: list[tuple[list[dict], int]], tokenizer, block_size: int,
                 cache_dir: str | None = None):
        if block_size < 2:
            raise UserError(f"block size must be at least 2, not {block_size}")
        self.block_size = block_size
        self.n_examples = len(examples)
        encoded = _cached("sft", examples, tokenizer, cache_dir,
                          lambda: [encode_sft_example(tokenizer, m, n) for m, n in examples])
        width = block_size + 1
        self.truncated = sum(len(ids) > width for ids, _ in encoded)
        kept = []
        for ids, mask in encoded:
            ids, mask = ids[:width], mask[:width]
            if any(mask[1:]):
                kept.append((ids, mask))
        self.skipped = self.n_examples - len(kept)  # truncated down to no trained token
        rows = self._pack([len(ids) for ids, _ in kept], width)
        self.n_tokens = sum(len(ids) for ids, _ in kept)
        tokens = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.int32)
        trained = torch.zeros((len(rows), width), dtype=torch.bool)
        documents = torch.empty((len(rows), width), dtype=torch.int32)
        for r, members in enumerate(rows):
            at = 0
            for doc, i in enumerate(members):
                ids, mask = kept[i]
                tokens[r, at:at + len(ids)] = torch.tensor(ids, dtype=torch.int32)
                trained[r, at:at + len(ids)] = torch.tensor(mask, dtype=torch.bool)
                documents[r, at:at + len(ids)] = doc
                at += len(ids)
            documents[r, at:] = len(members)
        self.tokens = tokens
        same_doc = documents[:, 1:] == documents[:, :-1]
        self.targets = torch.where(trained[:, 1:] & same_doc, tokens[:, 1:], IGNORE_INDEX)
        self.documents = documents[:, :-1].contiguous()
        self.n_targets = int((self.targets != IGNORE_INDEX).sum())

    @staticmethod
    def _pack(lengths: list[int], width: int) -> list[list[int]]:
        """Indices of the examples in each row, best fit decreasing (ties in example order)."""
        rows: list[list[int]] = []
        space: list[tuple[int, int]] = []  # (free tokens, row) of rows with room, sorted
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            at = bisect.bisect_left(space, (lengths[i], -1))
            if at == len(space):
                rows.append([i])
                free, row = width - lengths[i], len(rows) - 1
            else:
                free, row = space.pop(at)
                rows[row].append(i)
                free -= lengths[i]
            if free > 1:  # a one-token example has nothing to train, so a row with one free token is full
                bisect.insort(space, (free, row))
        return rows

    @property
    def n_rows(self) -> int:
        return self.tokens.size(0)

    def describe(self) -> str:
        return (f"{self.n_examples} examples ({self.truncated} truncated to {self.block_size + 1} tokens, "
                f"{self.skipped} of them left out with no trained token left) packed into {self.n_rows} rows: "
                f"{self.n_tokens / max(self.n_rows * (self.block_size + 1), 1):.0%} filled, "
                f"{self.n_targets} trained tokens")


class PreferenceData:
    """Preference pairs tokenised as prompt + chosen and prompt + rejected, truncated to block_size tokens
    (keeping the start, as TRL does); a pair whose prompt alone fills block_size is left out and counted.
    `precompute_reference` stores each pair's reference log-probabilities, which the loaders then carry."""

    def __init__(self, examples: list[tuple[list[dict], list[dict], list[dict]]], tokenizer, block_size: int,
                 cache_dir: str | None = None):
        if block_size < 2:
            raise UserError(f"block size must be at least 2, not {block_size}")
        self.block_size = block_size
        self.n_examples = len(examples)
        self.pad_id = _pad_id(tokenizer)
        encoded = _cached("dpo", examples, tokenizer, cache_dir,
                          lambda: [encode_pair(tokenizer, *e) for e in examples])
        self.truncated = sum(max(len(c), len(r)) > block_size for _, c, r in encoded)
        self.pairs = [(n, c[:block_size], r[:block_size]) for n, c, r in encoded if n < block_size]
        self.skipped = self.n_examples - len(self.pairs)
        self.reference: torch.Tensor | None = None  # (pairs, 2) log-probs of chosen and rejected

    def __len__(self) -> int:
        return len(self.pairs)

    def collate(self, indices: list[int], width: int | None = None) -> tuple[torch.Tensor, ...]:
        """(chosen_ids, chosen_labels, rejected_ids, rejected_labels[, ref_chosen, ref_rejected]) of the
        pairs at `indices`, padded to `width` or to their longest sequence; labels are the ids on the
        completion and IGNORE_INDEX on the prompt and the padding."""
        pairs = [self.pairs[i] for i in indices]
        width = width or max(max(len(c), len(r)) for _, c, r in pairs)
        out = []
        for side in (1, 2):
            ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
            for row, pair in enumerate(pairs):
                seq, n = torch.tensor(pair[side], dtype=torch.long), pair[0]
                ids[row, :len(seq)] = seq
                labels[row, n:len(seq)] = seq[n:]
            out += [ids, labels]
        if self.reference is not None:
            out += list(self.reference[indices].unbind(1))
        return tuple(out)

    @torch.no_grad()
    def precompute_reference(self, reference_logps: Callable[[tuple[torch.Tensor, ...]],
                                                             tuple[torch.Tensor, torch.Tensor]],
                             batch_size: int) -> None:
        """Run `reference_logps` (a collated batch -> (chosen, rejected) summed log-probs, e.g.
        DPOObjective.reference_logps on the device) once over every pair and keep the results."""
        self.reference = None
        values = []
        for start in range(0, len(self.pairs), batch_size):
            chosen, rejected = reference_logps(self.collate(list(range(start, min(start + batch_size, len(self))))))
            values.append(torch.stack([chosen, rejected], 1).float().cpu())
        self.reference = torch.cat(values)

    def describe(self) -> str:
        return (f"{self.n_examples} preference pairs ({self.truncated} truncated to {self.block_size} tokens, "
                f"{self.skipped} left out whose prompt alone fills them)")


# --- loaders -------------------------------------------------------------------------------------

class _Loader(DrawnBatches):
    """Fine-tuning items (packed rows, preference pairs), drawn as smolhub.data's DrawnBatches draws
    them; a fine-tuning batch holds whole items, never shorter sequences cut from them."""

    def __init__(self, n_items: int, block_size: int, batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool, what: str):
        if batch_size < 1:
            raise UserError(f"batch size must be positive, not {batch_size}")
        if n_items < world_size * batch_size:
            raise UserError(f"{n_items} {what} are too few for one batch of {world_size} ranks x batch size "
                            f"{batch_size}: use more data or a smaller --batch_size")
        super().__init__(n_items, block_size, batch_size, rank, world_size, seed, shuffle)

    def _next_indices(self, seq_len: int | None) -> list[int]:
        if seq_len not in (None, self.block_size):
            raise ValueError(f"fine-tuning batches are whole rows of {self.block_size} tokens, not {seq_len}: "
                             f"examples cannot be cut into shorter sequences")
        return self.next_indices()


class SFTLoader(_Loader):
    """Packed SFT rows: `next_batch()` -> (inputs, targets, document_ids), each (batch_size, block_size)
    int64 on the CPU, for model(inputs, targets, document_ids=document_ids)."""

    def __init__(self, data: SFTData, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        super().__init__(data.n_rows, data.block_size, batch_size, rank, world_size, seed, shuffle, "packed rows")
        self.data = data

    def next_batch(self, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = torch.tensor(self._next_indices(seq_len))
        d = self.data
        return d.tokens[rows, :-1].long(), d.targets[rows].long(), d.documents[rows].long()


class PreferenceLoader(_Loader):
    """Preference pairs: `next_batch()` -> (chosen_ids, chosen_labels, rejected_ids, rejected_labels), each
    (batch_size, width) int64 on the CPU, plus (ref_chosen_logps, ref_rejected_logps) of shape (batch_size,)
    once PreferenceData.precompute_reference has run. The width is the batch's longest sequence, or
    block_size with fixed_width (fixed shapes for torch.compile and CUDA graphs)."""

    def __init__(self, data: PreferenceData, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, fixed_width: bool = False):
        super().__init__(len(data), data.block_size, batch_size, rank, world_size, seed, shuffle, "preference pairs")
        self.data, self.fixed_width = data, fixed_width

    def next_batch(self, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
        indices = self._next_indices(seq_len)
        return self.data.collate(indices, self.block_size if self.fixed_width else None)
