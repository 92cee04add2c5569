"""From YAML files and dotted overrides to a typed `Config`: type coercion naming the dotted key, `include:`
chains, legacy sections of saved configs, and writing the resolved config back."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dpar_scale.config.sections import LEGACY_DPAR, Config, ConfigError
from dpar_scale.config.validation import validate


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Returns `value` converted to `annotation`, or raises ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {annotation}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown config key {'.'.join(filter(None, [prefix, unknown[0]]))!r} "
            f"(valid keys at {where}: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parses the right-hand side of an override with YAML rules (so 1e-4, true, [16,16] work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` strings to a nested dict (validated later against the dataclasses)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. model.dim=64)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_scalar(text)
    return values


def _read_mapping(path: str | Path, included_by: Path | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        where = f" (included by {str(included_by)!r})" if included_by else ""
        raise ConfigError(f"config file {str(path)!r} does not exist{where}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return loaded


INCLUDE_KEY = "include"


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The values of a YAML config with its `include:` files merged in (see the module docstring)."""
    path, here = Path(path), Path(path).resolve()
    if here in _chain:
        raise ConfigError("config include cycle: " + " -> ".join(str(p) for p in _chain + (here,)))
    values = _read_mapping(path, _chain[-1] if _chain else None)
    includes = values.pop(INCLUDE_KEY, [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"{path}: {INCLUDE_KEY} must be a file name or a list of file names (relative to "
                          f"{path.parent}), got {includes!r}")
    merged: dict = {}
    for name in includes:
        merged = _deep_merge(merged, read_config_file(here.parent / name, _chain + (here,)))
    return _deep_merge(merged, values)


def _from_values(values: dict, overrides: list[str], cls: type) -> Any:
    # Start from the defaults so that overrides can name keys the file does not mention.
    merged = apply_overrides(_deep_merge(to_dict(cls()), values), overrides)
    cfg = _build(cls, merged)
    if isinstance(cfg, Config):
        validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Reads YAML (optional), applies dotted overrides, validates types and keys, and checks values."""
    return _from_values(read_config_file(path) if path else {}, overrides or [], cls)


def with_legacy_sections(values: dict) -> dict:
    """A saved config's values (parsed YAML / JSON) with the sections that did not exist when it was written
    filled in with what the run then used: a model config without `dpar` gets LEGACY_DPAR."""
    model = values.get("model") if isinstance(values, dict) else None
    if isinstance(model, dict) and "dpar" not in model:
        values = {**values, "model": {**model, "dpar": dict(LEGACY_DPAR)}}
    return values


def load_saved_config(path: str | Path) -> Config:
    """The config a run saved (a checkpoint's config.yaml, an export's config.json): `load_config`, except that a
    file written before a section existed means that section's legacy values (see `with_legacy_sections`), so
    an old checkpoint is rebuilt as the model it holds."""
    return _from_values(with_legacy_sections(_read_mapping(path)), [], Config)


def override(cfg: Any, overrides: list[str]) -> Any:
    """A validated copy of a loaded `cfg` with dotted overrides applied (e.g. an inference-time patch rule)."""
    out = _build(type(cfg), apply_overrides(to_dict(cfg), list(overrides)))
    if isinstance(out, Config):
        validate(out)
    return out


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes the resolved config as YAML (the run folder's `config.yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
