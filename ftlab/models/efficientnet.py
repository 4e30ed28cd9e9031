"""EfficientNet with BatchNorm and a classification head (as ``EfficientNetForImageClassification``).

Built from Hugging Face's ``EfficientNetConfig`` fields and following transformers'
``modeling_efficientnet.py`` exactly (Tan and Le 2019, as HF ported it):

- widths are ``round_filters(c)`` of the base widths (scaled by ``width_coefficient``, rounded to
  a multiple of ``depth_divisor``, never more than 10% below), repeats ``ceil(depth_coefficient
  * repeats)``; the top conv has ``round_filters(1280)`` channels (HF's ``hidden_dim``);
- the stem pads the right and bottom by one and runs a 3x3 stride-2 conv without padding;
- an MBConv block: 1x1 expansion conv + BN + swish (when ``expand_ratio != 1``), depthwise
  ``k x k`` conv + BN + swish, squeeze-excitation (global mean, 1x1 conv to ``max(1,
  int(in_dim * squeeze_expansion_ratio))`` channels of the block's *input* width, swish, 1x1
  conv back, sigmoid gate), 1x1 projection + BN. A stride-2 depthwise conv pads ``k//2 - 1``
  before and ``k//2`` after each spatial axis, or ``k//2`` on both sides when the block's index
  is in ``depthwise_padding``, then runs unpadded; a stride-1 one pads as PyTorch's ``"same"``;
- as HF, only blocks after the first of each stage add the residual, and only there the
  "drop connect" applies to the projected branch before the sum, at rate
  ``drop_connect_rate * block_index / num_blocks`` (0 in the first block). HF implements it as
  ``nn.Dropout`` (elementwise); ``drop_connect_mode="per_example"`` drops the whole branch per
  example instead (stochastic depth as in the paper and timm). Either is active only with
  ``train=True`` (a ``dropout`` rng), the identity in evaluation;
- global mean (or max, ``pooling_type``) pooling, dropout ``dropout_rate``, linear classifier.

BatchNorm: HF passes ``batch_norm_momentum`` (0.99) to PyTorch, whose momentum weighs the *new*
batch, so Flax's momentum (the weight of the running average) is ``1 - batch_norm_momentum``
(0.01: running statistics follow the latest batches closely, as in HF training); HF's expansion
BN keeps PyTorch's default 0.1 (Flax 0.9). Epsilon ``batch_norm_eps`` (1e-3). The ``batch_stats``
collection holds each norm's ``mean`` and ``var`` at the norm's path; with ``train=True`` norms
use batch statistics and update ``batch_stats`` (apply with ``mutable=["batch_stats"]``); Flax
updates with the biased batch variance where PyTorch uses the unbiased one.

Images are NHWC (HF's NCHW ``pixel_values`` are recognised and transposed, ``to_nhwc``).

Parameter paths (blocks numbered across the network, as HF's ``encoder.blocks.<i>``, so
``partial.last_k`` counts blocks)::

    stem_conv/kernel (3, 3, conv_in, conv_out)        stem_norm/{scale,bias}
    block_<i>/expand_conv/kernel (1, 1, in, in*e)     block_<i>/expand_norm/{scale,bias}
    block_<i>/depthwise_conv/kernel (k, k, 1, C)      block_<i>/depthwise_norm/{scale,bias}
    block_<i>/se_reduce/{kernel (1, 1, C, se), bias}  block_<i>/se_expand/{kernel, bias}
    block_<i>/project_conv/kernel (1, 1, C, out)      block_<i>/project_norm/{scale,bias}
    top_conv/kernel (1, 1, out, hidden)               top_norm/{scale,bias}
    classifier/{kernel (embed, classes), bias}        (when ``num_labels > 0``)

Logical axis names ``conv_in``, ``conv_out``, ``embed``, ``classes`` (``None`` on spatial axes
and a depthwise kernel's input axis). ``remat`` recomputes each block in the backward pass.

``scan_layers=True``: within a stage the blocks after the first have identical shapes; where
there are two or more (``EfficientNet.scanned_runs``) they run as one ``nn.scan`` (one compiled
block) named ``blocks_<first>_to_<last>``, whose ``params`` *and* ``batch_stats`` leaves lead
with an axis over those blocks (logical name ``layers``). Each block still draws its own
drop-connect mask (a ``dropout`` key per block) at its own rate (the rates are a scanned
input), so masks differ from the unrolled model's but follow the same law; in evaluation the
two compute the same function. ``stack_blocks(tree, model)`` / ``unstack_blocks(tree)``
convert each collection to and from the per-block tree that Hugging Face import and export
use (bit for bit).

``__call__`` returns logits when ``num_labels > 0``, else the pooled features.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.models.images import to_nhwc
from ftlab.models.layers import SCAN_AXIS, activation, hf_fields, layer_stack, remat_policy

CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # kaiming, as timm
DEPTHWISE_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # fan k*k
DROP_CONNECT_MODES = ("elementwise", "per_example")
TOP_BASE_WIDTH = 1280  # HF: round_filters(config, 1280) channels in the top conv


def round_filters(channels: int, width_coefficient: float, depth_divisor: int) -> int:
    """transformers' ``round_filters``: ``channels * width_coefficient`` to a multiple of
    ``depth_divisor`` (nearest, at least the divisor), one divisor more when that fell over 10%."""
    scaled = channels * width_coefficient
    new = max(depth_divisor, int(scaled + depth_divisor / 2) // depth_divisor * depth_divisor)
    if new < 0.9 * scaled:
        new += depth_divisor
    return int(new)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
    """transformers' ``round_repeats``: ``ceil(depth_coefficient * repeats)``."""
    return math.ceil(depth_coefficient * repeats)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block as HF's ``EfficientNetEncoder`` lays it out."""

    index: int
    in_dim: int
    out_dim: int
    stride: int
    kernel_size: int
    expand_ratio: int
    drop_rate: float
    residual: bool  # not the first block of its stage (HF's ``not id_skip``, stride 1)
    adjust_padding: bool  # stride 2: pad k//2-1 before, k//2 after (else k//2 both sides)


