"""The command line of every SmolHub script, built one way from documented dataclasses.

Every field of the dataclasses a script takes is a flag (`--n_layer 4`, and `--no_x` to turn off a
boolean that defaults to true); a field whose metadata says `positional=True` is an argument.
`--preset NAME` and `--config FILE` (JSON or YAML) set many fields at once. Precedence, lowest
first: the dataclass defaults, the script's own defaults (a model's TRAIN_DEFAULTS), the preset,
the config file, the flags. A script with subcommands (`python -m smolhub_hub push ...`) gives each
command its own dataclasses. `--help` lists every flag and exits 0; a bad flag or value is one
`error: ...` line and exit code 2 (`run_main`). Flags are never abbreviated (`--max_step` is not
`--max_steps`): an unknown flag names the closest real one, and the flag of ours that another
trainer's name stands for (`--learning_rate` -> `--lr`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import signal
import sys
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from smolhub.errors import UserError


@dataclass(frozen=True)
class Command:
    """What a script, or one of its subcommands, takes: one instance of each of `args`."""

    args: tuple[type, ...]
    help: str = ""
    description: str = ""  # the command's --help text, when longer than `help`
    presets: dict[str, dict] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)  # a field's help where this command uses it otherwise


class Parser(argparse.ArgumentParser):
    """argparse prints usage and exits on a bad flag; we want one UserError line instead. Its
    abbreviations are off: a mistyped flag that prefixes a real one must not pass as it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (run with --help to see every flag)")


class _ExamplesFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; the description and the examples keep their line breaks."""


class Parsed(tuple):
    """One instance of each dataclass, and `explicit`: the fields set on the command line or in the
    --config file. A --preset's values are defaults like the script's own (its help says so), so a
    checkpoint's values take their place where a run continues one (config.reconcile_with_checkpoint)."""

    explicit: frozenset[str]

    def __new__(cls, objs: tuple, explicit: set[str]):
        parsed = super().__new__(cls, objs)
        parsed.explicit = frozenset(explicit)
        return parsed


# The names that transformers' Trainer, nanoGPT and litgpt give to flags of ours, and what differs;
# suggested only where the script has that flag.
FOREIGN_FLAGS: dict[str, tuple[str, str]] = {
    "learning_rate": ("lr", ""),
    "max_lr": ("lr", ""),
    "lr_scheduler_type": ("schedule", ""),
    "decay_lr": ("schedule", "--schedule constant keeps the rate flat"),
    "lr_decay_iters": ("schedule_steps", ""),
    "warmup_iters": ("warmup_steps", ""),
    "output_dir": ("out_dir", ""),
    "gradient_accumulation_steps": ("tokens_per_step", ("tokens per step = accumulation steps x --batch_size x "
                                                        "--block_size x processes; the accumulation follows")),
    "per_device_train_batch_size": ("batch_size", ""),
    "micro_batch_size": ("batch_size", ""),
    "global_batch_size": ("tokens_per_step", "tokens per step = global batch x --block_size"),
    "num_train_steps": ("max_steps", ""),
    "max_train_steps": ("max_steps", ""),
    "max_iters": ("max_steps", ""),
    "num_train_epochs": ("max_steps", "runs are measured in optimizer steps"),
    "eval_iters": ("eval_batches", ""),
    "eval_steps": ("eval_interval", ""),
    "eval_only": ("eval_interval", ("there is no evaluation-only run: a run evaluates every --eval_interval steps "
                                    "and at its end, and each checkpoint's val loss is in metrics.jsonl")),
    "save_steps": ("save_interval", ""),
    "logging_steps": ("log_interval", ""),
    "save_total_limit": ("keep_last", ""),
    "max_grad_norm": ("grad_clip", ""),
    "adam_beta1": ("beta1", ""),
    "adam_beta2": ("beta2", ""),
    "resume_from_checkpoint": ("resume", ""),
    "bf16": ("dtype", "--dtype bfloat16"),
    "fp16": ("dtype", "--dtype float16"),
    "report_to": ("wandb_mode", ""),
    "wandb_log": ("wandb_mode", ""),
    "wandb_run_name": ("run_name", ""),
    "dataset_name": ("dataset", ""),
    "num_hidden_layers": ("n_layer", ""),
    "hidden_size": ("n_embd", ""),
    "num_attention_heads": ("n_head", ""),
    "num_key_value_heads": ("n_kv_heads", ""),
    "intermediate_size": ("ffn_hidden", ""),
    "max_seq_length": ("block_size", ""),
    "max_position_embeddings": ("block_size", ""),
    "n_positions": ("block_size", ""),
    "max_length": ("max_new_tokens", ""),
    "model_name_or_path": ("checkpoint", ""),
}


