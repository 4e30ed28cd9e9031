"""IA3 (Liu et al. 2022, "(IA)^3": Infused Adapter by Inhibiting and Amplifying Inner
Activations) as a combine step: learned scaling vectors, initialised to 1.

Per targeted kernel ``W`` (ftlab layout ``(*in, out)``) one trainable vector ``l``:

- output side (default): ``y = layer(x) * l``, i.e. ``W' = W * l`` (each output column) and
  ``bias' = bias * l`` (the kernel's sibling ``bias``, if any);
- input side (``method.ia3.feedforward``): ``y = layer(x * l)``, i.e. ``W' = diag(l) W``
  (each input row; for a conv kernel ``(kh, kw, in, out)`` each input channel), bias unchanged,

exactly PEFT's ``IA3Layer`` semantics (``tuners/ia3/layer.py``; its merge is the same
product). The combine materialises ``W'`` (and ``bias'``) for each targeted kernel in float32,
kept for the matmul's backward pass: measured on a 4-layer width-512 GPT-2 with q/v/c_fc
scaled (24 MiB of float32 kernels), XLA temp bytes of the gradient 27 MiB vs LoRA's 5.6 MiB,
about one float32 copy of the scaled kernels (PEFT scales activations instead). Merged equals
unmerged by construction, and with ``l = 1`` the model is exactly the base model.

Trainable leaves: ``{"ia3": {<kernel path>: {"out" | "in": l}}}``; ``"out"`` has the kernel's
output size (and its output axis for sharding), ``"in"`` its input-channel size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ftlab.methods import quantize as quant_lib

SIDES = ("out", "in")


def _float32(kernel: Any) -> jax.Array:
    if quant_lib.is_quantized(kernel):
        return quant_lib.dequantize(kernel, jnp.float32)
    return jnp.asarray(kernel).astype(jnp.float32)


def size(shape: tuple[int, ...], side: str) -> int:
    """Length of ``l`` for a kernel of ``shape`` on ``side``."""
    return int(shape[-1] if side == "out" else shape[-2])


def init_scale(shape: tuple[int, ...], side: str) -> jax.Array:
    return jnp.ones((size(shape, side),), jnp.float32)


def bias_path(kernel_path: str) -> str:
    return kernel_path.rsplit("/", 1)[0] + "/bias"


def combine_flat(
    flat_params: Mapping[str, Any], scales: Mapping[str, tuple[str, jax.Array]]
) -> dict:
    """Flat parameters with each targeted kernel (and, output side, its bias) scaled.

    ``scales``: ``{kernel path: (side, l)}``."""
    out = dict(flat_params)
    for path, (side, vec) in scales.items():
        kernel = _float32(out[path])
        if side == "out":
            out[path] = kernel * vec
            bias = bias_path(path)
            if bias in out:
                out[bias] = jnp.asarray(out[bias]).astype(jnp.float32) * vec
        else:
            out[path] = kernel * vec[:, None]
    return out


def select_targets(
    targets: tuple[str, ...], feedforward: tuple[str, ...], flat: Mapping[str, Any], trained: set
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(IA3 kernel paths, those scaled on the input side) from ``method.ia3.targets`` and
    ``method.ia3.feedforward`` (regexes over kernel paths); errors name the key."""
    from ftlab.config import ConfigError
    from ftlab.methods import select

    kernels = [p for p in sorted(flat) if p.rsplit("/", 1)[-1] == "kernel"]
    if not targets:
        raise ConfigError("config.method.ia3.targets: IA3 needs at least one target regex")
    chosen: list[str] = []
    for pattern in targets:
        hits = select.matching(kernels, pattern)
        if not hits:
            raise ConfigError(
                f"config.method.ia3.targets: regex {pattern!r} matches no kernel; kernels are: "
                f"{', '.join(kernels[:8])}{', ...' if len(kernels) > 8 else ''}"
            )
        chosen += [h for h in hits if h not in chosen]
    inputs: list[str] = []
    for pattern in feedforward:
        hits = select.matching(chosen, pattern)
        if not hits:
            raise ConfigError(
                f"config.method.ia3.feedforward: regex {pattern!r} matches no IA3 target; "
                f"targets are: {', '.join(chosen[:8])}{', ...' if len(chosen) > 8 else ''}"
            )
        inputs += [h for h in hits if h not in inputs]
    for path in chosen:
        if len(flat[path].shape) < 2:
            raise ConfigError(
                f"config.method.ia3.targets: {path!r} has shape {tuple(flat[path].shape)}; IA3 "
                "scales kernels (>= 2 dims)"
            )
        if path in trained:
            raise ConfigError(
                f"config.method: {path!r} is both fully trained (method.trainable) and an IA3 target"
            )
    return tuple(chosen), tuple(p for p in chosen if p in inputs)
