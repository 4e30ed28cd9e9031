"""LoRA as a pure transform: low-rank ``a @ b`` factors beside chosen kernels.

Training uses the factored form inside each adapted layer (``y = layer(x) + s * (drop(x) @ a) @ b``)
through Flax method interception, so no full-size weight delta is formed; ``merge`` folds the
factors into the kernels (``W + s * a @ b``) for export and for checking the two forms agree.
``b`` starts at zero, so the adapted model at step 0 is exactly the base model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.config import ConfigError
from ftlab.methods import quantize


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def check_target(path: str, shape: tuple[int, ...], rank: int) -> None:
    """A target must be a kernel (>= 2 dims) whose fan-in and fan-out both allow the rank."""
    if len(shape) < 2:
        raise ConfigError(
            f"config.method.lora.targets: {path!r} has shape {shape}; LoRA adapts kernels (>= 2 dims)"
        )
    fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
    if rank > min(fan_in, fan_out):
        raise ConfigError(
            f"config.method.lora.rank: rank {rank} is larger than the dimensions of {path!r} "
            f"(shape {shape}: fan-in {fan_in}, fan-out {fan_out})"
        )


def init_factors(rng: jax.Array, shape: tuple[int, ...], rank: int) -> dict[str, jax.Array]:
    """``a`` ~ U(+-1/sqrt(fan_in)) of shape (*kernel.shape[:-1], r) (as PEFT), ``b`` = 0 of (r, out)."""
    fan_in = int(np.prod(shape[:-1]))
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(rng, (*shape[:-1], rank), jnp.float32, -bound, bound)
    return {"a": a, "b": jnp.zeros((rank, shape[-1]), jnp.float32)}


def delta(factors: Mapping[str, jax.Array], scale: float) -> jax.Array:
    """The full-size update ``s * a @ b`` in the kernel's shape."""
    return scale * jnp.tensordot(factors["a"], factors["b"], axes=1)


def merge(flat_params: Mapping[str, Any], flat_lora: Mapping[str, Mapping], scale: float) -> dict:
    """Flat parameters with every adapted kernel replaced by ``W + s * a @ b``."""
    merged = dict(flat_params)
    for path, factors in flat_lora.items():
        kernel = merged[path]
        merged[path] = (kernel + delta(factors, scale)).astype(kernel.dtype)
    return merged


def interceptor(
    factors_by_module: Mapping[str, Mapping[str, jax.Array]],
    spec: LoraSpec,
    dropout_rng: jax.Array | None,
):
    """A Flax method interceptor adding the low-rank branch to each adapted layer's output.

    Layers whose kernel is stored quantised (``ftlab.methods.quantize.QuantizedArray``: QLoRA,
    ``method.quantize``) run on it dequantised inside the call (``quantize.call``), adapted
    or not; with no factors at all the interceptor does only that.
    ``factors_by_module`` maps a module path ("block_2") to its kernel's ``{"a", "b"}``;
    dropout on the branch input is applied when ``dropout_rng`` is given (training).
    """
    order = {name: i for i, name in enumerate(sorted(factors_by_module))}

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        module = context.module
        name = "/".join(module.path)
        # a kernel stored quantised (QLoRA's frozen base) is dequantised inside the call
        kernel = quantize.quantized_kernel(module)
        if kernel is not None:
            y = quantize.call(module, kernel, args, kwargs)
        if name not in factors_by_module:
            return y if kernel is not None else next_fun(*args, **kwargs)
        factors = factors_by_module[name]
        if kernel is None:
            y = next_fun(*args, **kwargs)
        x = args[0]
        if dropout_rng is not None and spec.dropout > 0:
            keep = jax.random.bernoulli(
                jax.random.fold_in(dropout_rng, order[name]),
                1.0 - spec.dropout,
                x.shape,
            )
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
        a, b = factors["a"].astype(y.dtype), factors["b"].astype(y.dtype)
        if isinstance(module, nn.Dense):
            low = jnp.asarray(x, y.dtype) @ a
        elif isinstance(module, nn.Conv):
            # The same convolution (strides, padding, dilation) with r output channels, as PEFT.
            conv = module.clone(parent=None, features=a.shape[-1], use_bias=False)
            low = conv.apply({"params": {"kernel": factors["a"]}}, x)
        else:
            raise TypeError(
                f"LoRA on {name!r}: layer type {type(module).__name__} is not supported "
                "(nn.Dense and nn.Conv are)"
            )
        return y + (spec.scale * (low @ b)).astype(y.dtype)

    return intercept
