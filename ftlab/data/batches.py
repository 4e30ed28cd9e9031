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


def train_batch(split: Split, step: int, batch_size: int, seed: int, shuffle: bool = True) -> dict:
    per_epoch = steps_per_epoch(len(split), batch_size)
    epoch, i = divmod(step, per_epoch)
    order = (
        np.random.default_rng([seed, epoch]).permutation(len(split))
        if shuffle
        else np.arange(len(split))
    )
    index = order[i * batch_size : (i + 1) * batch_size]
    return {"inputs": split.inputs[index], "labels": split.labels[index]}


def eval_batches(split: Split, batch_size: int) -> Iterator[dict]:
    """The whole split in fixed-shape batches; padding rows carry ``weights`` 0."""
    size = batch_size  # one shape for every split: the eval step compiles once
    for start in range(0, len(split), size):
        index = np.arange(start, min(start + size, len(split)))
        pad = size - len(index)
        padded = np.concatenate([index, np.zeros(pad, np.int64)])
        yield {
            "inputs": split.inputs[padded],
            "labels": split.labels[padded],
            "weights": np.concatenate([np.ones(len(index)), np.zeros(pad)]).astype(np.float32),
        }
