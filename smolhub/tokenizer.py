"""Tokenizers: GPT-2's byte-level BPE, or a byte-level BPE trained on the corpus.

Every tokenizer here is a transformers `PreTrainedTokenizerFast` whose end-of-text token is `EOS`,
so the data pipeline, generation and checkpoints treat both kinds the same way, and a checkpoint
carries its tokenizer as the files `save_pretrained` writes.
"""
import hashlib
import json
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerFast

from smolhub.errors import UserError
from smolhub.runtime import raise_if_stopped

EOS = "<|endoftext|>"

# transformers leaves model_max_length at ~1e30 (or 1024 for the Hub's gpt2) and then warns about
# long documents; the model's context length is the model's business, not the tokenizer's.
MODEL_MAX_LENGTH = 1_000_000_000

_TOKENIZER_HINT = "pass --tokenizer path/to/folder_with_vocab.json_and_merges.txt"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT) answers within `timeout` seconds.

    Without this probe an unreachable Hub costs ~45 s of retries inside huggingface_hub before
    any error. The probe runs in a thread because name resolution ignores socket timeouts.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    reachable = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
        except urllib.error.HTTPError:
            pass  # any HTTP status means the host is up
        except (OSError, ValueError):
            return
        reachable.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reachable)


def _checked(tok: PreTrainedTokenizerFast, source) -> PreTrainedTokenizerFast:
    if tok.eos_token != EOS:
        raise UserError(f"tokenizer {source} ends documents with {tok.eos_token!r}, not {EOS!r}: "
                        f"use --tokenizer gpt2, bpe, or a GPT-2 style vocab.json + merges.txt folder")
    tok.model_max_length = MODEL_MAX_LENGTH
    return tok


def load_tokenizer(folder) -> PreTrainedTokenizerFast:
    """A tokenizer from a folder written by `save_pretrained` (or holding a bare tokenizer.json)."""
    folder = Path(folder).expanduser()
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} holds no tokenizer.json: point at a folder written by "
                        f"save_pretrained (a checkpoint folder has one)")
    tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if tok.eos_token is None and EOS in tok.get_vocab():
        tok.eos_token = EOS  # a bare tokenizer.json has no tokenizer_config.json naming it
    return _checked(tok, folder)


def gpt2_tokenizer(source: str = "gpt2") -> PreTrainedTokenizerFast:
    """GPT-2's tokenizer from a local folder (vocab.json + merges.txt, or tokenizer.json) or a Hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return load_tokenizer(path)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise UserError(f"{path} holds neither tokenizer.json nor vocab.json + merges.txt: "
                            f"{_TOKENIZER_HINT}")
        # vocab_file=/merges_file= silently build a one-token vocabulary in transformers 5.
        return _checked(GPT2TokenizerFast(vocab=str(vocab), merges=str(merges)), path)
    if path.exists():
        raise UserError(f"{path} is a file, not a folder: {_TOKENIZER_HINT}")
    online = hub_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=not online)
    except OSError as e:
        if online:
            raise UserError(f"cannot load tokenizer {source!r} from the Hugging Face Hub "
                            f"({str(e).splitlines()[0]}): {_TOKENIZER_HINT}") from None
        raise UserError(f"the Hugging Face Hub is unreachable and tokenizer {source!r} is not in "
                        f"the local cache: {_TOKENIZER_HINT}") from None
    return _checked(tok, source)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with EOS as its only special token (id 0)."""
    if vocab_size < 257:
        raise UserError(f"BPE vocabulary size {vocab_size} is too small: byte-level BPE needs "
                        f"at least 257 entries (256 bytes + {EOS})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # every byte in the vocabulary, so text unseen in training still encodes losslessly
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars print blank lines into logs; tqdm below counts documents
    )
    tok.train_from_iterator(tqdm(texts, desc="training BPE", unit=" docs"), trainer)
    return _checked(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS), "trained BPE")


def _short_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _save_atomically(tok: PreTrainedTokenizerFast, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tok.save_pretrained(str(tmp))
        os.rename(tmp, folder)
    except OSError:
        # another process (a DDP rank) finished the same tokenizer first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise


def build_tokenizer(spec: str, texts: Callable[[], Iterable[str]], bpe_vocab_size: int,
                    cache_dir: str, *, cache_key: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer a run asks for: "gpt2", "bpe" (trained on `texts()`), or a folder.

    A trained BPE is cached under `cache_dir`, keyed by `cache_key` (which identifies the
    training data) and the vocabulary size, so the next run loads it instead of retraining.
    Without a `cache_key` it is trained every time.
    """
    if spec == "gpt2":
        return gpt2_tokenizer("gpt2")
    if spec == "bpe":
        if cache_key is None:
            return train_bpe(texts(), bpe_vocab_size)
        folder = Path(cache_dir).expanduser() / f"bpe-{bpe_vocab_size}-{_short_hash(cache_key, bpe_vocab_size)}"
        if folder.is_dir():
            return load_tokenizer(folder)
        tok = train_bpe(texts(), bpe_vocab_size)
        raise_if_stopped()  # a Ctrl-C the BPE trainer swallowed may have cut its corpus short: never cache that
        _save_atomically(tok, folder)
        return tok
    if Path(spec).expanduser().is_dir():
        return gpt2_tokenizer(spec)
    raise UserError(f"unknown tokenizer {spec!r}: use --tokenizer gpt2, bpe, or a folder holding "
                    f"tokenizer.json or vocab.json + merges.txt")


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """A short hash of everything that decides which ids a text becomes."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    # transformers flips these per call; they do not change the ids of an untruncated text
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character: printable bytes as
    themselves, the other 68 as the characters from U+0100 on. This maps those characters back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_byte_lengths(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> list[int]:
    """The UTF-8 bytes each token id stands for (0 for special tokens and unused embedding rows):
    the denominator of bits per byte, which makes losses comparable across tokenizers."""
    alphabet = _byte_level_alphabet()
    special = set(tokenizer.all_special_ids)
    lengths = [0] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size and i not in special:
            lengths[i] = len(token) if all(c in alphabet for c in token) else len(
                tokenizer.decode([i]).encode("utf-8"))
    return lengths