def parse_cli(dataclass_types: tuple[type, ...], presets: dict[str, dict] | None, argv: list[str] | None,
              defaults: dict | None = None, prog: str | None = None, description: str | None = None,
              helps: dict[str, str] | None = None) -> Parsed:
    """Parse argv into one instance of each dataclass; `helps` replaces fields' help texts."""
    command = Command(tuple(dataclass_types), presets=presets or {}, defaults=defaults or {}, helps=helps or {})
    parser = Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return _parse(parser, {None: (parser, command, _add_arguments(parser, command))}, argv)[1]


def parse_command(commands: dict[str, Command], argv: list[str] | None, prog: str, description: str,
                  epilog: str | None = None) -> tuple[str, Parsed]:
    """Parse `COMMAND [flags]` into the command's name and one instance of each of its dataclasses."""
    parser = Parser(prog=prog, description=description, epilog=epilog, formatter_class=_ExamplesFormatter)
    sub = parser.add_subparsers(dest="command", title="commands", parser_class=Parser)
    parsers = {}
    for name, command in commands.items():
        target = sub.add_parser(name, help=command.help, description=command.description or command.help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        parsers[name] = (target, command, _add_arguments(target, command))
    return _parse(parser, parsers, argv)


def _add_arguments(parser: argparse.ArgumentParser, command: Command) -> dict[str, str | None]:
    """Add the command's flags; returns every spelling of every flag -> the field it sets (None for
    --preset and --config)."""
    flags: dict[str, str | None] = {}
    for dtype in command.args:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            flags.update(dict.fromkeys(_add_field(parser, f, hints[f.name], command.helps.get(f.name)), f.name))
    if command.presets:
        parser.add_argument("--preset", help=f"Named set of defaults: {', '.join(sorted(command.presets))}.")
        flags["--preset"] = None
    parser.add_argument("--config", help="JSON or YAML file of field: value pairs.")
    flags["--config"] = None
    return flags


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, help: str | None = None) -> list[str]:
    """Add the field as an argument; returns its flag's spellings (none for a positional)."""
    kwargs = dict(f.metadata)  # the help, and any argparse keyword the field sets (type, action, required)
    if help is not None:
        kwargs["help"] = help
    positional = kwargs.pop("positional", False)
    flag = kwargs.pop("flag", f"--{f.name}")
    off = kwargs.pop("off", f"Set --{f.name} to false.")  # what --no_<field> does, for a field on by default
    if kwargs.get("required"):
        kwargs["default"] = argparse.SUPPRESS  # a required flag shows no default in --help
    elif f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kwargs["default"] = f.default_factory()
    elif not positional:
        kwargs["required"] = True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        kwargs.update(choices=args, type=type(args[0]))
    elif hint is bool:
        if "action" not in kwargs:  # a field may ask for store_true, so that no value can follow it
            kwargs.update(type=_boolean, nargs="?", const=True)  # `--deterministic` alone, or `--deterministic false`
    elif origin is list:
        kwargs.setdefault("type", args[0])
        if kwargs.get("action") != "append":
            kwargs["nargs"] = "+"
    else:
        kwargs.setdefault("type", hint)
    if positional:
        parser.add_argument(f.name, nargs="?" if "default" in kwargs else None, **kwargs)
        return []
    spellings = _spellings(flag)
    parser.add_argument(*spellings, dest=f.name, **kwargs)
    if hint is bool and f.default is True:
        spellings += _spellings(f"--no_{f.name}")
        parser.add_argument(*spellings[-2:], dest=f.name, action="store_false", default=argparse.SUPPRESS, help=off)
    return spellings


def _spellings(flag: str) -> list[str]:
    """`--n_layer` is also `--n-layer`, as transformers' HfArgumentParser spells it."""
    dashed = "--" + flag[2:].replace("_", "-")
    return [flag] if dashed == flag else [flag, dashed]


