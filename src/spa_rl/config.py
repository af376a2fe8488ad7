"""Typed configs: dataclasses whose fields carry their help text, resolved from defaults, then an
optional YAML file, then command-line flags (later wins).

A stage's config is a dataclass of plain fields and *sections*. A section is another dataclass
(`spa_rl.sections`: env, episode, sampling, model, optim, eval) declared once and embedded in
every stage that needs it, so one concept has one name and one place:

    spa eval --env sokoban --sampling.temperature 0.7 --episode.max-turns 3
    # the same in YAML (`--config FILE.yaml`):
    env: sokoban
    sampling: {temperature: 0.7}
    episode:
      max_turns: 3

A section may name a PRIMARY field that its bare name sets: `--env sokoban` is
`--env.name sokoban`, `model: tiny` is `model: {name: tiny}`.

- `option(default, help, choices=...)` declares a field, `section(Cls, help, **defaults)` a
  section (with stage-specific defaults, e.g. the world-model prompt mode for `spa generate`);
- `build_parser` adds one `--flag` per field (dotted for section fields), grouped by section in
  `--help`, each with its default;
- `load_config` resolves the values; an unknown name fails and names the closest known one;
- `validate` collects every error (choices, each section's `check()`, the stage's `check()`)
  into one `ConfigError`;
- `save_config` writes the resolved values as YAML beside the run's outputs (it loads back).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from spa_rl.errors import ConfigError

# The top-level key of a run's config.yaml that records how it ran (not a config field).
RUNTIME_KEY = "runtime"


def option(default: Any, help: str, choices: Sequence[Any] | None = None):
    """A config field with its one-line help text (shown by `--help`) and allowed values."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def section(cls, help: str, **defaults):
    """Embed the section dataclass `cls`; `defaults` override its field defaults for this stage."""
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return dataclasses.field(default_factory=lambda: cls(**defaults), metadata={"help": help, "section": cls})


def is_section(f: dataclasses.Field) -> bool:
    return "section" in f.metadata


