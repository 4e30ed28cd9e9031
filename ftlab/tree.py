"""Parameter trees as flat ``{"block_0/conv/kernel": array}`` maps.

Methods select leaves by path regex, so every module speaks of leaves by their
slash-joined path; these helpers convert between that view and Flax's nested dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

Tree = Mapping[str, Any]


def flatten(tree: Tree) -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}`` (an empty tree gives ``{}``)."""
    return traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/") if flat else {}


def count(tree: Tree) -> int:
    """Number of scalars in a tree of arrays (or of ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in flatten(tree).values()))


def jsonable(value: Any) -> Any:
    """Nested dicts and lists with numpy scalars and arrays as plain JSON values: keys as
    strings, NaN/inf as None (JSON has neither), anything else unknown as its text."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
