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
