"""Loading ml_collections experiment configs and applying command-line overrides.

A config file is a Python file defining ``get_config(arg=None)`` that returns an
``ml_collections.ConfigDict``. Configs are returned locked so that a typo in an
override or in training code cannot silently add a new key; overrides may only
change existing keys, and raw strings from the command line are parsed using
the type of the value they replace.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import inspect
import itertools
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict as _cd

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_name",
    "flat_keys",
    "from_dict",
    "load_config",
    "override_copy",
    "split_config_args",
    "to_dict",
]

ConfigDict = ml_collections.ConfigDict

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_NONE_WORDS = frozenset({"none", "null"})
_MAX_LISTED_KEYS = 8
_module_counter = itertools.count()


class ConfigError(ValueError):
    """A problem with a config file, key or value; the message names the culprit."""


# --------------------------------------------------------------------------- loading


def _split_spec(spec: str) -> tuple[str, str | None]:
    """Split ``file.py:ARG`` at the first ``.py:`` so ARG may itself contain colons."""
    idx = spec.find(".py:")
    if idx < 0:
        return spec, None
    return spec[: idx + 3], spec[idx + 4 :]


def _call_get_config(get_config: Any, arg: str | None, path: str) -> Any:
    """Call ``get_config`` with or without an argument, matching its signature."""
    try:
        params = [
            p
            for p in inspect.signature(get_config).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):  # builtins / odd callables: just try it
        params = None
    if arg is not None:
        if params == []:
            raise ConfigError(
                f"get_config() in config file '{path}' takes no argument, but ':{arg}' was given"
            )
        return get_config(arg)
    if params:
        first = params[0]
        # A required argument gets None (absl convention); an optional one keeps
        # the default chosen by the config's author.
        if first.kind is not first.VAR_POSITIONAL and first.default is first.empty:
            return get_config(None)
    return get_config()


def _check_arg(accepted: Any, arg: str | None, path: str) -> None:
    """A config module's ``ARGS`` lists the arguments its ``get_config`` understands; each
    comma-separated part of ``:arg`` must be one of them (``gpt2_e2e.py:lora,runlocal``)."""
    if accepted is None or arg is None:
        return
    if isinstance(accepted, str) or not all(isinstance(a, str) for a in accepted):
        raise ConfigError(
            f"config file '{path}': ARGS must be a tuple of strings, got {accepted!r}"
        )
    accepted = tuple(accepted)
    bad = [part for part in arg.split(",") if part not in accepted]
    if not bad:
        return
    if not accepted:
        raise ConfigError(f"config file '{path}' takes no argument, but ':{arg}' was given")
    close = difflib.get_close_matches(bad[0], accepted, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"config file '{path}' does not accept the argument {', '.join(repr(b) for b in bad)}"
        f"{hint}; accepted: {', '.join(accepted)} (comma-separated, e.g. "
        f"'{Path(path).name}:{accepted[0]}')"
    )


def config_name(spec: str) -> str:
    """A name for the run of ``path/stem.py[:arg]``: ``stem``, or ``stem-arg`` with each comma
    of the argument a dash (``gpt2_e2e-lora-runlocal``), so two arguments never share one."""
    path, arg = _split_spec(spec)
    stem = Path(path).stem
    return f"{stem}-{arg.replace(',', '-')}" if arg else stem


def load_config(spec: str) -> ConfigDict:
    """Import ``path.py`` (or ``path.py:ARG``) by path and return its locked config."""
    path_str, arg = _split_spec(spec)
    path = Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path_str}'")
    mod_name = f"_ftlab_config_{path.stem}_{next(_module_counter)}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ConfigError(f"cannot import config file '{path_str}' (expected a .py file)")
    module = importlib.util.module_from_spec(mod_spec)
    # Registered so that dataclasses/pickling inside the config file work.
    sys.modules[mod_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise ConfigError(f"error while importing config file '{path_str}': {e!r}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file '{path_str}' does not define get_config()")
    _check_arg(getattr(module, "ARGS", None), arg, path_str)
    try:
        cfg = _call_get_config(get_config, arg, path_str)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"get_config() in config file '{path_str}' failed: {e!r}") from e
    if isinstance(cfg, _cd.FrozenConfigDict):
        cfg = cfg.as_configdict()
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(
            f"get_config() in config file '{path_str}' returned "
            f"{type(cfg).__name__}, expected ml_collections.ConfigDict"
        )
    cfg.lock()
    return cfg


# ------------------------------------------------------------------------ key paths


def flat_keys(cfg: ConfigDict) -> list[str]:
    """All dotted leaf key paths; sections (incl. former plain dicts) are recursed."""
    out: list[str] = []

    def walk(node: ConfigDict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, ConfigDict):
                walk(value, dotted + ".")
            else:
                out.append(dotted)

    walk(cfg, "")
    return out


def _suggest(cfg: ConfigDict, key: str, section: str) -> str:
    """Nearest valid key for a typo, else a few valid keys of the closest section."""
    keys = flat_keys(cfg)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        # Match on the last component, e.g. 'lr' -> 'optim.lr'; prefer same section.
        last = key.rsplit(".", 1)[-1]
        by_last: dict[str, list[str]] = {}
        for k in keys:
            by_last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        hit = difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)
        if hit:
            cands = by_last[hit[0]]
            same = [c for c in cands if section and c.startswith(section + ".")]
            close = [(same or cands)[0]]
    if close:
        return f"did you mean '{close[0]}'?"
    in_section = [k for k in keys if not section or k.startswith(section + ".")]
    shown = ", ".join(in_section[:_MAX_LISTED_KEYS])
    more = ", ..." if len(in_section) > _MAX_LISTED_KEYS else ""
    where = f"under '{section}'" if section else "are"
    return f"valid keys {where}: {shown}{more}"


def _resolve(cfg: ConfigDict, key: str) -> tuple[ConfigDict, str]:
    """Return (parent section, leaf name) for an existing dotted key."""
    parts = key.split(".")
    node = cfg
    walked: list[str] = []
    for part in parts[:-1]:
        child = node[part] if part and part in node else None
        if not isinstance(child, ConfigDict):
            break
        node = child
        walked.append(part)
    else:
        if parts[-1] and parts[-1] in node:
            return node, parts[-1]
    section = ".".join(walked)
    raise ConfigError(f"unknown config key '{key}'; {_suggest(cfg, key, section)}")


# ------------------------------------------------------------------------- parsing


def _type_name(t: type) -> str:
    return t.__name__


def _bad_value(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(
        f"config key '{key}' expects {expected}, got {value!r} ({type(value).__name__})"
    )


def _literal_or_raw(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _parse_sequence(raw: str, current: Any) -> list[Any]:
    """``"(1, 2)"``/``"[1, 2]"`` via literal_eval; a bare ``"a,b"`` as a comma list."""
    text = raw.strip()
    if not text:
        return []
    all_str = bool(current) and all(isinstance(v, str) for v in current)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = None
        parsed = False
    else:
        parsed = True
    if parsed and isinstance(value, (list, tuple)):
        return list(value)
    if parsed and (not all_str or isinstance(value, str)):
        return [value]
    # Bare comma list; elements stay strings for a tuple of strings.
    parts = [p.strip() for p in text.split(",")]
    return parts if all_str else [_literal_or_raw(p) for p in parts]


def _parse(key: str, raw: str, current: Any, field_type: type | None) -> Any:
    """Turn a command-line string into a value of the field's type."""
    if field_type is None or field_type is type(None):
        return _literal_or_raw(raw)
    if current is None and raw.strip().lower() in _NONE_WORDS:
        return None  # a typed placeholder that is being reset to None
    if field_type is bool:
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _bad_value(key, "bool (true/false/1/0/yes/no)", raw)
    if field_type is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise _bad_value(key, "int", raw) from None
    if field_type is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise _bad_value(key, "float", raw) from None
    if field_type is str:
        return raw
    if field_type in (tuple, list):
        return field_type(_parse_sequence(raw, current))
    return _literal_or_raw(raw)


