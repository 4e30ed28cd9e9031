"""Sweeps declared in the config: a grid of dotted keys and zipped groups, expanded into variants.

    c.sweep.grid = (("method.lora.rank", (1, 2, 4, 8)), ("optim.lr", (1e-3, 3e-3)))
    c.sweep.zip = (
        (("data.train_per_class", (2, 5, 10)), ("train.batch_size", (10, 25, 25))),
    )

Each grid entry is one axis of a product; each zipped group is one more axis whose keys move
together (equal-length value lists). A point is named from its values: ``r4_lr1e-3_n5``. Common
keys have short names (``method.lora.rank`` -> ``r``, ``optim.lr`` -> ``lr``,
``data.train_per_class`` -> ``n``, ``method.name`` -> its value, ``method.lora.targets`` -> the
weights its regexes name, ``attn/(q|v)_proj/kernel`` -> ``qv``), other keys their last
component; a zipped group is named by its first key, or by a ``("name", (labels...))`` entry.

The sweep applies on top of every declared variant (``full_r4_lr1e-3``), or alone when there
are none, and every resulting variant runs once per ``variant_seeds`` seed. Everything is
checked here, before any data is read: keys that do not exist (with the nearest valid one),
empty value lists, zipped lists of unequal length, a key swept twice, duplicate names, and
``baseline`` naming no variant.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
from typing import Any

import ml_collections as mc

from ftlab.config import ConfigError, apply_overrides

__all__ = [
    "Axis",
    "axes",
    "baseline_name",
    "check",
    "expand",
    "format_value",
    "fragment",
    "points",
]

LABEL = "name"  # in a zipped group: labels for its points instead of its first key's values
# Keys that define the experiment itself: a sweep may not change them.
RESERVED = ("stages", "variants", "variant_seeds", "sweep", "baseline")
SHORT = {
    "method.lora.rank": "r",
    "optim.lr": "lr",
    "data.train_per_class": "n",
    "method.lora.alpha": "alpha",
    "train.num_steps": "steps",
    "train.batch_size": "bs",
    "method.partial.last_k": "top",
}
_VALUE_ONLY = ("method.name",)  # named by the value alone: lora_r4, not name-lora_r4
_STOP_WORDS = {"kernel", "proj", "attn", "attention", "self", "weight", "d"}


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis of the product: its keys and, per point, (name fragment, overrides)."""

    where: str  # "config.sweep.grid[0]", for messages
    keys: tuple[str, ...]
    points: tuple[tuple[str, dict], ...]


# ------------------------------------------------------------------------------ naming


def format_value(value: Any) -> str:
    """Compact text for a swept value: 1e-3, 0.5, 32, a-b for tuples; filesystem-safe."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        if abs(value) < 0.01 or abs(value) >= 1e5:
            mantissa, exponent = f"{value:e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value) or "none"
    if value is None:
        return "none"
    return _safe(str(value))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "", text)


def _targets_short(targets: Any) -> str:
    """``("attn/(q|v)_proj/kernel",)`` -> ``qv``; ``block_\\d+/kernel`` -> ``block``."""
    if isinstance(targets, str):
        targets = (targets,)
    parts = []
    for regex in targets:
        words = re.findall(r"[A-Za-z0-9]+", re.sub(r"\\[A-Za-z]", " ", str(regex)))
        words = [w for w in words if w.lower() not in _STOP_WORDS]
        parts.append(("" if all(len(w) == 1 for w in words) else "-").join(words))
    return "+".join(p for p in parts if p) or "none"


def fragment(key: str, value: Any) -> str:
    """A point's name for one key: ``r4``, ``lr1e-3``, ``lora``, ``qv``, ``alpha16``."""
    if key in _VALUE_ONLY:
        return format_value(value)
    if key == "method.lora.targets":
        return _targets_short(value)
    short = SHORT.get(key, key.rsplit(".", 1)[-1])
    if isinstance(value, bool):
        return short if value else f"no_{short}"
    if isinstance(value, str):
        return f"{short}-{format_value(value)}"
    return f"{short}{format_value(value)}"


# ------------------------------------------------------------------------- validation


def _entry(where: str, entry: Any, allow_label: bool = False) -> tuple[str, tuple]:
    """One ``(dotted_key, (values...))`` pair, checked for shape."""
    if not (
        isinstance(entry, (tuple, list))
        and len(entry) == 2
        and isinstance(entry[0], str)
        and isinstance(entry[1], (tuple, list))
    ):
        raise ConfigError(f"{where}: expected a (dotted_key, (values...)) pair, got {entry!r}")
    key, values = entry[0], tuple(entry[1])
    if not values:
        raise ConfigError(f"{where}: {key!r} has an empty list of values")
    if key.split(".", 1)[0] in RESERVED and not (allow_label and key == LABEL):
        raise ConfigError(f"{where}: {key!r} cannot be swept (it defines the experiment)")
    return key, values


