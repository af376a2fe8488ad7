"""Typed configs: dataclasses whose fields carry their help text, loaded from defaults, then an
optional YAML file, then command-line flags (later wins).

Each stage has one dataclass (`EvalConfig`, `SFTConfig`, ...) in its recipe module. A field is
declared with `option(default, "help text", choices=...)`; `build_parser` turns the fields into
`--flags`, `load_config` resolves them, `validate` collects every error into one `ConfigError`,
and `save_config` writes the resolved values as YAML beside the run's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from spa_rl.errors import ConfigError


def option(default: Any, help: str, choices: Sequence[Any] | None = None, flag: str | None = None):
    """A config field with its one-line help text (shown by `--help`) and allowed values."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def _convert(value: Any, tp: type, optional: bool, where: str) -> Any:
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must not be empty")
    if isinstance(value, str) and optional and value.lower() in ("none", "null", ""):
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):  # YAML-valued text (env_options) written as a mapping
                import yaml
                return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {tp.__name__}") from None
    return value


def build_parser(cls, parser: argparse.ArgumentParser | None = None, skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Add one `--flag` per field of the dataclass `cls` (defaults left unset, so that a YAML
    file given with `--config` can sit between the defaults and the flags)."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of field values; flags given here override it")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _field_type(cls, f)
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {f.default})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text,
                                choices=f.metadata.get("choices"))
    return parser


def load_config(cls, args: argparse.Namespace | dict | None = None, yaml_path: str | os.PathLike | None = None):
    """Resolve defaults < YAML file < explicit values. Unknown YAML keys fail by name."""
    values: dict[str, Any] = {}
    args_dict = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    yaml_path = yaml_path or args_dict.pop("config", None)
    names = {f.name for f in dataclasses.fields(cls)}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value")
        unknown = sorted(k for k in loaded if k.replace("-", "_") not in names)
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    if not isinstance(args, argparse.Namespace):  # a mapping (presets, tests): every key must be a field
        unknown = sorted(k for k in args_dict if k not in names)
        if unknown:
            raise ConfigError(f"unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    for k, v in args_dict.items():
        if k in names and v is not None:
            values[k] = v
    kwargs = {}
    errors = []
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp, optional = _field_type(cls, f)
        try:
            kwargs[f.name] = _convert(values[f.name], tp, optional, f.name)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("; ".join(errors))
    cfg = cls(**kwargs)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Check choices, then the dataclass's own `check()` (a list of error strings)."""
    errors = []
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            errors.append(f"{f.name}: {value!r} is not one of {', '.join(map(str, choices))}")
    check = getattr(cfg, "check", None)
    if check is not None:
        errors.extend(check())
    if errors:
        raise ConfigError(f"{type(cfg).__name__}: " + "; ".join(errors))


def config_to_dict(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_config(cfg, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a run's outputs."""
    path = Path(out_dir) / name
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path