# ----------------------------------------------------------------------- overrides

Overrides = Mapping[str, Any] | Iterable[tuple[str, str]]


def _set(cfg: ConfigDict, key: str, value: Any, *, from_string: bool) -> None:
    """Set one existing dotted key, parsing/type-checking the value."""
    node, leaf = _resolve(cfg, key)
    current = node[leaf]
    if isinstance(current, ConfigDict):
        if not from_string and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                _set(cfg, f"{key}.{sub_key}", sub_value, from_string=False)
            return
        raise ConfigError(
            f"config key '{key}' is a section; set its fields instead "
            f"(e.g. '{key}.{next(iter(current.keys()), '<field>')}'), got {value!r}"
        )
    field_type = node.get_type(leaf)
    if from_string:
        value = _parse(key, value, current, field_type)
    elif field_type is int and isinstance(value, bool):
        raise _bad_value(key, "int", value)  # ml_collections would accept bool as int
    try:
        node[leaf] = value
    except TypeError as e:
        raise _bad_value(key, _type_name(field_type), value) from e


def apply_overrides(cfg: ConfigDict, overrides: Overrides) -> ConfigDict:
    """Set existing keys in place (works on locked configs); strings are parsed by type."""
    if isinstance(overrides, Mapping):
        items: Iterable[tuple[str, Any]] = overrides.items()
    else:
        items = overrides
    for key, value in items:
        _set(cfg, key, value, from_string=isinstance(value, str))
    return cfg


