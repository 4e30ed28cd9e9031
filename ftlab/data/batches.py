"""Deterministic batches: the batch at step ``s`` is a pure function of (seed, s).

So a resumed run sees exactly the batches an uninterrupted one would, with no iterator
state to checkpoint. Each epoch is a fresh permutation; the last partial batch is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ftlab.config import ConfigError
from ftlab.data import Split


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    if batch_size > num_examples:
        raise ConfigError(
            f"config.train.batch_size: {batch_size} is larger than the training split "
            f"({num_examples} examples)"
        )
    return num_examples // batch_size


def nest(flat: dict[str, np.ndarray]) -> dict:
    """A flat batch (``inputs/input_ids`` keys, as ``Split.arrays``) as the step takes it."""
    out: dict = {}
    for key, value in flat.items():
        head, _, rest = key.partition("/")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out


def train_batch(split: Split, step: int, batch_size: int, seed: int, shuffle: bool = True) -> dict:
    """The batch at ``step`` on one host (``ftlab.data.pipeline`` does it per host, prefetched)."""
    per_epoch = steps_per_epoch(len(split), batch_size)
    epoch, i = divmod(step, per_epoch)
    order = (
        np.random.default_rng([seed, epoch]).permutation(len(split))
        if shuffle
        else np.arange(len(split))
    )
    index = order[i * batch_size : (i + 1) * batch_size]
    return nest({k: v[index] for k, v in split.arrays().items()})


def eval_batches(split: Split, batch_size: int) -> Iterator[dict]:
    """The whole split in fixed-shape batches; padding rows carry ``weights`` 0."""
    size = batch_size  # one shape for every split: the eval step compiles once
    arrays = split.arrays()
    own = arrays.pop("weights", None)
    for start in range(0, len(split), size):
        index = np.arange(start, min(start + size, len(split)))
        pad = size - len(index)
        padded = np.concatenate([index, np.zeros(pad, np.int64)])
        batch = {k: v[padded] for k, v in arrays.items()}
        weights = np.concatenate([np.ones(len(index)), np.zeros(pad)]).astype(np.float32)
        batch["weights"] = weights if own is None else weights * own[padded].astype(np.float32)
        yield nest(batch)
