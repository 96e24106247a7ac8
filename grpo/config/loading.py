"""From a YAML file or a dict to a validated `Template`: type checks per field, key=value overrides, and the
closest field name for a typo."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from grpo.config.checks import check_fields, check_paths, check_relations
from grpo.config.schema import ALIASES, LEAF_PATHS, SECTIONS, Template
from grpo.errors import ConfigError


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        type(None): "null",
        Any: "anything",
    }.get(tp, str(tp))


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check value against the annotation; return it (ints become floats for float fields)."""
    origin = typing.get_origin(tp)
    ok, out = False, value
    if tp is Any:
        ok = True
    elif origin is Literal:
        ok = value in typing.get_args(tp)
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(where, value, arg)
            except ConfigError:
                continue
    elif origin is list:
        ok = isinstance(value, list)
        if ok:
            (item_tp,) = typing.get_args(tp)
            out = [_coerce(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif tp is type(None):
        ok = value is None
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        # YAML 1.1 reads 1e-5 (no dot) as a string; users write it that way, so accept it.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        out = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where} = {value!r} is not allowed: expected {_type_name(tp)}.")
    return out


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'the template'} must be a mapping of fields, got {data!r}."
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            options = names if prefix else list(LEAF_PATHS)
            raise ConfigError(f"Unknown field '{prefix}{key}'{_closest(str(key), options)}.")
        if key in SECTIONS and cls is Template:
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, hints[key])
    return cls(**kwargs)


def template_from_dict(data: Any, *, source: str = "the template") -> Template:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping with name, model, dataset, template and config.")
    t = _build(Template, data, "")
    check_fields(t)
    check_relations(t)
    check_paths(t)
    return t


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """'max_steps=2' -> (('config','max_steps'), 2); a bare key finds its field wherever it sits."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like key=value (for example max_steps=2).")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw  # e.g. input={{question}}: not YAML, but a fine string; type checks still apply
    if key in ALIASES:
        return ALIASES[key], value
    if key in LEAF_PATHS:
        return LEAF_PATHS[key], value
    matches = [p for dotted, p in LEAF_PATHS.items() if dotted.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0], value
    if len(matches) > 1:
        options = ", ".join(".".join(m) for m in matches)
        raise ConfigError(f"Override key '{key}' is ambiguous: write one of {options}.")
    raise ConfigError(f"Unknown field '{key}' in override {text!r}{_closest(key, list(LEAF_PATHS))}.")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            out[path[0]] = value
        else:
            section = out.get(path[0]) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{path[0]} must be a mapping of fields, got {section!r}.")
            out[path[0]] = {**section, path[1]: value}
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Template file {str(p)!r} does not exist.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"Template file {str(p)!r} is not valid YAML{where}: {getattr(e, 'problem', e)}."
        ) from None
    if data is None:  # an empty file is more likely a mistake (a wrong path, a failed save) than a choice
        raise ConfigError(
            f"Template file {str(p)!r} is empty: write the fields to set (configs/default.yaml shows them), "
            "or name: NAME to train on every default."
        )
    if not isinstance(data, dict):
        raise ConfigError(f"Template file {str(p)!r} must hold a YAML mapping, not {type(data).__name__}.")
    return data


def load_template(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Template:
    """Read a YAML template, apply key=value overrides, validate. Raises ConfigError on user mistakes."""
    data = apply_overrides(read_yaml(path), list(overrides))
    return template_from_dict(data, source=f"Template file {str(path)!r}")
