"""Config machinery: plain dataclasses in, YAML files and command-line overrides on top.

A run is described by a tree of stdlib dataclasses (at most two levels deep) whose fields carry their help
text in `metadata["help"]`; `option()` builds such fields. This module turns YAML files and dotted overrides
(`algo.lam=0.5`, `--algo.lam 0.5`) into instances of that tree, and back. It exists so that a typo in a key
or a value of the wrong type stops a run before it starts, with a message that names the key and the
nearest valid one, instead of being silently ignored an hour into training. The schema itself lives
elsewhere; YAML only sets values, and the dataclasses' own `__post_init__` checks run once, at the end.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import textwrap
import types
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from reopold.registry import nearest

__all__ = ["ConfigError", "option", "from_dict", "to_dict", "load_config", "save_config", "config_help",
           "check_schema", "add_arguments", "parse_overrides"]


class ConfigError(ValueError):
    """A config file or override that cannot become a valid config; the message says which key and why."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


# PyYAML follows YAML 1.1, where `3e-5` (no dot) is a string; learning rates are written that way, so read
# them as floats, and make the dumper quote strings that look like this so a round trip keeps them strings.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


class _Text(str):
    """Raw command-line text: parsed as YAML, but kept verbatim where a string is expected (`--out 2024`)."""


class _UnknownKey(ConfigError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def option(default: Any, help: str, *, choices: Iterable[Any] | None = None) -> Any:
    """A dataclass field with a default and its help text; a dataclass class as default makes a section."""
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        # A fresh copy per instance: a shared list default would leak edits from one config into another.
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def from_dict(cls: type, data: Mapping[str, Any], *, path: str = "") -> Any:
    """Build `cls` from nested dicts, checking every key and value; `path` prefixes keys in messages."""
    try:
        return _build(cls, data, path)
    except _UnknownKey as err:
        raise ConfigError(_unknown_message(err.key, [key for key, *_ in _walk(cls, path)])) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists, in declaration order; `from_dict` reverses it."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def load_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """Read a YAML file (optional), apply dotted overrides in order, then build and validate `cls` once."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys to values at the top level, "
                              f"got {type(loaded).__name__}")
        data = loaded or {}
    known = [key for key, *_ in _walk(cls)]
    for key, text in parse_overrides(overrides):
        if key not in known:
            raise ConfigError(_unknown_message(key, known))
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = _Text(text)
    return from_dict(cls, data)


