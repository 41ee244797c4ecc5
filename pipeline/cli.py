"""Turn frozen config dataclasses into argparse argument groups (plus an optional YAML file).

Jobs in `jobs/` call these; library code never reads argv. Precedence: dataclass default <
YAML file (`--config FILE`, keys are field names) < explicit command-line flags.
Field help comes from `field(metadata={"help": ...})`.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, is_optional) for `X`, `X | None` and `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, title: str,
                         skip: tuple[str, ...] = (), prefix: str = "") -> None:
    """Add one argument group with a flag per field of dataclass `cls` (default: not given).

    With `prefix="detector"` field `name` becomes `--detector-name` (dest `detector_name`), so
    nested configs with clashing field names can share one parser.
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or dataclasses.is_dataclass(hints[f.name]):
            continue
        dest = f"{prefix}_{f.name}" if prefix else f.name
        tp, optional = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and f.default is not dataclasses.MISSING:
            help_text = f"{help_text} (default: {default})".strip()
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            group.add_argument(_flag(dest), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin is tuple:
            inner = typing.get_args(tp)[0]
            kwargs.update(nargs="+", type=inner)
        elif typing.get_origin(tp) is typing.Literal:
            kwargs.update(choices=list(typing.get_args(tp)))
        elif tp in (int, float, str):
            kwargs.update(type=tp)
        else:
            kwargs.update(type=str)
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument(_flag(dest), **kwargs)


def load_yaml_defaults(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"config file {path}: expected a mapping of option: value, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[T], args: argparse.Namespace | dict[str, Any],
                 yaml_values: dict[str, Any] | None = None, prefix: str = "", **overrides: Any) -> T:
    """Instantiate `cls` from YAML values, then argparse values, then explicit overrides.

    For a nested config the YAML values are its own section (`detector: {name: scrfd}`) and
    `prefix` selects its command-line flags (`--detector-name`).
    """
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    if prefix:
        cut = len(prefix) + 1
        given = {k[cut:]: v for k, v in given.items() if k.startswith(prefix + "_")}
    values: dict[str, Any] = {}
    for source in (yaml_values or {}, given, overrides):
        values.update({k: v for k, v in source.items() if k in names})
    nested = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])}
    unknown = set(yaml_values or {}) - names
    for key in nested & set(values):
        if isinstance(values[key], dict):  # a YAML section for a nested config: built by the caller
            del values[key]
    if unknown:
        raise SystemExit(f"unknown option(s) in config file for {cls.__name__}: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        tp, _ = _base_type(hints[key])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"invalid {cls.__name__}: {exc}") from exc


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON/MLflow-friendly dict of a (possibly nested) config dataclass."""
    return dataclasses.asdict(config)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """--verbose, the same in every job: Ray's own console output back (see apply_verbose_flag)."""
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's own output (worker, controller and Ray Data lines); by default "
                             "the console shows this job's progress and the path of Ray's full logs")


def apply_verbose_flag(args: argparse.Namespace) -> None:
    """Before Ray starts: pipeline.ray_utils.init_ray reads HMHN_VERBOSE (library code never reads argv)."""
    import os

    from pipeline.ray_utils import VERBOSE_ENV

    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    else:  # read by MLflow when it is first imported (the jobs import it lazily, after this)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