def _boolean(text: str) -> bool:
    value = text.lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _parse(parser: Parser, commands: dict[str | None, tuple[argparse.ArgumentParser, Command, dict]],
           argv: list[str] | None) -> tuple[str | None, Parsed]:
    """Apply the defaults, --preset and --config of the chosen command, then parse its flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    name = None
    if None not in commands:
        name = parser.parse_known_args(argv)[0].command  # which command; --help exits here
        if name is None:
            raise UserError(f"usage: {parser.prog} {{{','.join(commands)}}} [flags]; run with --help to see "
                            "what each command does")
    target, command, flags = commands[name]
    from_file = load_config_file(known.config) if known.config is not None else {}
    target.set_defaults(**_overrides(command, known.preset, from_file))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(_unrecognized(unknown, flags))
    objs = []
    for dtype in command.args:
        obj = dtype(**{f.name: getattr(args, f.name) for f in dataclasses.fields(dtype) if f.init})
        check_types(obj)
        objs.append(obj)
    return name, Parsed(tuple(objs), _given(argv, flags) | set(from_file))


def _given(argv: list[str], flags: dict[str, str | None]) -> set[str]:
    """The fields that argv's flags set (any spelling, `--flag=value` too), up to a bare `--`."""
    given = set()
    for token in argv:
        if token == "--":
            break
        if field := flags.get(token.split("=", 1)[0]):
            given.add(field)
    return given


def _unrecognized(unknown: list[str], flags: dict[str, str | None]) -> str:
    """One line for argparse's leftovers: each unknown flag with the real flag it most likely means."""
    named = [token.split("=", 1)[0] for token in unknown if token.startswith("-") and not _is_number(token)]
    if not named:
        return f"unrecognized arguments: {' '.join(unknown)} (run with --help to see every flag)"
    ours = {flag[2:] for flag in flags if "-" not in flag[2:]}  # the underscore spelling of each flag
    hints = []
    for flag in named:
        guess = suggest(flag, ours)
        hints.append(f"did you mean --{guess[0]}?" + (f" ({guess[1]})" if guess[1] else "") if guess else "")
    if len(named) == 1:
        return f"unrecognized flag {named[0]}; {hints[0]}" if hints[0] else \
            f"unrecognized flag {named[0]} (run with --help to see every flag)"
    return "unrecognized flags " + ", ".join(f"{flag} ({hint})" if hint else flag for flag, hint in zip(named, hints))


def suggest(name: str, ours: Collection[str]) -> tuple[str, str] | None:
    """The name in `ours` that `name` most likely means, and what to know about it: another
    trainer's name for it (FOREIGN_FLAGS), else the closest spelling."""
    key = name.lstrip("-").replace("-", "_")
    if key in FOREIGN_FLAGS and FOREIGN_FLAGS[key][0] in ours:
        return FOREIGN_FLAGS[key]
    close = difflib.get_close_matches(key, list(ours), n=1)
    return (close[0], "") if close else None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _overrides(command: Command, preset: str | None, from_file: dict) -> dict[str, Any]:
    """The defaults that replace the dataclasses' own: the command's, then the preset's, then the file's."""
    overrides = dict(command.defaults)
    if preset is not None and command.presets:
        if preset not in command.presets:
            raise UserError(f"--preset {preset!r} is unknown; choose from {sorted(command.presets)}")
        overrides.update(command.presets[preset])
    overrides.update(from_file)
    fields = {f.name for t in command.args for f in dataclasses.fields(t) if not f.metadata.get("positional")}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        guess = suggest(unknown[0], fields)
        hint = f" ({unknown[0]}: did you mean {guess[0]}?{' ' + guess[1] if guess[1] else ''})" if guess else ""
        raise UserError(f"unknown config fields {unknown}{hint}; run with --help to see every field")
    return overrides


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"--config {path}: use a .json, .yaml or .yml file")
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(f"--config {path} is not valid {p.suffix[1:].upper()}: {e}".splitlines()[0])
    except Exception as e:  # yaml.YAMLError, kept generic to avoid importing yaml at module level
        raise UserError(f"--config {path} could not be parsed: {e}".splitlines()[0])
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of field names to values")
    return data


def check_types(obj: Any) -> None:
    """Values from a --config file bypass argparse's conversion; refuse ones of the wrong type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if typing.get_origin(hint) is list:
            (item,) = typing.get_args(hint)
            ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
            expected = f"a list of {item.__name__}"
        elif typing.get_origin(hint) is Literal:
            ok = value in typing.get_args(hint)
            expected = " | ".join(map(str, typing.get_args(hint)))
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            expected = "a number"
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            expected = "an integer"
        else:
            ok = isinstance(value, hint)
            expected = hint.__name__
        if not ok:
            raise UserError(f"{f.name} must be {expected}, got {value!r}")
        if hint is float:
            setattr(obj, f.name, float(value))


def run_main(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a script's main; a UserError becomes one `error: ...` line on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or runtime.Interrupted carrying the signal that stopped a run
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
