"""Image layout: ftlab's vision models take NHWC (batch, height, width, channels).

Hugging Face image processors and PyTorch give NCHW; ``to_nhwc`` recognises such a batch by
its channel count and transposes it, and refuses a batch whose layout it cannot tell, with a
message that says which layout is expected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Channel counts an NCHW batch is recognised by when the model does not know its own.
COMMON_CHANNELS = (1, 3, 4)


def to_nhwc(images: jax.Array, channels: int | None = None, *, model: str = "model") -> jax.Array:
    """``images`` as NHWC: an NCHW batch (channel axis 1 holding ``channels``, or one of
    ``COMMON_CHANNELS`` when ``channels`` is None, and the last axis not) is transposed."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(
            f"{model} takes images as (batch, height, width, channels) (NHWC); got shape "
            f"{tuple(images.shape)}"
        )
    known = (channels,) if channels else COMMON_CHANNELS
    if images.shape[-1] in known:
        return images
    if images.shape[1] in known:  # (batch, channels, height, width): PyTorch / HF layout
        return images.transpose(0, 2, 3, 1)
    if channels:
        raise ValueError(
            f"{model} takes NHWC images with {channels} channels (or NCHW, transposed); got "
            f"shape {tuple(images.shape)}, whose axis 1 and last axis are not {channels}"
        )
    return images  # more channels than usual (features): taken as NHWC
