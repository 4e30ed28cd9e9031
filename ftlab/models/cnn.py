"""Small convolutional and MLP classifiers for the bundled-data experiments.

Blocks are named ``block_<i>`` and the classifier ``head`` so that method regexes
(``head/``, last-k blocks) read the same as on the large models.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ftlab.models.images import to_nhwc


class SmallCNN(nn.Module):
    """Conv blocks (3x3, ReLU), a 2x2 average pool after the last, dense blocks, a head."""

    num_classes: int
    features: Sequence[int] = (16, 32)
    hidden: Sequence[int] = (64,)
    pool: bool = True
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        if x.ndim == 3:  # (batch, height, width) grey images
            x = x[..., None]
        x = to_nhwc(x, model="SmallCNN")  # an NCHW batch of 1, 3 or 4 channels is transposed
        x = x.astype(self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Conv(width, (3, 3), dtype=self.dtype, name=f"block_{i}")(x)
            x = nn.relu(x)
            if self.pool and i == len(self.features) - 1:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for j, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, name=f"block_{len(self.features) + j}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


class MLP(nn.Module):
    """Dense blocks with ReLU and a linear head: tabular classification or regression."""

    num_outputs: int
    hidden: Sequence[int] = (64, 64)
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"block_{i}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(x)
