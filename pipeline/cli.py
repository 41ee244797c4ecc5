"""The one command-line convention of every job in `jobs/`: config dataclasses -> argparse, plus YAML.

Library code never reads argv; a job builds its parser here and turns the parsed values into its
frozen config dataclass:

    parser = job_parser(__doc__)                          # --config FILE, --verbose, one help format
    add_config_arguments(parser, TrainConfig, "training", flat=("model", "loss"))
    args, config = job_config(parser, TrainConfig, argv, flat=("model", "loss"))
    if config is None:                                    # invalid options: the message is printed
        return 2

(`job_config` = `parse_args`, YAML values beneath the command line, then `build_config`.)

The rules, the same for every job:
- **Option = field.** Every field of the job's config is one option, `--field-name`, with the help
  text of `field(metadata={"help": ...})` and its default shown once. A nested config dataclass
  (PreprocessConfig.detector) is an argument group whose options carry its field name as a prefix,
  at any depth: `detector.scrfd.det_size` is `--detector-scrfd-det-size`. A job may list nested
  configs as `flat` when their field names are unique and users know them unprefixed (training's
  `model` and `loss`: `--input-size`, `--num-heads`).
- **YAML keys = option names.** `--config FILE` is a mapping of option names without the dashes
  (`detector-name: scrfd`; `_` and `-` are the same). A prefixed group may also be written as a
  section (`detector: {scrfd: {det-size: 640}}`). Precedence: field default < YAML < command line.
  An unknown key is an error that names it.
- Options that are not config fields (a job's own switches, e.g. `--grid-file`) follow the same
  two rules: help text on every one, and YAML keys by their option name.

Hand-written rather than jsonargparse / simple-parsing / draccus: it is ~200 lines, it needs no
dependency beside the pinned set (ENVIRONMENT.md), and the flag names, flat groups and exit codes of
the existing jobs stay as users and scripts know them.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import yaml

T = TypeVar("T")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the job's docstring as written, and shows each option's default once.

    The default is appended unless the help text already speaks of it (argparse's
    BooleanOptionalAction appends its own, and some texts explain an empty default in words).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is argparse.SUPPRESS
                or default is False or default == "" or default == () or default == []):
            return text
        return f"{text} (default: %(default)s)"


def job_parser(description: str | None, verbose: bool = True) -> argparse.ArgumentParser:
    """A job's parser: its docstring as description, `--config FILE`, and `--verbose` where Ray runs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML file of option values (keys = option names without '--'); the command "
                             "line wins over it")
    if verbose:
        add_verbose_flag(parser)
    return parser


