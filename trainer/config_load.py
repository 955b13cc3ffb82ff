"""A Config from defaults <- YAML file <- dotted key=value overrides; saving it; the --help-config text.

Values are checked against the field types of trainer/config.py (resolved once per class, never eval'd) and
against each section's own checks; every error is a ConfigError naming the key or the file.
"""
from __future__ import annotations

import dataclasses
import os
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from trainer.config import Config, ConfigError, field_types, literal_choices


class _Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false (so `amp: off` stays the string 'off'); 1e-6 reads as a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "tTfF":
    _Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                        [_first])
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789"))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


def _is_section(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def _optional_of(hint):
    """T for `T | None` (either spelling); None for any other type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return None


def _coerce(key: str, value: Any, hint) -> Any:
    """Checks one value against its field type; ints are accepted for floats. Literal keys take strings here and
    their choices are checked by the section (the same check as for a section built in code)."""
    if _optional_of(hint) is not None:
        if value is None:
            return None
        hint = _optional_of(hint)
    if literal_choices(hint):
        hint = str
    if hint is tuple or typing.get_origin(hint) is tuple:
        return value  # parsed by the section's __post_init__
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and numeric and isinstance(value, int):
        return value
    if hint is float and numeric:
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # a quoted number ('1e-3') reads as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and (isinstance(value, str) or numeric):
        return str(value)
    raise ConfigError(f"{key}={value!r}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = [name for name in fields if name.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        if _is_section(fields[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {dotted}.* keys, got {value!r}")
            kwargs[key] = _build(fields[key].default_factory, value, prefix=f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, hints[key])
    return cls(**kwargs)  # sections not mentioned are built by their default_factory


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """['optim.base_lr=0.1', 'epochs=2'] -> {'optim': {'base_lr': 0.1}, 'epochs': 2} (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return tree


def _read_yaml_file(path: Path) -> dict:
    if path.is_dir():
        choices = ", ".join(sorted(p.name for p in path.glob("*.yaml"))) or "no .yaml files there"
        raise ConfigError(f"config file {path}: a directory, not a file ({choices})")
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        loaded = _yaml_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({err})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys at the top level")
    return loaded or {}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides; raises ConfigError naming the key or file."""
    values = _read_yaml_file(Path(path)) if path is not None else {}
    return _build(Config, _merge(values, parse_overrides(list(overrides))))


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    data = cfg.to_dict()
    data["dataset"]["input_shape"] = list(cfg.dataset.input_shape)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------- --help-config
SEED_MARK = "*"


def _type_name(hint) -> str:
    if literal_choices(hint):
        return " | ".join(literal_choices(hint))
    if _optional_of(hint) is not None:
        return f"{_type_name(_optional_of(hint))} or null"
    if typing.get_origin(hint) is tuple:
        return "(" + ",".join(a.__name__ for a in typing.get_args(hint)) + ")"
    return hint.__name__


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "(" + ",".join(str(v) for v in value) + ")"
    return repr(value) if value == "" else str(value)


def _section_lines(defaults, prefix: str, current) -> list[str]:
    """One line per key of a section (type, declared default, seed mark; the value in use where `current` differs
    from the default config), then its help, indented."""
    lines, hints = [], field_types(type(defaults))
    for f in dataclasses.fields(defaults):
        if _is_section(f):
            continue
        mark = f" {SEED_MARK}" if f.metadata["seed"] else ""
        line = f"  {prefix}{f.name}: {_type_name(hints[f.name])} = {_show(f.default)}{mark}"
        if current is not None and getattr(current, f.name) != getattr(defaults, f.name):
            line += f"   [in use: {_show(getattr(current, f.name))}]"
        lines += [line, textwrap.fill(f.metadata["help"], 116, initial_indent=" " * 6, subsequent_indent=" " * 6)]
    return lines


def config_help(current: Config | None = None) -> str:
    """Every key, dotted, with its type, default and help, grouped by section in the order of trainer/config.py;
    the seed project's keys marked. With `current` (a loaded config), the values that differ from the defaults."""
    intro = (f"Config keys (trainer/config.py), as key: type = default; {SEED_MARK}: a key of the seed project's "
             "config.yaml (which loads as is). Set them in a YAML file (--config FILE) or as dotted key=value "
             "arguments, which win.")
    if current is not None:
        intro += " [in use: v]: the value they set here."
    defaults = Config()
    out = [textwrap.fill(intro, 116), "", "run (top level)", *_section_lines(defaults, "", current)]
    for f in dataclasses.fields(Config):
        if _is_section(f):
            out += ["", f"{f.name}: {f.metadata['help']}"]
            out += _section_lines(getattr(defaults, f.name), f"{f.name}.", getattr(current, f.name, None))
    return "\n".join(out) + "\n"
