"""Load YAML of plain values into typed dataclasses: validation, bases, command-line overrides.

Merge rule for bases (the one sentence users need): a config may name `base: other.yaml` (a path relative to
itself); the base is loaded first, then mappings merge key by key and every other value (scalars, lists)
replaces the base's value.

Path rule: `base:` is the only path read relative to the config file that names it. Every other path a config
holds (dataset annotations and images, weights, the run folder), wherever it is written (a base included), is
kept as written and read relative to the current working directory of the command (`PATH_RULE`).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

BASE_KEY = "base"
# what error messages about a path from a config say about where relative paths lead
PATH_RULE = ("relative paths in a config are read from the current directory, not from the config's folder; "
             "only `base:` is relative to the config file")


class ConfigError(ValueError):
    """A config value or key is invalid. The message names the key (dotted path) and, where possible, a fix."""


def _suggest(name: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (lists to tuples, dicts to dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), [str(a) for a in allowed])
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected a list of {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {_convert(k, k_tp, key): _convert(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            hint = _suggest(str(name), fields)
            if hint and prefix:  # name the whole dotted key: "did you mean 'solver.base_lr'?"
                hint = hint.replace("mean '", f"mean '{prefix}.")
            raise ConfigError(f"unknown key '{key}'{hint}")
        default_factory = fields[name].default_factory
        if isinstance(value, dict) and default_factory is not dataclasses.MISSING:
            # A partial section overrides the field's own defaults, not the bare dataclass defaults.
            value = merge(to_dict(default_factory()), value)
        kwargs[name] = _convert(value, hints[name], key)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key '{prefix + '.' if prefix else ''}{missing[0]}'")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # a __post_init__ check: say which section failed
        where = prefix or cls.__name__
        if str(exc).startswith(where):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def from_dict(cls: type[T], data: dict) -> T:
    """Build the dataclass `cls` from plain values, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    return _from_dict(cls, data)


def to_dict(cfg: Any) -> Any:
    """The plain-value form of a config (tuples become lists), ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; every other value replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file and its chain of bases into one mapping of plain values (nothing is executed)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config bases form a cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a config is YAML)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: '{BASE_KEY}' must be a path string, got {base!r}")
        data = merge(read_yaml(path.parent / base, (*_seen, path)), data)
    return data


def _yaml_problem(exc: yaml.YAMLError, where: bool = True) -> str:
    """One line for a YAML error (PyYAML's own message spans several lines with a drawn caret)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if where and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return problem


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """Turn ["solver.base_lr=0.02", "data.train.flip_prob=0"] into a nested mapping of YAML-typed values."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. solver.base_lr=0.02)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML "
                              f"({_yaml_problem(exc, False)})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Load `path` (with its bases), apply `key=value` overrides, and validate into `cls`."""
    data = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def config_from_data(cls: type[T], data: dict, overrides: typing.Sequence[str] = (), *,
                     source: str = "the config") -> T:
    """Validate plain values that were stored rather than read from YAML (a checkpoint's resolved config), with
    `key=value` overrides applied on top; nothing in `data` is executed.

    Raises:
        ConfigError: an invalid override, or `data` does not validate (the message starts with `source`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source} is not a mapping (got {type(data).__name__})")
    data = merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def dump_yaml(cfg: Any, path: str | Path | None = None) -> str:
    """Write a config as YAML of plain values; returns the text."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