# ----------------------------------------------------------------------------------------------
# config dataclasses <-> options


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, is_optional) for `X`, `X | None` and `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _join(prefix: str, name: str, sep: str = "_") -> str:
    return f"{prefix}{sep}{name}" if prefix else name


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class _Option:
    field: dataclasses.Field
    type: Any        # the field's type with Optional removed
    dest: str        # argparse dest: the prefix chain and the field name joined by "_"
    group: str       # argument group title


def _walk(cls: type, title: str, skip: Sequence[str], flat: Sequence[str], prefix: str = "",
          path: str = "") -> Iterator[_Option]:
    """Every option of `cls`, nested configs depth-first, in field order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where = _join(path, f.name, ".")
        if _skipped(f, where, path, skip):
            continue
        tp, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            flat_here = f.name in flat
            about = f.metadata.get("help")
            section = f"{where} ({about})" if about else where
            yield from _walk(tp, title if flat_here else section, skip, flat,
                             prefix if flat_here else _join(prefix, f.name), where)
        else:
            yield _Option(f, tp, _join(prefix, f.name), title)


def _skipped(f: dataclasses.Field, where: str, path: str, skip: Sequence[str]) -> bool:
    """Not an option: set by the job itself (`skip` holds dotted paths, or bare top-level names)."""
    return not f.init or where in skip or (not path and f.name in skip)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return argparse.SUPPRESS  # a required field: absent from the namespace unless given


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str, *,
                         skip: Sequence[str] = (), flat: Sequence[str] = ()) -> None:
    """One argument group per (nested) config dataclass, one option per field.

    `skip`: fields the job sets itself (`"model.initial_score"`, or a bare name at the top level).
    `flat`: names of nested config fields whose options take no prefix.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in _walk(cls, title, skip, flat):
        group = groups.get(opt.group) or groups.setdefault(opt.group, parser.add_argument_group(opt.group))
        f, tp = opt.field, opt.type
        kwargs: dict[str, Any] = {"dest": opt.dest, "default": _default(f), "help": f.metadata.get("help", "")}
        flag = "--" + opt.dest.replace("_", "-")
        if tp is bool:
            action = group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            action.help = kwargs["help"]  # not argparse's own "(default: ...)": HelpFormatter adds it once
            continue
        if typing.get_origin(tp) is tuple:
            kwargs.update(nargs="+", type=typing.get_args(tp)[0])
        elif typing.get_origin(tp) is typing.Literal:
            kwargs.update(choices=list(typing.get_args(tp)))
        elif tp in (int, float, str):
            kwargs.update(type=tp)
        else:
            kwargs.update(type=str)
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        group.add_argument(flag, **kwargs)


def build_config(cls: type[T], args: argparse.Namespace | dict[str, Any], *, skip: Sequence[str] = (),
                 flat: Sequence[str] = (), **overrides: Any) -> T:
    """Instantiate `cls` (and its nested configs) from parsed options; `overrides` win.

    Invalid values raise SystemExit with a message naming the config, which the jobs print as
    `error: ...` with exit status 2.
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return _build(cls, given, skip, flat, "", "", overrides)


def _build(cls: type, given: dict[str, Any], skip: Sequence[str], flat: Sequence[str], prefix: str, path: str,
           overrides: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        where = _join(path, f.name, ".")
        if _skipped(f, where, path, skip):
            continue
        tp, _ = _base_type(hints[f.name])
        if not path and f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(tp):
            values[f.name] = _build(tp, given, skip, flat, prefix if f.name in flat else _join(prefix, f.name),
                                    where, {})
        elif _join(prefix, f.name) in given:
            value = given[_join(prefix, f.name)]
            if typing.get_origin(tp) is tuple and isinstance(value, list):
                value = tuple(value)
            if tp is bool and not isinstance(value, bool):
                value = _parse_bool(value)
            values[f.name] = value
    if not path:
        values.update({k: v for k, v in overrides.items() if k not in values})
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"invalid {cls.__name__}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# YAML


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def read_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """{dest: value} of a YAML file whose keys are `parser`'s option names; SystemExit names unknown keys."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SystemExit(f"config file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SystemExit(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise SystemExit(f"config file {path}: expected a mapping of option: value, got {type(data).__name__}")
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    unknown: list[str] = []

    def flatten(mapping: dict, prefix: str) -> None:
        for key, value in mapping.items():
            dest = _join(prefix, str(key).replace("-", "_"))
            if dest in dests:
                values[dest] = value
            elif isinstance(value, dict) and any(d.startswith(dest + "_") for d in dests):
                flatten(value, dest)  # a section: `detector: {name: scrfd}`
            else:
                unknown.append(dest.replace("_", "-"))

    flatten(data, "")
    if unknown:
        raise SystemExit(f"config file {path}: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(keys are this job's option names; see --help)")
    return values


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """parser.parse_args with the values of `--config FILE` as defaults (so the command line wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = _config_path(argv)
    if path:
        try:
            values = read_config_file(path, parser)
        except SystemExit as exc:
            parser.error(str(exc.code))
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # given by the file
        parser.set_defaults(**values)
    return parser.parse_args(argv)


def job_config(parser: argparse.ArgumentParser, cls: type[T], argv: Sequence[str] | None = None, *,
               skip: Sequence[str] = (), flat: Sequence[str] = (),
               extra: typing.Callable[[argparse.Namespace], dict[str, Any]] | None = None,
               ) -> tuple[argparse.Namespace, T | None]:
    """The start of every job's main: logging with URI redaction, options (+ YAML), --verbose, the config.

    Returns (args, config), or (args, None) after printing `error: ...` when the options are invalid
    (a credentialed URI among them; the message is redacted): the job then exits with status 2,
    before anything started (no Ray, no MLflow, no storage access). `extra(args)` gives the values
    a job computes itself from its own options (e.g. a grid read from --grid-file).
    """
    from pipeline.storage import install_log_redaction, redact_uri

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_redaction()
    args = parse_args(parser, argv)
    apply_verbose_flag(args)
    try:
        return args, build_config(cls, args, skip=skip, flat=flat, **(extra(args) if extra else {}))
    except (SystemExit, ValueError) as exc:
        message = exc.code if isinstance(exc, SystemExit) else str(exc)
        if not isinstance(message, str):
            raise
        print(f"error: {redact_uri(message)}", file=sys.stderr)
        return args, None


# ----------------------------------------------------------------------------------------------
# --verbose


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """--verbose, the same in every job: Ray's own console output back (see apply_verbose_flag)."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own output (worker, controller and Ray Data lines); by default "
                             "the console shows this job's progress and the path of Ray's full logs")


def apply_verbose_flag(args: argparse.Namespace) -> None:
    """Before Ray starts: pipeline.ray_utils.init_ray reads HMHN_VERBOSE (library code never reads argv)."""
    from pipeline.ray_utils import VERBOSE_ENV

    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    else:  # read by MLflow when it is first imported (the jobs import it lazily, after this)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