def _conv(module: nn.Module, features: int, kernel: int, name: str, **kw: Any) -> nn.Conv:
    axes = (None, None, None, "conv_out") if kw.get("feature_group_count") else None
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=kw.pop("strides", (1, 1)),
        padding=kw.pop("padding", "VALID"),
        use_bias=kw.pop("use_bias", False),
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            DEPTHWISE_INIT if axes else CONV_INIT, axes or (None, None, "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
        **kw,
    )


def _norm(module: nn.Module, train: bool, name: str, momentum: float) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=module.norm_eps,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


class MBConv(nn.Module):
    """Expansion, depthwise conv, squeeze-excitation, projection (+ drop connect and residual)."""

    in_dim: int
    out_dim: int
    stride: int = 1
    kernel_size: int = 3
    expand_ratio: int = 1
    drop_rate: float = 0.0
    residual: bool = False
    adjust_padding: bool = True
    squeeze_expansion_ratio: float = 0.25
    hidden_act: str = "swish"
    norm_eps: float = 1e-3
    norm_momentum: float = 0.01  # Flax's (1 - PyTorch's 0.99)
    drop_connect_mode: str = "elementwise"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, drop_rate: jax.Array | None = None
    ) -> jax.Array:
        """``drop_rate`` (a traced scalar, the scanned stack's per-block rate) replaces the
        field's rate; the field then only says whether any block of the stack drops (> 0)."""
        act = activation(self.hidden_act)
        h = x
        width = self.in_dim * self.expand_ratio
        if self.expand_ratio != 1:
            h = _conv(self, width, 1, "expand_conv")(h)
            h = act(_norm(self, train, "expand_norm", 0.9)(h))  # HF: PyTorch's default 0.1
        k = self.kernel_size
        if self.stride == 2:
            lo, hi = (k // 2 - 1, k // 2) if self.adjust_padding else (k // 2, k // 2)
        elif self.stride == 1:  # PyTorch "same"
            lo, hi = (k - 1) // 2, k - 1 - (k - 1) // 2
        else:
            raise ValueError(f"EfficientNet block stride {self.stride}: HF's blocks take 1 or 2")
        h = _conv(
            self,
            width,
            k,
            "depthwise_conv",
            strides=(self.stride, self.stride),
            padding=((lo, hi), (lo, hi)),
            feature_group_count=width,
        )(h)
        h = act(_norm(self, train, "depthwise_norm", self.norm_momentum)(h))
        squeeze = max(1, int(self.in_dim * self.squeeze_expansion_ratio))
        s = jnp.mean(h, axis=(1, 2), keepdims=True)
        s = act(_conv(self, squeeze, 1, "se_reduce", use_bias=True)(s))
        s = nn.sigmoid(_conv(self, width, 1, "se_expand", use_bias=True)(s))
        h = h * s
        h = _conv(self, self.out_dim, 1, "project_conv")(h)
        h = _norm(self, train, "project_norm", self.norm_momentum)(h)
        if not self.residual:
            return h
        if self.drop_connect_mode not in DROP_CONNECT_MODES:
            raise ValueError(
                f"drop_connect_mode {self.drop_connect_mode!r}: choose one of "
                f"{', '.join(DROP_CONNECT_MODES)}"
            )
        per_example = self.drop_connect_mode == "per_example"
        if drop_rate is None:
            h = nn.Dropout(
                self.drop_rate,
                broadcast_dims=(1, 2, 3) if per_example else (),
                deterministic=not train,
            )(h)
        elif train and self.drop_rate > 0:  # nn.Dropout's computation at a traced rate
            keep = 1.0 - jnp.asarray(drop_rate, jnp.float32)
            shape = (h.shape[0], 1, 1, 1) if per_example else h.shape
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
            h = jnp.where(mask, h / jnp.maximum(keep, 1e-6).astype(h.dtype), 0).astype(h.dtype)
        return h + x


class ScannedMBConv(MBConv):
    """``MBConv`` as ``nn.scan``'s body: ``(x, drop_rate, train) -> (y, None)`` with the
    block's drop-connect rate a scanned input (``train`` positional, static under remat)."""

    def __call__(self, x: jax.Array, drop_rate: jax.Array, train: bool):  # type: ignore[override]
        return MBConv.__call__(self, x, train=train, drop_rate=drop_rate), None


def mbconv_scan(length: int, remat: bool | str = False) -> type[nn.Module]:
    """One ``nn.scan`` over ``length`` identical ``MBConv`` blocks (a stage's blocks after its
    first), called ``(x, drop_rates (length,), train)`` and returning ``(x, None)``: ``params``
    and ``batch_stats`` leaves stacked on a leading axis (logical name ``SCAN_AXIS``), a fresh
    ``dropout`` key per block, each block's drop-connect rate read from ``drop_rates``."""
    recompute, policy = remat_policy(remat)
    body: Any = ScannedMBConv
    if recompute:  # self, x, drop_rate, train: train is static
        body = nn.remat(body, static_argnums=(3,), prevent_cse=False, policy=policy)
    return nn.scan(
        body,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: SCAN_AXIS},
    )


