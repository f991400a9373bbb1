"""Turning plain data into a validated Config and reading it from YAML or TOML files, with `section.key=value`
overrides. Validation happens once, at the edge: unknown keys, wrong types and out-of-range values raise
ConfigError naming the key, the value, what was expected and the file's line or the override that set it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

from .config import Config, ConfigError, _is_section, to_dict


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return f"a list of {plural.get(item) or _type_name(item)}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(tp, str(tp))


def _coerce(value: Any, tp, key: str):
    """Return value converted to tp, or raise ConfigError naming key, value and the expected type."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
            raise bad
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        try:
            return [_coerce(v, item, key) for v in value]
        except ConfigError:
            raise bad from None
    return _scalar(value, tp, key, bad)


def _scalar(value: Any, tp, key: str, bad: ConfigError):
    """Return value converted to the plain type tp (bool, int, float, str or dict), or raise `bad`."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            number = float(value)  # YAML 1.1 reads `1e-3` as a string
        except ValueError:
            raise bad from None
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # `name: 2024`, `name=2024`
            return str(value)
        raise bad
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(name)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key '{key}'{hint}", key)


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}",
                          prefix.rstrip(".") or None)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), names)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, tp = prefix + f.name, hints[f.name]
        if _is_section(tp):
            kwargs[f.name] = _build(tp, data[f.name] if data[f.name] is not None else {}, key + ".")
            continue
        try:
            value = _coerce(data[f.name], tp, key)
        except ConfigError as e:
            e.key = key
            raise
        check = f.metadata.get("check")
        if check is not None and not check(value):
            raise ConfigError(f"config key '{key}': expected {f.metadata['expect']}, got {value!r}", key)
        kwargs[f.name] = value
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    if not cfg.name or "/" in cfg.name or cfg.name in (".", ".."):
        raise ConfigError(f"config key 'name': expected a plain directory name, got {cfg.name!r}", "name")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError("config keys 'data.val_fraction' + 'data.test_fraction': expected a sum below 1, got "
                          f"{cfg.data.val_fraction} + {cfg.data.test_fraction}", "data.test_fraction")
    if not cfg.early_stop.monitor.startswith("val_"):
        raise ConfigError(f"config key 'early_stop.monitor': expected a validation metric named val_<name>, "
                          f"got {cfg.early_stop.monitor!r}", "early_stop.monitor")


def from_dict(data: dict) -> Config:
    """Build and validate a Config from nested plain data (raises ConfigError)."""
    cfg = _build(Config, data)
    _cross_checks(cfg)
    return cfg


def _parse_error(e: Exception) -> str:
    """A parser's error in one line: PyYAML's spans several (the context, the problem, each with a caret under
    the line quoted), TOML's is one already."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        context = f"{e.context}: " if getattr(e, "context", None) else ""
        return f"{context}{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def _safe_load(text: str):
    """yaml.safe_load, where a key given twice in one mapping is an error (PyYAML keeps the last one silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # construct_mapping refuses it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)
    return yaml.load(text, Loader=Loader)


def read_file(path: str | Path, what: str = "config file") -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into nested plain data; errors call it `what`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} '{path}': is a directory; expected a .yaml, .yml or .toml file")
    if not path.is_file():
        raise ConfigError(f"{what} '{path}': not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{path}': cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = _safe_load(text)
        else:
            raise ConfigError(f"{what} '{path}': expected a .yaml, .yml or .toml file")
    except ConfigError:
        raise
    except Exception as e:  # the parsers' own errors carry line and column
        raise ConfigError(f"{what} '{path}': cannot parse: {_parse_error(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}': expected a mapping at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` (or `--a.b=value`, as `wandb agent` passes it) -> (['a', 'b'], parsed value)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body or not body.split("=", 1)[0]:
        raise ConfigError(f"override '{text}': expected section.key=value")
    key, raw = body.split("=", 1)
    import yaml
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of data with each `section.key=value` override set (validation comes later)."""
    import copy
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def key_line(path: str | Path, key: str | list[str]) -> int | None:
    """The line of `path` (YAML or TOML, read before) that sets `key` (dotted, or its parts), or None where
    it sets none.

    Only asked once a key is wrong, so a good config never pays for it."""
    parts = key.split(".") if isinstance(key, str) else key
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".toml":
        return _toml_key_line(text, parts)
    import yaml
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    line = None
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            return None
        found = [(k, v) for k, v in node.value if k.value == part]
        if not found:
            return None
        key_node, node = found[-1]
        line = key_node.start_mark.line + 1
    return line


def _toml_key_line(text: str, parts: list[str]) -> int | None:
    """tomllib keeps no positions: find `[a.b]` headers and `key =` lines (dotted keys too; not inline tables)."""
    def split(dotted):
        return [p.strip().strip('"\'') for p in dotted.split(".")]
    table = []
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[([^\[\]]+)\]", line)
        if header:
            table = split(header.group(1))
        elif (assign := re.match(r"\s*([\w.\"' -]+?)\s*=", line)) and table + split(assign.group(1)) == parts:
            return number
    return None


def _located(e: ConfigError, path: str | Path | None, overrides: list[str]) -> ConfigError:
    """e, prefixed with what set its key: the last override that did, else the line of the file that did."""
    if e.key is None:
        return e
    for text in reversed(overrides):
        set_key = ".".join(parse_override(text)[0])
        if e.key == set_key or e.key.startswith(set_key + "."):
            return ConfigError(f"override '{text}': {e}", e.key)
    if path is not None and (line := key_line(path, e.key)) is not None:
        return ConfigError(f"{path}:{line}: {e}", e.key)
    return e


def build(data: dict, path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """from_dict(apply_overrides(data, overrides)), where `data` was read from `path`; an error names the
    override or the file's line that set the wrong key."""
    try:
        return from_dict(apply_overrides(data, list(overrides)))
    except ConfigError as e:
        raise _located(e, path, list(overrides)) from None


def load(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a config file (or start from `base`), apply overrides, validate.

    The run name defaults to the file's stem, so re-running a config reuses its run directory.
    """
    data = dict(base or {})
    if path is not None:
        data = {**data, **read_file(path)}
        data.setdefault("name", Path(path).stem)
    return build(data, path, overrides)


def dump_yaml(cfg: Config) -> str:
    import yaml
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
