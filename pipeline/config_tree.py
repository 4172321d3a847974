"""Config trees: YAML mappings checked against typed frozen dataclasses (`build`), dotted keys
(`flatten`, `set_dotted`, `parse_override`), and the one error type for bad configs. Generic: it
knows no config keys (those live in `pipeline/config.py`)."""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import fields, is_dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key is unknown, malformed or impossible; the message names the key and the fix."""


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), node))
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(_unknown_key_message(key, node))
    node[parts[-1]] = value


def _unknown_key_message(key: str, known: dict[str, Any]) -> str:
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, list(known), n=1)
    hint = f" Did you mean '{'.'.join(key.split('.')[:-1] + [close[0]])}'?" if close else ""
    return f"unknown config key '{key}'.{hint} Known keys here: {', '.join(sorted(known))}."


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one leaf value against its annotation; ints are accepted where floats are expected."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:  # tuple[int, ...]: a YAML list
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    raise ConfigError(f"config key '{key}' must be {getattr(hint, '__name__', hint)}, got {value!r}.")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {data!r}.")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key_message(prefix + key, dict.fromkeys(names)))
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        if is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(prefix + f.name, data[f.name], hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """'shards.count=10' → ("shards.count", 10); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. shards.count=10.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc}).") from exc
    return key.strip(), value


def digest(*parts: Any) -> str:
    """Stable short hash of JSON-able parts (cache keys, run ids)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
