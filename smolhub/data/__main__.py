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
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from smolhub.cli import Command, parse_command, run_main
from smolhub.config import TrainConfig, option
from smolhub.data.prepare import HELD_OUT_WINDOW, training_data, training_tokenizer

_SCALE = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "G": 10 ** 9, "T": 10 ** 12}


def parse_count(text: str) -> int:
    """A token count written 5000, 100M, 1.5B or 2K."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMBGT]?)", text.strip(), re.IGNORECASE)
    value = Decimal(match[1]) * _SCALE[match[2].upper()] if match else None
    if value is None or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens like 5000, 100M or 1B")
    return int(value)


def _trainer_flag(name: str, help: str = "", **kwargs):
    """The trainer's flag `name` (TrainConfig's field), with this command's own help where it differs."""
    f = TrainConfig.__dataclass_fields__[name]
    return option(f.default, help or f.metadata["help"], **kwargs)


@dataclass
class PrepareArgs:
    """The TrainConfig fields that decide what is prepared (and where), in the trainer's order."""

    dataset: str = _trainer_flag("dataset", required=True)  # the trainer takes it from the model; here it is said
    val_dataset: str = _trainer_flag("val_dataset")
    val_fraction: float = _trainer_flag("val_fraction")
    max_tokens: int = _trainer_flag("max_tokens", "Cap on the training tokens prepared, e.g. 5000, 100M, 1B (0 = all).",
                                  type=parse_count)
    tokenizer: str = _trainer_flag("tokenizer", "gpt2 | bpe | a folder with a saved tokenizer or GPT-2 "
                                 "vocab.json+merges.txt: the one the model trains with (gpt2 for SmolTransformer "
                                 "and StoryLlama, bpe for the others).", required=True)
    bpe_vocab_size: int = _trainer_flag("bpe_vocab_size")
    data_dir: str = _trainer_flag("data_dir")
    num_proc: int = _trainer_flag("num_proc")
    block_size: int = option(HELD_OUT_WINDOW, "Context length of the model that trains on it: a held-out "
                             f"validation tail keeps one window of it, or of {HELD_OUT_WINDOW} tokens when shorter "
                             f"(so one preparation serves every model up to {HELD_OUT_WINDOW}).")


COMMANDS = {"prepare": Command((PrepareArgs,), help="Tokenise a dataset into the cache the trainer reads "
                                                    "(resumable).")}


def main(argv: list[str] | None = None) -> None:
    _, (args,) = parse_command(COMMANDS, argv, prog="python -m smolhub.data",
                               description="Data preparation ahead of training.")
    data_flags = {name: value for name, value in dataclasses.asdict(args).items() if name != "block_size"}
    cfg = TrainConfig(**data_flags)
    tokenizer = training_tokenizer(cfg)
    data = training_data(cfg, tokenizer, args.block_size)
    print(f"{data.n_train_tokens:,} train and {data.n_val_tokens:,} validation tokens in {data.folder}")
    defaults = TrainConfig()
    flags = {name: value for name, value in data_flags.items() if name != "num_proc"
             and (name in ("dataset", "tokenizer") or value != getattr(defaults, name))}
    flags["data_dir"] = Path(cfg.data_dir).expanduser().resolve()
    if args.block_size > HELD_OUT_WINDOW:
        flags["block_size"] = args.block_size
    print("train on it with: trainer.py " + " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items()))


if __name__ == "__main__":
    run_main(main)