SCANNED = re.compile(r"blocks_(\d+)_to_(\d+)")  # a scanned run of blocks: blocks_<first>_to_<last>


def scanned_name(first: int, last: int) -> str:
    return f"blocks_{first}_to_{last}"


def _stack(leaves: Sequence[Any]) -> Any:
    numpy = all(isinstance(v, np.ndarray | np.generic) for v in leaves)
    return (np if numpy else jnp).stack(leaves)


def stack_blocks(tree: Mapping[str, Any], model: EfficientNet) -> dict[str, Any]:
    """One collection of an unrolled EfficientNet (``params`` or ``batch_stats``: plain
    arrays, ``block_<i>`` subtrees) -> the tree ``model.clone(scan_layers=True)`` takes: each
    run ``model.scanned_runs()`` names becomes one ``blocks_<first>_to_<last>`` subtree whose
    leaves are the blocks' leaves stacked on a new leading axis (numpy stays numpy). Other
    entries are kept as they are."""
    out = dict(tree)
    for run in model.scanned_runs():
        names = [f"block_{i}" for i in run]
        missing = [n for n in names if n not in tree]
        if missing:
            raise ValueError(f"stack_blocks: the tree has no {', '.join(missing)}")
        structure = jax.tree.structure(tree[names[0]])
        for n in names[1:]:
            if jax.tree.structure(tree[n]) != structure:
                raise ValueError(f"stack_blocks: {n} and {names[0]} hold different leaves")
            shapes = jax.tree.map(np.shape, (tree[n], tree[names[0]]))
            if shapes[0] != shapes[1]:
                raise ValueError(f"stack_blocks: {n} and {names[0]} differ in shape")
        out[scanned_name(run[0], run[-1])] = jax.tree.map(
            lambda *xs: _stack(xs), *(tree[n] for n in names)
        )
        for n in names:
            del out[n]
    return out


