"""How a config is read: YAML files (YAML 1.2 booleans), dotted overrides, and the checks of
values against the schema's type annotations (int, float, bool, str, lists, string-keyed mappings,
Literal choices, nested dataclasses), with errors that name the dotted key and what was expected.
The schema itself is `esper.tolaria.config`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")



class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key and what was expected."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if origin is dict:
        _, inner = typing.get_args(tp)
        return f"mapping of string to {_type_name(inner)}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: unknown value '{value}'; expected one of: {', '.join(choices)}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return {k: coerce(f"{key}.{k}", v, inner) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # e.g. services.cpus=3
    else:  # pragma: no cover - the schema only uses the types above
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def section_aliases(obj: Any) -> dict[str, str]:
    """A schema's top-level sections that live inside another section: {section: "owner.field"}
    (the class attribute ``SECTION_ALIASES``). Users write the section; its owner's field is the
    one object, and it is not written a second time under the owner."""
    return dict(getattr(type(obj), "SECTION_ALIASES", {}))


def _resolve(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def merge(obj: Any, values: dict[str, Any], prefix: str) -> None:
    """Writes `values` (a nested dict) into the dataclass `obj`, checking names and types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    aliases = section_aliases(obj)
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name in aliases:
            merge(_resolve(obj, aliases[name]), value, f"{key}.")
            continue
        if name not in names:
            raise ConfigError(
                f"unknown config key '{key}'; expected one of: {', '.join(sorted(names | set(aliases)))}"
            )
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            for alias, path in aliases.items():
                owner, _, field_name = path.partition(".")
                if owner == name and isinstance(value, dict) and field_name in value:
                    raise ConfigError(f"{key}.{field_name}: this is the {alias} section; expected it written as "
                                      f"{prefix}{alias} (e.g. {prefix}{alias}.<key>)")
            merge(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, coerce(key, value, tp))


def check_choices(obj: Any, prefix: str, skip: frozenset[str] = frozenset()) -> None:
    """Every Literal-typed field holds one of its values (defaults and environment included);
    fields named in `skip` are left out (an aliased section is checked under its alias)."""
    hints = typing.get_type_hints(type(obj))
    aliases = section_aliases(obj)
    for alias, path in aliases.items():
        check_choices(_resolve(obj, path), f"{prefix}{alias}.")
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            hidden = frozenset(p.partition(".")[2] for p in aliases.values() if p.partition(".")[0] == f.name)
            check_choices(value, f"{prefix}{f.name}.", hidden)
        elif typing.get_origin(hints[f.name]) is Literal:
            coerce(f"{prefix}{f.name}", value, hints[f.name])


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are bools, so `mode: off` stays "off"."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def parse_override(text: str) -> tuple[str, Any]:
    """Parses `a.b.c=value`; the value is read as YAML so `0.01`, `true`, `[1, 2]` get their types."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected a dotted key such as optim.lr")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cursor = out
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Reads a YAML config file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; expected a YAML file such as configs/development.yaml")
    try:
        data = _load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; expected a mapping of sections") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def apply_override(config: Any, key: str, value: Any) -> None:
    """Sets one dotted key; inside a mapping-typed field the rest of the key is one mapping key
    (so `lifecycle.min_contribution_per_site.hidden.1=0.02` names the site `hidden.1`)."""
    parts = key.split(".")
    obj: Any = config
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            break
        hints = typing.get_type_hints(type(obj))
        if part in hints and typing.get_origin(hints[part]) is dict and i + 1 < len(parts):
            rest = ".".join(parts[i + 1 :])
            _, inner = typing.get_args(hints[part])
            getattr(obj, part)[rest] = coerce(key, value, inner)
            return
        if part in hints and dataclasses.is_dataclass(hints[part]):
            obj = getattr(obj, part)
            continue
        break
    merge(config, nest(key, value), "")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted.key: value}."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out
