"""Typed dataclasses from YAML, with no knowledge of MoL's own fields: reading a config file, a
`key=value` override, and checking a nested mapping against a dataclass's annotations. Every problem
is collected into one list (`ConfigError`), so one pass reports them all; mol.config holds the
dataclasses and their value checks.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import MolError


class ConfigError(MolError, ValueError):
    """Every problem found in a config, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, where: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value (or None on error)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where, problems)
    if origin is Literal:
        if value not in args:
            problems.append(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return None
        return build_dataclass(tp, value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return None
        return [coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-4` (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        # NaN passes every range check written as a comparison; inf passes most
        if not math.isfinite(value):
            problems.append(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} at {where}")


def build_dataclass(cls, data: dict, where: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{where + '.' if where else ''}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name in data:
            before = len(problems)
            value = coerce(data[f.name], hints[f.name], f"{where + '.' if where else ''}{f.name}", problems)
            # A mistyped scalar takes its default (its problem is already listed) so the section's
            # value checks still run and report everything else in the same pass.
            if len(problems) == before or not has_default or dataclasses.is_dataclass(value) or isinstance(value, list):
                kwargs[f.name] = value
        elif not has_default:
            problems.append(f"{where + '.' if where else ''}{f.name}: required")
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def apply_override(data: dict, dotted: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-4, true, [a, b] work).
    A list is entered by index (data.sources.0.path=...). Raises ConfigError naming the override."""
    if "=" not in dotted:
        raise ConfigError([f"override {dotted!r} is not of the form key=value"])
    key, raw = dotted.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError([f"override {dotted!r}: {key.strip()!r} is not a dotted key such as train.lr"])
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"override {dotted!r}: {raw!r} is not a YAML value ({getattr(e, 'problem', None) or e}); "
                           f"quote a string that holds [ ] {{ }} : or #"]) from None
    node: Any = data
    for depth, p in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                has = f"indexes 0..{len(node) - 1}" if node else "indexes: it is empty"
                raise ConfigError([f"override {dotted!r}: {where} is a list of {len(node)} items; "
                                   f"{p!r} is not one of its {has}"])
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError([f"override {dotted!r}: {where} is {node!r}, not a mapping with a key {p!r}"])


# Far above any real config (the paper's has about 100 values; 10,000 sources of 5 values each are
# 50,000), far below what a YAML alias bomb expands to: a 1 KB file of nested aliases names billions
# of values, which the cache key's json.dumps or a deepcopy would then build for real.
MAX_CONFIG_NODES = 1_000_000


def _expanded_sizes(node: Any, sizes: dict, active: set, problems: list, where: str) -> int:
    """Values under `node` once every alias is expanded (each node counted per reference), computed
    once per distinct object, so a bomb costs its size in the file, not its expansion."""
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:
        problems.append(f"{where}: a YAML alias refers to a value that contains it (a cycle); write the value out")
        sizes[id(node)] = 1
        return 1
    active.add(id(node))
    items = node.items() if isinstance(node, dict) else enumerate(node)
    total = 1 + sum(_expanded_sizes(v, sizes, active, problems, f"{where}.{k}" if where else str(k)) for k, v in items)
    active.discard(id(node))
    sizes[id(node)] = total
    return total


def config_size_problems(data: Any) -> list[str]:
    """A config whose aliases expand to more than MAX_CONFIG_NODES values, or into a cycle, is
    refused naming the key where it grows: the deepest one still over the limit on its own."""
    sizes: dict = {}
    problems: list = []
    total = _expanded_sizes(data, sizes, set(), problems, "")
    if problems or total <= MAX_CONFIG_NODES:
        return problems[:1]
    node, where = data, []
    while True:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        big = [(k, v) for k, v in items if isinstance(v, (dict, list)) and sizes[id(v)] > MAX_CONFIG_NODES]
        if not big:
            break
        k, node = big[0]
        where.append(str(k))
    return [f"{'.'.join(where) or 'the config'}: YAML aliases here expand the config to {total:,} values, over "
            f"the {MAX_CONFIG_NODES:,} a config may hold; write the values out instead of nesting aliases"]


def read_yaml(path: Path) -> Any:
    """A config file's YAML; ConfigError naming the file (and line) when it is not one."""
    if path.is_dir():
        raise ConfigError([f"config file {path} is a folder; give a YAML file (e.g. data/default.yaml)"])
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"])
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise ConfigError([f"config file {path} cannot be read ({e.strerror or e})"]) from None
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError([f"config file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                           f"save it as UTF-8"]) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError([f"config file {path}: YAML syntax error{where}: {what}"]) from None