def _field_type(cls, f: dataclasses.Field):
    """(type, optional) of a field: `int | None` -> (int, True)."""
    tp = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", None)) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def iter_fields(cls, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field]]:
    """(dotted name, owning dataclass, field) for every plain field, sections flattened."""
    for f in dataclasses.fields(cls):
        if is_section(f):
            yield from iter_fields(f.metadata["section"], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, cls, f


def field_names(cls) -> list[str]:
    return [name for name, _, _ in iter_fields(cls)]


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ---- values ----------------------------------------------------------------------------------


def _convert(value: Any, tp: Any, optional: bool, where: str) -> Any:
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
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):  # YAML-valued text (env options) written as a mapping
                return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
            return str(value)
        if typing.get_origin(tp) is tuple:  # tuple[str, ...]: a YAML list, or one flag value
            if isinstance(value, str):
                loaded = yaml.safe_load(value)
                value = loaded if isinstance(loaded, list) else [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{where}: {value!r} is not a valid {name}") from None
    return value


# Names of spa-rl 0.1 (one flat config per stage) that now live elsewhere: the error for an old
# name says where it went.
FORMER_NAMES = {"actor_lr": "optim.lr", "critic_lr": "critic_optim.lr", "val_levels": "eval.levels",
                "val_samples": "eval.samples", "init": "model.name", "precision": "model.dtype",
                "batch_size": "sampling.decode_batch", "mini_batch_size": "mini_batch",
                "micro_batch_size": "micro_batch", "env_options": "env.options"}


def _unknown(name: str, known: Sequence[str], where: str) -> ConfigError:
    if FORMER_NAMES.get(name) in known:
        return ConfigError(f"{where}unknown field {name}; did you mean {FORMER_NAMES[name]}?")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:  # `lr` -> `optim.lr`: the same last part in a section
        close = [k for k in known if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:1]
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{where}unknown field {name}{hint}")


def flatten_values(cls, mapping: dict, where: str = "", prefix: str = "",
                   known: Sequence[str] | None = None) -> dict[str, Any]:
    """A nested mapping (YAML, presets) -> {dotted name: value}. Keys may use '-' or '_' and may
    be dotted themselves (`sampling.temperature: 0.7`); a section given a scalar sets its
    PRIMARY field. `known`: every dotted name of the whole config (for the did-you-mean hint)."""
    known = known if known is not None else field_names(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for raw_key, value in mapping.items():
        key = str(raw_key).replace("-", "_")
        head, dot, rest = key.partition(".")
        f = fields.get(head)
        if f is None or (dot and not is_section(f)):
            raise _unknown(prefix + key, known, where)
        if not is_section(f):
            out[prefix + key] = value
            continue
        sub = f.metadata["section"]
        if dot:
            value = {rest: value}
        if isinstance(value, dict):
            out.update(flatten_values(sub, value, where, f"{prefix}{head}.", known))
        elif getattr(sub, "PRIMARY", None):
            out[f"{prefix}{head}.{sub.PRIMARY}"] = value
        else:
            raise ConfigError(f"{where}{prefix}{head}: expected a mapping of its fields "
                              f"({', '.join(x.name for x in dataclasses.fields(sub))})")
    return out


def _read_yaml(path: Path) -> dict:
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
    return loaded


def build(cls, values: dict[str, Any], prefix: str = "", base=None):
    """`cls` from dotted values; unset fields keep `base`'s values (a section's stage defaults)
    or the class defaults. Collects every conversion error into one `ConfigError`."""
    kwargs, errors = {}, []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if is_section(f):
            if any(k.startswith(name + ".") for k in values):
                try:
                    kwargs[f.name] = build(f.metadata["section"], values, name + ".", base=f.default_factory()
                                           if base is None else getattr(base, f.name))
                except ConfigError as exc:
                    errors.append(str(exc))
        elif name in values:
            tp, optional = _field_type(cls, f)
            try:
                kwargs[f.name] = _convert(values[name], tp, optional, name)
            except ConfigError as exc:
                errors.append(str(exc))
    if errors:
        raise ConfigError("; ".join(errors))
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


# ---- the command line ------------------------------------------------------------------------


def _flag(dotted: str) -> str:
    return "--" + dotted.replace("_", "-")


def build_parser(cls, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add one `--flag` per field of `cls` (dotted for section fields; defaults left unset, so
    that a YAML file given with `--config` can sit between the defaults and the flags)."""
    parser = parser or argparse.ArgumentParser()
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="YAML file of field values (sections as mappings); flags given here override it")
    defaults = cls()
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if is_section(f):
            sub = f.metadata["section"]
            groups[f.name] = parser.add_argument_group(f"{f.name}: {f.metadata['help']}")
            primary = getattr(sub, "PRIMARY", None)
            if primary:
                groups[f.name].add_argument(_flag(f.name), dest=f"{f.name}.{primary}", default=None,
                                            metavar=primary.upper(), help=f"short for {_flag(f.name + '.' + primary)}")
    for dotted, owner, f in iter_fields(cls):
        group = groups.get(dotted.split(".")[0], parser) if "." in dotted else parser
        tp, _ = _field_type(owner, f)
        default = _get(defaults, dotted)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if tp is bool:
            group.add_argument(_flag(dotted), dest=dotted, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(_flag(dotted), dest=dotted, default=None, metavar=dotted.rsplit(".", 1)[-1].upper(),
                               help=help_text, choices=f.metadata.get("choices"))
    return parser


def load_config(cls, args: argparse.Namespace | dict | None = None, yaml_path: str | os.PathLike | None = None):
    """Resolve defaults < YAML file < explicit values (flags, or a nested mapping)."""
    values: dict[str, Any] = {}
    if isinstance(args, argparse.Namespace):
        explicit = {k: v for k, v in vars(args).items() if v is not None}
        yaml_path = yaml_path or explicit.pop("config", None)
        known = set(field_names(cls))
        explicit = {k: v for k, v in explicit.items() if k in known}
    else:
        mapping = dict(args or {})
        yaml_path = yaml_path or mapping.pop("config", None)
        explicit = flatten_values(cls, mapping)
    if yaml_path:
        path = Path(yaml_path)
        loaded = _read_yaml(path)
        # A run's config.yaml also records how it ran (`save_config(..., runtime=...)`): for
        # readers only, so a run's file given back as --config repeats the run anywhere.
        loaded.pop(RUNTIME_KEY, None)
        values.update(flatten_values(cls, loaded, where=f"{path}: "))
    values.update(explicit)
    cfg = build(cls, values)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Check choices, then each section's and the config's own `check()` (lists of errors)."""
    errors = _errors(cfg, "")
    if errors:
        raise ConfigError(f"{type(cfg).__name__}: " + "; ".join(errors))


def _errors(obj, prefix: str) -> list[str]:
    errors = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_section(f):
            errors.extend(_errors(value, f"{prefix}{f.name}."))
            continue
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            errors.append(f"{prefix}{f.name}: {value!r} is not one of {', '.join(map(str, choices))}")
    check = getattr(obj, "check", None)
    if check is not None:
        # a section's messages start with its field names: prefix them with the section's name
        errors.extend(e if not prefix or e.startswith(prefix) else prefix + e for e in check())
    return errors


def config_to_dict(cfg) -> dict:
    """Nested plain values (sections as mappings, tuples as lists): what `config.yaml` holds."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if is_section(f):
            out[f.name] = config_to_dict(value)
        else:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def save_config(cfg, out_dir: str | os.PathLike, name: str = "config.yaml", runtime: dict | None = None) -> Path:
    """Write the resolved config beside a run's outputs (atomically). `runtime`: how the run ran
    (world size, backend, device type, dtype), written after the fields under a top-level
    `runtime:` key, which `load_config` skips."""
    from spa_rl.artifacts import atomic_write_text

    path = Path(out_dir) / name
    values = config_to_dict(cfg)
    if runtime is not None:
        values[RUNTIME_KEY] = dict(runtime)
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path
