"""Which base-parameter leaves a method trains, chosen by path from the config alone."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ftlab.config import ConfigError


def matching(paths: Iterable[str], pattern: str) -> list[str]:
    """Paths in which ``pattern`` is found (``re.search``)."""
    rx = re.compile(pattern)
    return [p for p in paths if rx.search(p)]


def _no_match(key: str, pattern: str, paths: Sequence[str]) -> ConfigError:
    sample = ", ".join(list(paths)[:8]) + (", ..." if len(paths) > 8 else "")
    return ConfigError(f"config.{key}: regex {pattern!r} matches no parameter; paths are: {sample}")


def by_regexes(paths: Sequence[str], patterns: Sequence[str], key: str) -> set[str]:
    """Union of the paths matched by each regex; a regex that matches nothing is an error."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = matching(paths, pattern)
        if not hits:
            raise _no_match(key, pattern, paths)
        chosen.update(hits)
    return chosen


def block_index(path: str, block_pattern: str) -> int | None:
    m = re.search(block_pattern, path)
    return int(m.group(1)) if m else None


def last_k_blocks(paths: Sequence[str], k: int, block_pattern: str) -> set[str]:
    """Leaves of the k highest-numbered blocks (``block_<i>``, ``h_<i>``, ``layers_<i>``)."""
    indices = sorted({i for p in paths if (i := block_index(p, block_pattern)) is not None})
    if not indices:
        raise ConfigError(
            f"config.method.partial.block_pattern: {block_pattern!r} finds no numbered block in the "
            "parameter paths"
        )
    if k > len(indices):
        raise ConfigError(
            f"config.method.partial.last_k: {k} blocks asked for, the model has {len(indices)}"
        )
    top = set(indices[-k:])
    return {p for p in paths if block_index(p, block_pattern) in top}


def biases(paths: Sequence[str]) -> set[str]:
    """BitFit: every bias leaf."""
    chosen = {p for p in paths if p.rsplit("/", 1)[-1] == "bias"}
    if not chosen:
        raise ConfigError("config.method.name: 'bitfit' found no bias parameters in this model")
    return chosen
