"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") as a combine step.

Each adapted kernel ``W`` (ftlab layout ``(*in, out)``) gets LoRA factors ``a`` (in, r), ``b``
(r, out) and a trainable magnitude ``m`` (out,), one per output unit. The model sees

    W' = m * V / ||V||,   V = W + s * a @ b,

with ``||V||`` the L2 norm of each output unit's column (over every axis but the last) and
treated as a constant in the gradient (``stop_gradient``), exactly as PEFT's
``DoraLinearLayer`` (which ``.detach()``es its ``weight_norm``, DoRA paper section 4.3). PEFT's
forward ``y = (m / ||V||) * (V x) + b`` is ``x @ W' + b``: the bias is not rescaled.

``m`` starts at ``||W||`` (column norms of the kernel as the model sees it), and ``b`` at zero,
so at step 0 ``V = W`` and ``W' = W * (m / ||W||) = W``: the base model.

Memory: unlike LoRA (which runs factored inside the layer and never forms a full-size
delta), DoRA needs every column's norm, so the combine materialises ``V`` and ``W'`` for each
adapted kernel in float32, and both are kept for the backward pass (``dW'/dm`` needs ``V``,
the layer's matmul needs ``W'``). Measured (XLA's temp bytes of a jitted gradient, CPU):
GPT-2 with 4 layers of width 512, q/v/c_fc adapted (6.3M kernel parameters, 24 MiB in
float32): LoRA 5.6 MiB, DoRA 51 MiB, i.e. about two float32 copies of the adapted kernels more
(rematerialising ``V`` with ``jax.checkpoint`` did not lower it). For LLaMA-7B with q/v adapted
(1.07B kernel parameters) that is ~8 GiB on top of the frozen base. PEFT instead keeps DoRA
factored (``y = g * (W x + s B A x) + b``, only ``W + s B A`` transiently for the norm); doing
that here would mean an interceptor beside LoRA's (``ftlab.methods.lora.interceptor``).
Merging for export is ``W'`` itself, exact. LoRA dropout is not supported with DoRA (PEFT then
recomputes ``W x`` on the dropped-out input, which no single ``W'`` expresses);
``build_method`` refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ftlab.methods import lora as lora_lib
from ftlab.methods import quantize as quant_lib


def _float32(kernel: Any) -> jax.Array:
    if quant_lib.is_quantized(kernel):
        return quant_lib.dequantize(kernel, jnp.float32)
    return jnp.asarray(kernel).astype(jnp.float32)


def column_norm(kernel: jax.Array) -> jax.Array:
    """L2 norm of each output unit: over every axis of ``(*in, out)`` but the last."""
    axes = tuple(range(kernel.ndim - 1))
    return jnp.sqrt(jnp.sum(jnp.square(kernel), axis=axes))


def init_magnitude(kernel: Any) -> jax.Array:
    """``m = ||W||`` per output unit (float32), of the kernel as stored (dequantised, or in
    its frozen dtype): the model at step 0 is then exactly the base model."""
    return column_norm(_float32(kernel))


def combine(
    kernel: Any, factors: Mapping[str, jax.Array], magnitude: jax.Array, scale: float
) -> jax.Array:
    """``W' = m * V / stop_gradient(||V||)`` with ``V = W + s * a @ b`` (float32).

    A column whose norm is 0 (``V``'s column is all zeros) stays 0 (PEFT would give NaN)."""
    v = _float32(kernel) + lora_lib.delta(factors, scale)
    norm = jax.lax.stop_gradient(column_norm(v))
    safe = jnp.where(norm > 0, norm, 1.0)
    return v * jnp.where(norm > 0, magnitude / safe, 0.0)


def combine_flat(
    flat_params: Mapping[str, Any],
    factors: Mapping[str, Mapping[str, jax.Array]],
    magnitudes: Mapping[str, jax.Array],
    scale: float,
) -> dict[str, Any]:
    """Flat parameters with every DoRA kernel (``factors``' keys) replaced by ``W'``."""
    out = dict(flat_params)
    for path, f in factors.items():
        out[path] = combine(out[path], f, magnitudes[path], scale)
    return out
