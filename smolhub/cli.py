"""The command line of every SmolHub script, built one way from documented dataclasses.

Every field of the dataclasses a script takes is a flag (`--n_layer 4`, and `--no_x` to turn off a
boolean that defaults to true); a field whose metadata says `positional=True` is an argument.
`--preset NAME` and `--config FILE` (JSON or YAML) set many fields at once. Precedence, lowest
first: the dataclass defaults, the script's own defaults (a model's TRAIN_DEFAULTS), the preset,
the config file, the flags. A script with subcommands (`python -m smolhub_hub push ...`) gives each
command its own dataclasses. `--help` lists every flag and exits 0; a bad flag or value is one
`error: ...` line and exit code 2 (`run_main`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
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


class Parser(argparse.ArgumentParser):
    """argparse prints usage and exits on a bad flag; we want one UserError line instead."""

    def error(self, message: str):
        raise UserError(f"{message} (run with --help to see every flag)")


class _ExamplesFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help; the description and the examples keep their line breaks."""


def parse_cli(dataclass_types: tuple[type, ...], presets: dict[str, dict] | None, argv: list[str] | None,
              defaults: dict | None = None, prog: str | None = None, description: str | None = None) -> tuple:
    """Parse argv into one instance of each dataclass."""
    command = Command(tuple(dataclass_types), presets=presets or {}, defaults=defaults or {})
    parser = Parser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_arguments(parser, command)
    return _parse(parser, {None: (parser, command)}, argv)[1]


def parse_command(commands: dict[str, Command], argv: list[str] | None, prog: str, description: str,
                  epilog: str | None = None) -> tuple[str, tuple]:
    """Parse `COMMAND [flags]` into the command's name and one instance of each of its dataclasses."""
    parser = Parser(prog=prog, description=description, epilog=epilog, formatter_class=_ExamplesFormatter)
    sub = parser.add_subparsers(dest="command", title="commands", parser_class=Parser)
    parsers = {}
    for name, command in commands.items():
        parsers[name] = (sub.add_parser(name, help=command.help, description=command.description or command.help,
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter), command)
        _add_arguments(parsers[name][0], command)
    return _parse(parser, parsers, argv)


def _add_arguments(parser: argparse.ArgumentParser, command: Command) -> None:
    for dtype in command.args:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            _add_field(parser, f, hints[f.name])
    if command.presets:
        parser.add_argument("--preset", help=f"Named set of defaults: {', '.join(sorted(command.presets))}.")
    parser.add_argument("--config", help="JSON or YAML file of field: value pairs.")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    kwargs = dict(f.metadata)  # the help, and any argparse keyword the field sets (type, action, required)
    positional = kwargs.pop("positional", False)
    flag = kwargs.pop("flag", f"--{f.name}")
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
            kwargs.update(type=_boolean, nargs="?", const=True)  # `--resume` alone, or `--resume false`
    elif origin is list:
        kwargs.setdefault("type", args[0])
        if kwargs.get("action") != "append":
            kwargs["nargs"] = "+"
    else:
        kwargs.setdefault("type", hint)
    if positional:
        parser.add_argument(f.name, nargs="?" if "default" in kwargs else None, **kwargs)
        return
    parser.add_argument(*_spellings(flag), dest=f.name, **kwargs)
    if hint is bool and f.default is True:
        parser.add_argument(*_spellings(f"--no_{f.name}"), dest=f.name, action="store_false",
                            default=argparse.SUPPRESS, help=f"Set --{f.name} to false.")


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


def _parse(parser: Parser, commands: dict[str | None, tuple[argparse.ArgumentParser, Command]],
           argv: list[str] | None) -> tuple[str | None, tuple]:
    """Apply the defaults, --preset and --config of the chosen command, then parse its flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    name = None
    if None not in commands:
        name = parser.parse_args(argv).command  # which command: every flag is checked here, --help exits
        if name is None:
            raise UserError(f"usage: {parser.prog} {{{','.join(commands)}}} [flags]; run with --help to see "
                            "what each command does")
    target, command = commands[name]
    target.set_defaults(**_overrides(command, known.preset, known.config))
    args = parser.parse_args(argv)
    objs = []
    for dtype in command.args:
        obj = dtype(**{f.name: getattr(args, f.name) for f in dataclasses.fields(dtype) if f.init})
        check_types(obj)
        objs.append(obj)
    return name, tuple(objs)


def _overrides(command: Command, preset: str | None, config: str | None) -> dict[str, Any]:
    """The defaults that replace the dataclasses' own: the command's, then the preset's, then the file's."""
    overrides = dict(command.defaults)
    if preset is not None and command.presets:
        if preset not in command.presets:
            raise UserError(f"--preset {preset!r} is unknown; choose from {sorted(command.presets)}")
        overrides.update(command.presets[preset])
    if config is not None:
        overrides.update(load_config_file(config))
    fields = {f.name for t in command.args for f in dataclasses.fields(t) if not f.metadata.get("positional")}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown config fields {unknown}; run with --help to see every field")
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