def _check_values(probe: mc.ConfigDict, where: str, key: str, values: tuple) -> None:
    """Every value must be settable: the key exists (else the nearest one is named), types fit."""
    for value in values:
        try:
            apply_overrides(probe, {key: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def axes(cfg: mc.ConfigDict) -> list[Axis]:
    """The sweep's axes (grid entries, then zipped groups), validated; [] without a sweep."""
    grid, zipped = tuple(cfg.sweep.grid), tuple(cfg.sweep.zip)
    if not grid and not zipped:
        return []
    probe = copy.deepcopy(cfg)
    out: list[Axis] = []
    for i, entry in enumerate(grid):
        where = f"config.sweep.grid[{i}]"
        key, values = _entry(where, entry)
        _check_values(probe, where, key, values)
        out.append(Axis(where, (key,), tuple((fragment(key, v), {key: v}) for v in values)))
    for i, group in enumerate(zipped):
        where = f"config.sweep.zip[{i}]"
        if not isinstance(group, (tuple, list)) or not group:
            raise ConfigError(
                f"{where}: expected a non-empty group of (dotted_key, (values...)) pairs, "
                f"got {group!r}"
            )
        if len(group) == 2 and isinstance(group[0], str):
            raise ConfigError(
                f"{where}: a zipped group is a tuple of pairs; wrap it: (({group[0]!r}, ...),)"
            )
        pairs = [_entry(where, entry, allow_label=True) for entry in group]
        lengths = {key: len(values) for key, values in pairs}
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"{where}: zipped value lists must have equal lengths, got "
                + ", ".join(f"{k}: {n}" for k, n in lengths.items())
            )
        labels = dict(pairs).get(LABEL)
        keys = [k for k, _ in pairs if k != LABEL]
        if not keys:
            raise ConfigError(f"{where}: the group sets no config key")
        if len(keys) != len(set(keys)):
            raise ConfigError(f"{where}: a key appears twice in the group: {keys}")
        for key, values in pairs:
            if key != LABEL:
                _check_values(probe, where, key, values)
        first_key, first_values = next((k, v) for k, v in pairs if k != LABEL)
        names = (
            [_safe(str(label)) for label in labels]
            if labels is not None
            else [fragment(first_key, v) for v in first_values]
        )
        overrides = [
            {key: values[j] for key, values in pairs if key != LABEL}
            for j in range(len(first_values))
        ]
        out.append(Axis(where, tuple(keys), tuple(zip(names, overrides))))
    seen: dict[str, str] = {}
    for axis in out:
        for key in axis.keys:
            if key in seen:
                raise ConfigError(
                    f"{axis.where}: {key!r} is already swept by {seen[key]}; sweep each key once"
                )
            seen[key] = axis.where
    return out


def points(cfg: mc.ConfigDict) -> list[tuple[str, dict]]:
    """The sweep's points as (name, overrides), in product order; [] without a sweep."""
    found = axes(cfg)
    if not found:
        return []
    out = []
    for combo in itertools.product(*(axis.points for axis in found)):
        name = "_".join(n for n, _ in combo if n)
        overrides: dict = {}
        for _, o in combo:
            overrides.update(o)
        out.append((name, overrides))
    _unique(
        [n for n, _ in out],
        "config.sweep",
        "points share a name (a value listed twice, or a zipped group whose first key "
        "repeats a value: label the group with a ('name', (labels...)) entry)",
    )
    return out


def _unique(names: list[str], key: str, hint: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{key}: {hint}: {', '.join(dupes)}")


def expand(cfg: mc.ConfigDict) -> list[tuple[str, dict]]:
    """The compared variants as (name, overrides): each declared variant with every sweep
    point laid on top (``VARIANT_POINT``), the points alone without variants, or the declared
    variants without a sweep. Seeds are not expanded here (see ``variant_seeds``)."""
    declared = [(name, dict(overrides)) for name, overrides in cfg.variants]
    swept = points(cfg)
    if not swept:
        return declared
    if not declared:
        return swept
    out = [
        (f"{vname}_{pname}", {**voverrides, **poverrides})
        for vname, voverrides in declared
        for pname, poverrides in swept
    ]
    _unique([n for n, _ in out], "config.sweep", "variant and sweep names collide")
    return out


def baseline_name(cfg: mc.ConfigDict, names: list[str] | None = None) -> str | None:
    """``config.baseline``, checked against the compared variants; "" means the first."""
    names = [n for n, _ in expand(cfg)] if names is None else names
    if not cfg.baseline:
        return names[0] if names else None
    if cfg.baseline not in names:
        raise ConfigError(
            f"config.baseline: {cfg.baseline!r} names no variant; variants: {', '.join(names)}"
            if names
            else f"config.baseline: {cfg.baseline!r} set, but the config compares no variants"
        )
    return cfg.baseline


def check(cfg: mc.ConfigDict) -> None:
    """Validate the sweep and the baseline (``schema.validate`` calls this)."""
    baseline_name(cfg, [n for n, _ in expand(cfg)])
