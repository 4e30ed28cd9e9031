"""Vision Transformer with an image-classification head (as ``ViTForImageClassification``).

Images are NHWC (Flax's layout; HF's ``pixel_values`` are NCHW: transpose (0, 2, 3, 1)).

Parameter paths (pre-LN layers, one ``layer_<i>`` per encoder layer)::

    embeddings/patch/{kernel (-, -, conv_in, embed), bias (embed,)}   patch x patch conv, stride patch
    embeddings/cls                        (1, 1, embed)
    embeddings/position                   (1, position, embed)   CLS + one per patch
    layer_<i>/layernorm_before/{scale,bias}
    layer_<i>/attention/{query,key,value}/{kernel (embed, heads), bias (heads,)}
    layer_<i>/attention/output/{kernel (heads, embed), bias (embed,)}
    layer_<i>/layernorm_after/{scale,bias}
    layer_<i>/mlp/fc1/{kernel (embed, mlp), bias (mlp,)}
    layer_<i>/mlp/fc2/{kernel (mlp, embed), bias (embed,)}
    layernorm/{scale,bias}
    classifier/{kernel (embed, classes), bias (classes,)}   (when ``num_labels > 0``)

With ``scan_layers=True`` the layers are one ``nn.scan`` module ``layer`` whose leaves lead with a
``layers`` axis (``ftlab.models.layers.stack_layers`` / ``unstack_layers`` convert).

Logical axis names: ``conv_in``, ``embed``, ``position``, ``heads`` (fused heads x head_dim),
``mlp``, ``classes`` (``None`` on the conv's spatial and the singleton axes). ``model.init``
returns them boxed (``flax.linen.meta.unbox`` gives plain arrays).

``__call__`` returns logits on the CLS token when ``num_labels > 0``, else the final-LayerNorm
CLS feature.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.models.images import to_nhwc
from ftlab.models.layers import (
    SelfAttention,
    activation,
    dense,
    hf_fields,
    layer_norm,
    layer_stack,
)


class ViTLayer(nn.Module):
    """Pre-LN layer: x = x + attn(LN(x)); x = x + fc2(act(fc1(LN(x))))."""

    hidden_size: int
    num_heads: int
    mlp_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"  # ftlab.models.layers.ATTENTION

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        drop = nn.Dropout(self.hidden_dropout, deterministic=not train)
        h = layer_norm(self.layer_norm_eps, "embed", name="layernorm_before", **kw)(x)
        h = SelfAttention(
            self.hidden_size,
            self.num_heads,
            self.attention_dropout,
            use_bias=self.qkv_bias,
            attention_impl=self.attention_impl,
            name="attention",
            **kw,
        )(h, train=train)
        x = x + drop(h)
        h = layer_norm(self.layer_norm_eps, "embed", name="layernorm_after", **kw)(x)
        h = MLP(self.hidden_size, self.mlp_size, self.hidden_act, name="mlp", **kw)(h)
        return x + drop(h)


class MLP(nn.Module):
    hidden_size: int
    mlp_size: int
    hidden_act: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(self.mlp_size, ("embed", "mlp"), name="fc1", **kw)(x)
        return dense(self.hidden_size, ("mlp", "embed"), name="fc2", **kw)(
            activation(self.hidden_act)(h)
        )


class PatchEmbeddings(nn.Module):
    """Patch conv, CLS token and learned positions (fixed image size), then dropout."""

    image_size: int
    patch_size: int
    hidden_size: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        p = self.patch_size
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]} (NHWC expected); this ViT takes "
                f"{self.image_size}x{self.image_size}"
            )
        trunc = nn.initializers.truncated_normal(0.02)
        x = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(trunc, (None, None, "conv_in", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="patch",
        )(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.hidden_size)
        num_patches = (self.image_size // p) ** 2
        cls = self.param(
            "cls",
            nn.with_logical_partitioning(trunc, (None, None, "embed")),
            (1, 1, self.hidden_size),
            self.param_dtype,
        )
        pos = self.param(
            "position",
            nn.with_logical_partitioning(trunc, (None, "position", "embed")),
            (1, num_patches + 1, self.hidden_size),
            self.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class ViT(nn.Module):
    """ViT encoder with a linear classifier on the CLS token."""

    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    num_labels: int = 0  # 0: no classifier head
    num_channels: int | None = None  # tells NCHW input (HF's layout) to transpose
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # recompute each layer in the backward pass: True/"full", "dots"
    scan_layers: bool = False  # one nn.scan over the layers (parameters under ``layer``)
    attention_impl: str = "auto"  # ftlab.models.layers.ATTENTION

    @classmethod
    def from_hf_config(cls, config: Any, **overrides: Any) -> ViT:
        """From a ``transformers.ViTConfig`` (or its dict); keyword overrides win."""
        kwargs = hf_fields(
            cls,
            config,
            required=(
                "image_size",
                "patch_size",
                "hidden_size",
                "num_layers",
                "num_heads",
                "mlp_size",
                "num_labels",
            ),
            optional=(
                "hidden_act",
                "layer_norm_eps",
                "qkv_bias",
                "hidden_dropout",
                "attention_dropout",
                "num_channels",
            ),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = PatchEmbeddings(
            self.image_size,
            self.patch_size,
            self.hidden_size,
            self.hidden_dropout,
            name="embeddings",
            **kw,
        )(to_nhwc(images, self.num_channels, model="ViT"), train=train)
        layer = layer_stack(
            ViTLayer,
            self.num_layers,
            num_broadcast=0,
            scan=self.scan_layers,
            remat=self.remat,
            train_keyword=True,
        )
        fields = (
            self.hidden_size,
            self.num_heads,
            self.mlp_size,
            self.hidden_act,
            self.layer_norm_eps,
            self.qkv_bias,
            self.hidden_dropout,
            self.attention_dropout,
        )
        if self.scan_layers:
            x, _ = layer(*fields, name="layer", attention_impl=self.attention_impl, **kw)(x, train)
        else:
            for i in range(self.num_layers):
                x = layer(*fields, name=f"layer_{i}", attention_impl=self.attention_impl, **kw)(
                    x, train
                )
        x = layer_norm(self.layer_norm_eps, "embed", name="layernorm", **kw)(x)[:, 0]
        if not self.num_labels:
            return x
        return dense(self.num_labels, ("embed", "classes"), name="classifier", **kw)(x)
