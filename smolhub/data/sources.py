"""Where documents come from: a Hub dataset streamed with `datasets`, a download, a generator, or
local files. Everything downstream sees one thing: an iterator of documents (strings).

A local source is a .txt, .jsonl, .json or .parquet file, each optionally gzipped, or a folder of
them (read recursively, in sorted order). In a .txt file, documents are separated by lines holding
only <|endoftext|> (TinyStories' convention); other formats use their `text` column. In a folder,
files whose names start with val/valid/validation form the validation split and the rest train.
"""
import gzip
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator


from smolhub.data.synthetic import synthetic_stories
from smolhub.errors import UserError
from smolhub.tokenizer import EOS, hub_reachable

HUB_DATASETS = {  # name: (Hub repo, config, validation split or None)
    "tinystories": ("roneneldan/TinyStories", None, "validation"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", None),
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", None),
    "openwebtext": ("Skylion007/openwebtext", None, None),
}
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SYNTHETIC = {"train": (20_000, 0), "validation": (2_000, 1)}  # split: (stories, seed)
FORMATS = (".txt", ".jsonl", ".json", ".parquet")
_VAL_FILE = re.compile(r"^(val|valid|validation)([-_.]|$)", re.IGNORECASE)
_DATASET_HINT = "--dataset takes tinystories, fineweb-edu, fineweb, openwebtext, tinyshakespeare, synthetic, or a path to a .txt/.jsonl/.json/.parquet file (optionally .gz) or a folder of them"


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "smolhub")


def _format(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((fmt for fmt in FORMATS if name.endswith(fmt)), None)


def _local_files(dataset: str) -> tuple[list[Path], list[Path]]:
    """(train files, validation files) of a local source."""
    path = Path(dataset).expanduser()
    if path.is_file():
        if _format(path) is None:
            raise UserError(f"{path} is not a supported file: {_DATASET_HINT}")
        return [path], []
    if not path.is_dir():
        raise UserError(f"dataset {dataset!r} is neither a known name nor an existing path: {_DATASET_HINT}")
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and _format(p) and not p.name.startswith("."))
    if not files:
        raise UserError(f"{path} holds no .txt/.jsonl/.json/.parquet files (optionally .gz): {_DATASET_HINT}")
    val = [p for p in files if _VAL_FILE.match(p.name)]
    train = [p for p in files if not _VAL_FILE.match(p.name)]
    return train, val


def has_validation_split(dataset: str) -> bool:
    """Whether `dataset` brings its own validation documents (otherwise some train tokens are held out)."""
    if dataset == "synthetic":
        return True
    if dataset == "tinyshakespeare":
        return False
    if dataset in HUB_DATASETS:
        return HUB_DATASETS[dataset][2] is not None
    return bool(_local_files(dataset)[1])


def dataset_identity(dataset: str) -> str:
    """A string that changes when the documents of `dataset` may have changed (keys the caches)."""
    if dataset in HUB_DATASETS or dataset in ("synthetic", "tinyshakespeare"):
        return dataset
    train, val = _local_files(dataset)
    return json.dumps([[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in train + val])


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_documents(path: Path) -> Iterator[str]:
    lines = []
    try:
        with _open_text(path) as f:
            for line in f:
                if line.strip() == EOS:
                    yield "".join(lines).strip()
                    lines = []
                else:
                    lines.append(line)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"cannot read {path} as UTF-8 text ({e}): fix or remove the file") from None
    yield "".join(lines).strip()


def _table_documents(path: Path) -> Iterator[str]:
    import datasets  # imported where used: plain-text training needs neither it nor pyarrow
    import pyarrow

    builder = "parquet" if _format(path) == ".parquet" else "json"
    try:
        for row in datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True):
            if "text" not in row:
                raise UserError(f"{path} has no 'text' column (it has: {', '.join(row)}): "
                                f"rename the column holding the documents to 'text'")
            yield row["text"]
    except (pyarrow.ArrowException, datasets.exceptions.DatasetGenerationError) as e:
        raise UserError(f"cannot read {path} ({e.__cause__ or e}): fix or remove the file") from None


def _local_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield from (_txt_documents(path) if _format(path) == ".txt" else _table_documents(path))


def _hub_documents(name: str, split: str) -> Iterator[str]:
    repo, config, val_split = HUB_DATASETS[name]
    hint = ("download it where the Hub is reachable and pass --dataset path/to/file "
            "(.txt/.jsonl/.parquet, or a folder of them)")
    if not hub_reachable():
        raise UserError(f"cannot reach the Hugging Face Hub to stream {repo} "
                        f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}): {hint}")
    import datasets

    try:
        rows = datasets.load_dataset(repo, config, split=val_split if split == "validation" else "train",
                                     streaming=True)
    except ConnectionError as e:
        raise UserError(f"cannot stream {repo} from the Hugging Face Hub ({e}): {hint}") from None
    except RuntimeError as e:
        if "Dataset scripts are no longer supported" not in str(e):
            raise
        # datasets >= 4 refuses repos that still ship a loading script (openwebtext did in 2025)
        raise UserError(f"{repo} is a script-based dataset, which datasets {datasets.__version__} cannot "
                        f"stream: {hint}") from None
    return (row["text"] for row in rows)


def _tinyshakespeare(cache_dir: str) -> Path:
    path = Path(cache_dir).expanduser() / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".input.txt.tmp-{os.getpid()}")
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=10) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot download tinyshakespeare from {TINYSHAKESPEARE_URL} "
                        f"({getattr(e, 'reason', e)}): fetch input.txt yourself and pass "
                        f"--dataset path/to/input.txt") from None
    os.replace(tmp, path)  # a killed download never leaves a truncated input.txt behind
    return path


def _nonempty(documents: Iterable[str], dataset: str) -> Iterator[str]:
    empty = True
    for doc in documents:
        if doc:
            empty = False
            yield doc
    if empty:
        raise UserError(f"dataset {dataset} holds no text: {_DATASET_HINT}")


def iter_documents(dataset: str, split: str = "train", *, cache_dir: str | None = None) -> Iterator[str]:
    """The documents of `dataset`'s `split` ("train" or "validation"), one string at a time.

    A source without its own validation split (see `has_validation_split`) has only "train".
    Problems a user can fix (no network, missing file) raise here, before the first document.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    if split == "validation" and not has_validation_split(dataset):
        raise ValueError(f"dataset {dataset!r} has no validation split; hold out train tokens instead")
    if dataset == "synthetic":
        documents = synthetic_stories(*SYNTHETIC[split])
    elif dataset == "tinyshakespeare":
        documents = _txt_documents(_tinyshakespeare(cache_dir or default_cache_dir()))
    elif dataset in HUB_DATASETS:
        documents = _hub_documents(dataset, split)
    else:
        train, val = _local_files(dataset)
        if split == "train" and not train:  # a folder of validation files serves --val_dataset, not --dataset
            raise UserError(f"{dataset} holds only validation files ({', '.join(p.name for p in val)}): "
                            f"add training files or point --dataset at them")
        documents = _local_documents(val if split == "validation" else train)
    return _nonempty(documents, dataset)
