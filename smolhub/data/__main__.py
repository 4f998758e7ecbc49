"""Prepare a dataset ahead of training: `python -m smolhub.data prepare --dataset fineweb-edu ...`.

It tokenises into the cache folder the trainer looks up (the same flags give the same folder), so
a multi-GPU job finds its shards ready instead of tokenising before its first step:

    cd SmolTransformer
    python -m smolhub.data prepare --dataset fineweb-edu --tokenizer gpt2 --max_tokens 1B --num_proc 16
    torchrun --nproc_per_node 8 trainer.py --max_tokens 1000000000

Run it in the folder the trainer runs in (or give both the same --data_dir) with the same data
flags; it prints the trainer flags that find its output. An interrupted preparation continues
where it stopped when the same command runs again.
"""
import argparse
import dataclasses
import re
import shlex
import typing
from decimal import Decimal
from pathlib import Path

from smolhub.cli import run_main
from smolhub.config import TrainConfig, _Parser
from smolhub.data.prepare import training_data, training_tokenizer

# the TrainConfig fields that decide what is prepared (and where); each becomes a flag
FIELDS = ("dataset", "val_dataset", "val_fraction", "max_tokens", "tokenizer", "bpe_vocab_size", "data_dir",
          "num_proc")
REQUIRED = ("dataset", "tokenizer")  # the trainer takes these from the model; here they must be said
HELP = {  # where this command differs from the trainer's flag of the same name
    "tokenizer": "gpt2 | bpe | a folder with a saved tokenizer or GPT-2 vocab.json+merges.txt: the one the "
                 "model trains with (gpt2 for SmolTransformer and StoryLlama).",
    "max_tokens": "Cap on the training tokens prepared, e.g. 5000, 100M, 1B (0 = all).",
}
_SCALE = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "G": 10 ** 9, "T": 10 ** 12}


def parse_count(text: str) -> int:
    """A token count written 5000, 100M, 1.5B or 2K."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMBGT]?)", text.strip(), re.IGNORECASE)
    value = Decimal(match[1]) * _SCALE[match[2].upper()] if match else None
    if value is None or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens like 5000, 100M or 1B")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m smolhub.data", description="Data preparation ahead of training.")
    commands = parser.add_subparsers(dest="command", required=True, title="commands")
    prepare = commands.add_parser(
        "prepare", description="Tokenise a dataset into the cache the trainer reads (resumable).",
        help="tokenise a dataset into the cache the trainer reads")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    types = typing.get_type_hints(TrainConfig)
    for name in FIELDS:
        f = fields[name]
        kind = parse_count if name == "max_tokens" else types[name]
        required = name in REQUIRED
        default = "" if required else f" (default: {f.default})"
        prepare.add_argument(f"--{name}", type=kind, required=required, default=None if required else f.default,
                             help=f"{HELP.get(name, f.metadata['help'])}{default}")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**{name: getattr(args, name) for name in FIELDS})
    tokenizer = training_tokenizer(cfg, cfg.tokenizer)
    data = training_data(cfg, tokenizer)
    print(f"{data.n_train_tokens:,} train and {data.n_val_tokens:,} validation tokens in {data.folder}")
    defaults = TrainConfig()
    flags = {name: getattr(cfg, name) for name in FIELDS if name != "num_proc"
             and (name in REQUIRED or getattr(cfg, name) != getattr(defaults, name))}
    flags["data_dir"] = Path(cfg.data_dir).expanduser().resolve()
    print("train on it with: trainer.py " + " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items()))


if __name__ == "__main__":
    run_main(main)