def unstack_blocks(tree: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``stack_blocks``: every ``blocks_<first>_to_<last>`` subtree (leading
    axis ``last - first + 1``) -> ``block_<first> .. block_<last>`` (the paths Hugging Face's
    names and method regexes use). Needs no model: the names say which blocks."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        m = SCANNED.fullmatch(key)
        if not m:
            out[key] = value
            continue
        first, last = int(m.group(1)), int(m.group(2))
        sizes = {np.shape(v)[0] if np.ndim(v) else None for v in jax.tree.leaves(value)}
        if sizes != {last - first + 1}:
            raise ValueError(
                f"unstack_blocks: leaves of {key!r} lead with {sorted(map(str, sizes))}, not "
                f"{last - first + 1} blocks"
            )
        for j, i in enumerate(range(first, last + 1)):
            if f"block_{i}" in tree:
                raise ValueError(f"unstack_blocks: the tree holds both {key!r} and block_{i}")
            out[f"block_{i}"] = jax.tree.map(lambda v, j=j: v[j], value)
    return out


class EfficientNet(nn.Module):
    """EfficientNet (HF's ``EfficientNetConfig`` defaults, the B7 layout, unless told)."""

    width_coefficient: float = 2.0
    depth_coefficient: float = 3.1
    depth_divisor: int = 8
    kernel_sizes: Sequence[int] = (3, 3, 5, 3, 5, 5, 3)
    in_channels: Sequence[int] = (32, 16, 24, 40, 80, 112, 192)
    out_channels: Sequence[int] = (16, 24, 40, 80, 112, 192, 320)
    depthwise_padding: Sequence[int] = ()
    strides: Sequence[int] = (1, 2, 2, 2, 1, 2, 1)
    num_block_repeats: Sequence[int] = (1, 2, 2, 3, 3, 4, 1)
    expand_ratios: Sequence[int] = (1, 6, 6, 6, 6, 6, 6)
    squeeze_expansion_ratio: float = 0.25
    hidden_act: str = "swish"
    hidden_dim: int | None = None  # HF's hidden_dim; must be round_filters(1280) (None: that)
    pooling_type: str = "mean"
    batch_norm_eps: float = 1e-3
    batch_norm_momentum: float = 0.99  # PyTorch's convention, as HF's config
    dropout_rate: float = 0.5  # before the classifier
    drop_connect_rate: float = 0.2
    drop_connect_mode: str = "elementwise"  # HF's; "per_example": stochastic depth
    image_size: Any = 600  # HF's config field (no effect on the network)
    num_labels: int = 0  # 0: no classifier head
    num_channels: int | None = None  # tells NCHW input (HF's layout) to transpose
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # recompute each block in the backward pass: True/"full", "dots"
    scan_layers: bool = False  # each stage's 2+ blocks after its first as one nn.scan

    HF_FIELDS = (
        "width_coefficient",
        "depth_coefficient",
        "depth_divisor",
        "kernel_sizes",
        "in_channels",
        "out_channels",
        "depthwise_padding",
        "strides",
        "num_block_repeats",
        "expand_ratios",
        "squeeze_expansion_ratio",
        "hidden_act",
        "hidden_dim",
        "pooling_type",
        "batch_norm_eps",
        "batch_norm_momentum",
        "dropout_rate",
        "drop_connect_rate",
        "image_size",
        "num_channels",
    )
    LIST_FIELDS = (
        "kernel_sizes",
        "in_channels",
        "out_channels",
        "depthwise_padding",
        "strides",
        "num_block_repeats",
        "expand_ratios",
    )

    @classmethod
    def from_hf_config(cls, config: Any, **overrides: Any) -> EfficientNet:
        """From a ``transformers.EfficientNetConfig`` (or its dict); keyword overrides win."""
        kwargs = hf_fields(cls, config, required=("num_labels",), optional=cls.HF_FIELDS)
        kwargs.update(overrides)
        for name in cls.LIST_FIELDS:
            kwargs[name] = tuple(kwargs[name])
        if isinstance(kwargs.get("image_size"), list):
            kwargs["image_size"] = tuple(kwargs["image_size"])
        return cls(**kwargs)

    def round_filters(self, channels: int) -> int:
        return round_filters(channels, self.width_coefficient, self.depth_divisor)

    @property
    def top_dim(self) -> int:
        """Channels of the top conv and of the pooled features (HF's ``hidden_dim``)."""
        return self.round_filters(TOP_BASE_WIDTH)

    def blocks(self) -> list[BlockSpec]:
        """Every block in order, as HF's ``EfficientNetEncoder.__init__`` builds them."""
        lists = [getattr(self, n) for n in self.LIST_FIELDS if n != "depthwise_padding"]
        if len({len(x) for x in lists}) != 1:
            raise ValueError(
                "EfficientNet stage lists differ in length: "
                + ", ".join(
                    f"{n}={len(getattr(self, n))}"
                    for n in self.LIST_FIELDS
                    if n != "depthwise_padding"
                )
            )
        repeats = [round_repeats(n, self.depth_coefficient) for n in self.num_block_repeats]
        total = sum(repeats)
        out: list[BlockSpec] = []
        for s, n in enumerate(repeats):
            in_dim = self.round_filters(self.in_channels[s])
            out_dim = self.round_filters(self.out_channels[s])
            for j in range(n):
                i = len(out)
                out.append(
                    BlockSpec(
                        index=i,
                        in_dim=in_dim if j == 0 else out_dim,
                        out_dim=out_dim,
                        stride=self.strides[s] if j == 0 else 1,
                        kernel_size=self.kernel_sizes[s],
                        expand_ratio=self.expand_ratios[s],
                        drop_rate=self.drop_connect_rate * i / total,
                        residual=j > 0,
                        adjust_padding=i not in self.depthwise_padding,
                    )
                )
        return out

    def scanned_runs(self) -> list[list[int]]:
        """The block indices ``scan_layers=True`` runs as one ``nn.scan`` each: per stage, the
        blocks after the first (same shapes, all residual) when there are two or more."""
        runs: list[list[int]] = []
        stage: list[int] = []
        for spec in self.blocks() + [None]:
            if spec is None or not spec.residual:  # a stage's first block (or the end)
                if len(stage) >= 2:
                    runs.append(stage)
                stage = []
            else:
                stage.append(spec.index)
        return runs

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        top = self.top_dim
        if self.hidden_dim is not None and self.hidden_dim != top:
            raise ValueError(
                f"EfficientNet hidden_dim={self.hidden_dim}, but the top conv has "
                f"round_filters(1280)={top} channels at width_coefficient="
                f"{self.width_coefficient}; Hugging Face needs them equal (set hidden_dim={top})"
            )
        if self.pooling_type not in ("mean", "max"):
            raise ValueError(f"pooling_type {self.pooling_type!r}: choose 'mean' or 'max'")
        act = activation(self.hidden_act)
        norm_momentum = 1.0 - self.batch_norm_momentum
        x = to_nhwc(images, self.num_channels, model="EfficientNet").astype(self.dtype)
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # HF's ZeroPad2d((0, 1, 0, 1))
        x = _conv(self, self.round_filters(32), 3, "stem_conv", strides=(2, 2))(x)
        x = act(_norm(self, train, "stem_norm", norm_momentum)(x))
        block = layer_stack(
            MBConv, 1, num_broadcast=0, scan=False, remat=self.remat, train_keyword=True
        )
        shared = {
            "squeeze_expansion_ratio": self.squeeze_expansion_ratio,
            "hidden_act": self.hidden_act,
            "norm_eps": self.batch_norm_eps,
            "norm_momentum": norm_momentum,
            "drop_connect_mode": self.drop_connect_mode,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        specs = self.blocks()
        runs = {run[0]: run for run in self.scanned_runs()} if self.scan_layers else {}
        i = 0
        while i < len(specs):
            spec = specs[i]
            fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "index"}
            run = runs.get(spec.index)
            if run is None:
                x = block(**fields, **shared, name=f"block_{spec.index}")(x, train)
                i += 1
                continue
            rates = [specs[j].drop_rate for j in run]
            fields["drop_rate"] = max(rates)  # static: whether any block drops
            x, _ = mbconv_scan(len(run), self.remat)(
                **fields, **shared, name=scanned_name(run[0], run[-1])
            )(x, jnp.asarray(rates, jnp.float32), train)
            i += len(run)
        x = _conv(self, top, 1, "top_conv")(x)
        x = act(_norm(self, train, "top_norm", norm_momentum)(x))
        x = jnp.mean(x, axis=(1, 2)) if self.pooling_type == "mean" else jnp.max(x, axis=(1, 2))
        if not self.num_labels:
            return x
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
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

    @property
    def norm_eps(self) -> float:  # what _norm reads on the top-level module
        return self.batch_norm_eps