def save_config(obj: Any, path: str | Path) -> None:
    """Write `obj` as YAML in declaration order, each key preceded by its help text as a comment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(_yaml_lines(obj, "")).lstrip("\n") + "\n")


def config_help(cls: type) -> str:
    """Every dotted key with its type, default and help text, grouped by section."""
    sections: dict[str, list[str]] = {"": []}
    for key, f, tp, is_section in _walk(cls):
        if is_section:
            sections[key] = [f"[{key}] {f.metadata.get('help', '')}".rstrip()]
        else:
            sections[key.rpartition(".")[0]].append(
                f"  {key}: {_type_name(tp)} = {_show(_default(f))}\n      {f.metadata.get('help', '')}")
    return "\n\n".join("\n".join(lines) for lines in sections.values() if lines) + "\n"


def check_schema(cls: type) -> None:
    """Raise TypeError listing every field that breaks the schema rules (help, default, type, depth)."""
    problems = []
    for key, f, tp, is_section in _walk(cls):
        if not f.metadata.get("help"):
            problems.append(f"{key}: no help text; declare it with option(default, help)")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: no default")
        elif key.count(".") >= 2:
            problems.append(f"{key}: nested more than two levels deep; flatten it into its section")
        elif not is_section:
            try:
                _check_choices(f, _coerce(_default(f), tp, key), key)
            except (ConfigError, TypeError) as err:
                problems.append(f"{key}: default does not fit: {err}")
    if problems:
        raise TypeError(f"{cls.__name__} breaks the config rules:\n  " + "\n  ".join(problems))


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, dest: str = "overrides") -> None:
    """Register every key as `--dotted.key VALUE` so `--help` lists it; given ones land in `args.<dest>`.

    Values are collected as "key=value" strings in command-line order for `load_config(..., overrides=)`.
    Parse with `parse_known_args` and pass the leftovers too, so a mistyped key reaches `load_config`,
    which names the nearest valid key, instead of argparse's bare "unrecognized arguments".
    """

    class Override(argparse.Action):  # its own dest is the dotted key; the value goes to the shared list
        def __call__(self, parser, namespace, values, option_string=None):
            setattr(namespace, dest, [*(getattr(namespace, dest, None) or []), f"{self.dest}={values}"])

    parser.set_defaults(**{dest: []})
    groups: dict[str, Any] = {}
    for key, f, tp, is_section in _walk(cls):
        section = key if is_section else key.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"{section} keys" if section else "config keys",
                f.metadata.get("help") if section else "each overrides the value from the config file")
        if not is_section:
            help_text = f"{f.metadata.get('help', '')} (default: {_show(_default(f))})".replace("%", "%%")
            groups[section].add_argument(f"--{key}", dest=key, metavar=_metavar(tp, f), action=Override,
                                         default=argparse.SUPPRESS, help=help_text)


def parse_overrides(argv: Iterable[str]) -> list[tuple[str, str]]:
    """Split `a.b=v`, `--a.b=v` and `--a.b v` into (key, raw text) pairs; dashes in keys become underscores."""
    items, pairs, i = [argv] if isinstance(argv, str) else list(argv), [], 0
    while i < len(items):
        item, i = items[i], i + 1
        if item.startswith("--"):
            item = item[2:]
            if "=" not in item:
                if i == len(items) or items[i].startswith("--"):
                    raise ConfigError(f"option '--{item}' needs a value, e.g. --{item} VALUE")
                item, i = f"{item}={items[i]}", i + 1
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key=value or --key value")
        pairs.append((key.strip().replace("-", "_"), text))
    return pairs


def _walk(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, bool]]:
    """(dotted key, field, annotation, is_section) for every field, depth first in declaration order."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, section = _join(prefix, f.name), _section_type(hints[f.name])
        yield key, f, hints[f.name], section is not None
        if section is not None:
            yield from _walk(section, key)


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys to values, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = _join(path, str(name))
        if name not in fields:
            if path.endswith("]"):  # an item of a list of sections (teachers[0]): its own fields are the candidates
                raise ConfigError(_unknown_message(key, [_join(path, f) for f in fields]))
            raise _UnknownKey(key)
        kwargs[name] = _check_choices(fields[name], _coerce(value, hints[name], key), key)
    missing = [_join(path, name) for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key '{missing[0]}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a __post_init__ check; say which section it came from
        raise ConfigError(f"{path}: {err}" if path else str(err)) from err


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as an instance of annotation `tp`, or a ConfigError naming the key, value and expected type."""
    if isinstance(value, _Text):
        try:
            parsed = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError:
            parsed = str(value)
        try:
            return _coerce(parsed, tp, key)
        except ConfigError as err:
            try:
                return _coerce(str(value), tp, key)
            except ConfigError:
                raise err from None
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arg for arg in args if arg is not type(None)]
        if len(arms) == 1 and (_section_type(arms[0]) or get_origin(arms[0]) is list):
            return _coerce(value, arms[0], key)  # so an error can name the bad key or item inside
        for arm in arms:
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
    elif origin is Literal:
        if any(value == arg and type(value) is type(arg) for arg in args):
            return value
    elif origin is list or tp is list:
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # `steps: 1e4`
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    else:
        raise TypeError(f"{key}: unsupported annotation {tp!r}; use bool, int, float, str, Literal[...], "
                        "list[...], X | None or a dataclass")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _choices(f: dataclasses.Field) -> tuple | None:
    """A field's allowed values; a callable (a registry's names) is read now, so later registrations count."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def _check_choices(f: dataclasses.Field, value: Any, key: str) -> Any:
    choices = _choices(f)
    for item in value if isinstance(value, list) else [value]:
        if choices is not None and item not in choices:
            close = nearest(str(item), map(str, choices))
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {item!r}{hint}")
    return value


def _unknown_message(key: str, known: list[str]) -> str:
    # Compare last parts, not whole dotted keys: a shared 'algo.' prefix makes any two keys look alike.
    # Siblings first, then every section, which catches a key put in the wrong one ('lam' -> 'algo.lam').
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    for pool in (siblings, known):
        by_leaf: dict[str, str] = {}
        for k in pool:
            by_leaf.setdefault(k.rpartition(".")[2], k)
        close = nearest(leaf, by_leaf)
        if close:
            return f"unknown key '{key}'; did you mean '{by_leaf[close]}'?"
    valid = siblings or [k for k in known if "." not in k]
    return f"unknown key '{key}'; valid keys here: {', '.join(valid)}"


def _yaml_lines(obj: Any, indent: str) -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        sub = _yaml_lines(value, indent + "  ") if dataclasses.is_dataclass(value) else None
        lines += [] if indent else [""]
        lines += [f"{indent}# {line}" for line in f.metadata.get("help", "").splitlines()]
        if sub:
            lines += [f"{indent}{f.name}:", *sub]
        else:
            # Flow style keeps a list on one line; indenting every line keeps multi-line strings inside.
            lines += textwrap.indent(f"{f.name}: {_show(value)}", indent).splitlines()
    return lines


def _section_type(tp: Any) -> type | None:
    """The dataclass behind `tp` (plain or `X | None`), i.e. whether the field is a section."""
    if get_origin(tp) in (Union, types.UnionType):
        arms = [arg for arg in get_args(tp) if arg is not type(None)]
        tp = arms[0] if len(arms) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _type_name(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _metavar(tp: Any, f: dataclasses.Field) -> str:
    choices = _choices(f) or (get_args(tp) if get_origin(tp) is Literal else None)
    return "{" + ",".join(map(str, choices)) + "}" if choices else _type_name(tp).upper().replace(" ", "")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _default(f: dataclasses.Field) -> Any:
    if f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _show(value: Any) -> str:
    """A value as one would type it on the command line: 0.3, reopold, null, [a, b]."""
    if value is dataclasses.MISSING:
        return "required"
    dumped = yaml.dump(_plain(value), Dumper=_Dumper, default_flow_style=True, allow_unicode=True, width=10**9)
    return dumped.removesuffix("...\n").strip()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