def override_copy(cfg: ConfigDict, overrides: Overrides) -> ConfigDict:
    """A locked deep copy with overrides applied, for deriving experiment variants."""
    new = copy.deepcopy(cfg)
    apply_overrides(new, overrides)
    new.lock()
    return new


# ------------------------------------------------------------------------------ CLI


def split_config_args(
    argv: list[str],
) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """Pull ``--config[=| ]spec`` and ``--config.key[=| ]value`` out of argv.

    Returns (config spec or None, overrides in order, remaining args in order).
    Everything after a bare ``--`` is left untouched.
    """
    spec: str | None = None
    overrides: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg == "--config" or arg.startswith(("--config=", "--config.")):
            name, eq, value = arg.partition("=")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError(f"command-line flag '{name}' needs a value")
                value = argv[i + 1]
                i += 1
            if name == "--config":
                if spec is not None:
                    raise ConfigError(f"--config given twice: '{spec}' and '{value}'")
                spec = value
            else:
                key = name[len("--config.") :]
                if not key or any(not p for p in key.split(".")):
                    raise ConfigError(f"malformed config override flag '{arg}'")
                overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return spec, overrides, rest


# -------------------------------------------------------------------------- saving


def _plain(value: Any) -> Any:
    if isinstance(value, (ConfigDict, Mapping)):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy / jax scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)  # record, don't crash: config.json is for humans/diffing
    return value


def to_dict(cfg: ConfigDict) -> dict[str, Any]:
    """Plain JSON-serialisable nested dict (tuples -> lists) for saving config.json."""
    return _plain(cfg)


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples a config holds (dicts inside keep their keys)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def from_dict(saved: Mapping[str, Any], base: ConfigDict, where: str = "config") -> ConfigDict:
    """The inverse of :func:`to_dict`: ``saved`` (a run's config.json) laid over ``base`` (the
    schema's defaults), tuples restored where the schema has tuples; returned locked.

    Sections that are free-form in the schema (empty there, like ``model.hf_config``, or
    ``mesh.shape``) take the saved mapping as it is. A saved key the schema does not know is
    an error naming it; keys the schema gained since the run keep their defaults.
    """
    cfg = copy.deepcopy(base)
    cfg.unlock()

    def fill(node: ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            if key not in node:
                raise ConfigError(f"{where}: key '{dotted}' is not a config key of this ftlab")
            current = node[key]
            if isinstance(current, ConfigDict) and isinstance(value, Mapping):
                if not current.keys() or dotted == "mesh.shape":
                    node[key] = ConfigDict(dict(value))
                else:
                    fill(current, value, dotted + ".")
            elif isinstance(current, tuple):
                node[key] = _tuples(value)
            else:
                try:
                    node[key] = value
                except TypeError as e:
                    raise ConfigError(f"{where}: key '{dotted}': {e}") from None

    fill(cfg, saved, "")
    restored = to_dict(cfg)
    flat_saved = _flat_plain(saved)
    flat_restored = _flat_plain(restored)
    differs = sorted(k for k, v in flat_saved.items() if flat_restored.get(k, _MISSING) != v)
    if differs:
        raise ConfigError(f"{where}: cannot restore key(s) {', '.join(differs)} exactly")
    cfg.lock()
    return cfg


_MISSING = object()


def _flat_plain(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat_plain(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
