"""ResNet v1.5 with BatchNorm and a classification head (as ``ResNetForImageClassification``).

v1.5 as in HF and torchvision: a strided bottleneck block downsamples in its 3x3 conv. Images are
NHWC (HF's ``pixel_values`` are NCHW: transpose (0, 2, 3, 1)). Convolutions pad ``k // 2`` on
every side, as PyTorch, not ``SAME`` (which pads a stride-2 conv asymmetrically).

Parameter paths (blocks numbered across the whole network, so ``partial.last_k`` counts blocks;
``stage_<s>/`` groups them)::

    stem_conv/kernel                                  (-, -, conv_in, conv_out)   7x7, stride 2
    stem_norm/{scale,bias}                            (conv_out,)
    stage_<s>/block_<k>/conv_<j>/kernel               (-, -, conv_in, conv_out)   j = 0, 1(, 2)
    stage_<s>/block_<k>/norm_<j>/{scale,bias}         (conv_out,)
    stage_<s>/block_<k>/shortcut_conv/kernel          (first block of a stage, when its shape changes)
    stage_<s>/block_<k>/shortcut_norm/{scale,bias}
    classifier/{kernel (embed, classes), bias (classes,)}   (when ``num_labels > 0``)

The ``batch_stats`` collection holds each norm's ``mean`` and ``var`` at the same paths. With
``train=False`` the norms use those running averages; with ``train=True`` they use batch
statistics and update ``batch_stats`` (apply with ``mutable=["batch_stats"]``). Flax's update
uses the biased batch variance where PyTorch uses the unbiased one; evaluation is identical.

Logical axis names: ``conv_in``, ``conv_out``, ``embed``, ``classes`` (``None`` on spatial axes).
``model.init`` returns them boxed (``flax.linen.meta.unbox`` gives plain arrays).

``__call__`` returns logits when ``num_labels > 0``, else the globally average-pooled features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.models.images import to_nhwc
from ftlab.models.layers import activation, hf_fields

CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, as HF


class _Layers:
    """Conv and BatchNorm factories sharing a module's dtype and training mode."""

    def __init__(self, module: nn.Module, train: bool):
        self.m, self.train = module, train

    def conv(self, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
        pad = kernel // 2
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.m.dtype,
            param_dtype=self.m.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                CONV_INIT, (None, None, "conv_in", "conv_out")
            ),
            name=name,
        )

    def norm(self, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not self.train,
            momentum=0.9,  # PyTorch momentum 0.1
            epsilon=self.m.norm_eps,
            dtype=self.m.dtype,
            param_dtype=self.m.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            name=name,
        )


class Block(nn.Module):
    """Bottleneck (1x1 reduce, 3x3 with the stride, 1x1 expand) or basic (two 3x3) block."""

    features: int
    stride: int = 1
    bottleneck: bool = True
    reduction: int = 4
    downsample_in_bottleneck: bool = False  # stride on the first 1x1 (v1) instead of the 3x3
    hidden_act: str = "relu"
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        act = activation(self.hidden_act)
        lay = _Layers(self, train)
        if self.bottleneck:
            mid = self.features // self.reduction
            first = self.stride if self.downsample_in_bottleneck else 1
            convs = [
                (mid, 1, first),
                (mid, 3, self.stride // first),
                (self.features, 1, 1),
            ]
        else:
            convs = [(self.features, 3, self.stride), (self.features, 3, 1)]
        h = x
        for j, (features, kernel, stride) in enumerate(convs):
            h = lay.norm(f"norm_{j}")(lay.conv(features, kernel, stride, f"conv_{j}")(h))
            if j < len(convs) - 1:
                h = act(h)
        if x.shape[-1] != self.features or self.stride != 1:
            x = lay.conv(self.features, 1, self.stride, "shortcut_conv")(x)
            x = lay.norm("shortcut_norm")(x)
        return act(h + x)


class Stage(nn.Module):
    """Blocks of one resolution; the first one carries the stride."""

    features: int
    depth: int
    stride: int
    first_index: int  # global number of this stage's first block
    bottleneck: bool = True
    downsample_in_bottleneck: bool = False
    hidden_act: str = "relu"
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        for i in range(self.depth):
            x = Block(
                self.features,
                self.stride if i == 0 else 1,
                bottleneck=self.bottleneck,
                downsample_in_bottleneck=self.downsample_in_bottleneck,
                hidden_act=self.hidden_act,
                norm_eps=self.norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block_{self.first_index + i}",
            )(x, train=train)
        return x


class ResNet(nn.Module):
    """ResNet (ResNet-50 layout by default) with a linear classifier on pooled features."""

    depths: Sequence[int] = (3, 4, 6, 3)
    hidden_sizes: Sequence[int] = (256, 512, 1024, 2048)
    embedding_size: int = 64
    layer_type: str = "bottleneck"  # or "basic" (ResNet-18/34)
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0  # before the classifier (HF has none)
    num_labels: int = 0  # 0: no classifier head
    num_channels: int | None = None  # tells NCHW input (HF's layout) to transpose
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_hf_config(cls, config: Any, **overrides: Any) -> ResNet:
        """From a ``transformers.ResNetConfig`` (or its dict); keyword overrides win."""
        kwargs = hf_fields(
            cls,
            config,
            required=("depths", "hidden_sizes", "embedding_size", "num_labels"),
            optional=(
                "layer_type",
                "hidden_act",
                "downsample_in_first_stage",
                "downsample_in_bottleneck",
                "num_channels",
            ),
        )
        for name in ("depths", "hidden_sizes"):
            kwargs[name] = tuple(kwargs[name])
        kwargs.update(overrides)
        return cls(**kwargs)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if self.layer_type not in ("bottleneck", "basic"):
            raise ValueError(f"layer_type {self.layer_type!r}: choose 'bottleneck' or 'basic'")
        if len(self.depths) != len(self.hidden_sizes):
            raise ValueError(f"depths {self.depths} and hidden_sizes {self.hidden_sizes} differ")
        act = activation(self.hidden_act)
        lay = _Layers(self, train)
        x = to_nhwc(images, self.num_channels, model="ResNet").astype(self.dtype)
        x = act(lay.norm("stem_norm")(lay.conv(self.embedding_size, 7, 2, "stem_conv")(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = {
            "bottleneck": self.layer_type == "bottleneck",
            "downsample_in_bottleneck": self.downsample_in_bottleneck,
            "hidden_act": self.hidden_act,
            "norm_eps": self.norm_eps,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        first = 0
        for s, (depth, features) in enumerate(zip(self.depths, self.hidden_sizes)):
            stride = 2 if (s > 0 or self.downsample_in_first_stage) else 1
            x = Stage(features, depth, stride, first, name=f"stage_{s}", **block)(x, train=train)
            first += depth
        x = jnp.mean(x, axis=(1, 2))
        if not self.num_labels:
            return x
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(
            self.num_labels,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
            name="classifier",
        )(x)
