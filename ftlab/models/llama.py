"""LLaMA-family decoder in Flax linen: RMSNorm, rotary positions, SwiGLU MLP, grouped-query
attention, no biases, an untied ``lm_head`` unless ``tie_word_embeddings``.

Parameter paths (stable; regexes are written against them)::

    embed_tokens/embedding                         (vocab, embed)
    layers_<i>/input_layernorm/scale               (embed,)
    layers_<i>/self_attn/q_proj/kernel             (embed, heads)
    layers_<i>/self_attn/{k_proj,v_proj}/kernel    (embed, kv_heads)
    layers_<i>/self_attn/o_proj/kernel             (heads, embed)
    layers_<i>/post_attention_layernorm/scale      (embed,)
    layers_<i>/mlp/{gate_proj,up_proj}/kernel      (embed, mlp)
    layers_<i>/mlp/down_proj/kernel                (mlp, embed)
    norm/scale                                     (embed,)
    lm_head/kernel                                 (embed, vocab)   untied only
    score/kernel                                   (embed, classes) head="classifier"

With ``scan_layers=True`` the blocks are one ``nn.scan`` module ``layers`` whose leaves
(``layers/self_attn/q_proj/kernel`` (layers, embed, heads), ...) lead with a ``layers`` axis;
``ftlab.models.layers.stack_layers`` / ``unstack_layers`` convert to and from ``layers_<i>``.

Projections get a ``bias`` (last axis named as the kernel's) only when the config sets
``attention_bias`` / ``mlp_bias``. Logical axis names are those of ``ftlab.models.gpt2``:
``vocab``, ``embed``, ``heads``, ``kv_heads``, ``mlp``, ``classes``. The tree from ``init`` is
boxed (``nn.with_logical_partitioning``); use ``flax.linen.meta.unbox`` for plain arrays.

Rotary embeddings follow Hugging Face's ``rotate_half`` layout (the two halves of each head, not
interleaved pairs), with ``rope_theta`` and the ``default``, ``linear`` and ``llama3`` scalings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.models.layers import (
    Decoder,
    activation,
    attention,
    dense,
    hf_get,
    kv_cache,
    layer_stack,
    num_labels,
)

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The LLaMA hyperparameters ftlab uses (names as in ``transformers.LlamaConfig``).

    ``rope_scaling`` is a tuple of ``(key, value)`` pairs (hashable) from the HF
    ``rope_parameters`` / ``rope_scaling`` dict, without ``rope_theta``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    dropout: float = 0.0  # residual and embedding dropout (not in HF LLaMA; 0 matches it)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    num_labels: int = 2

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")

    def __post_init__(self):
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.kv_heads}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        activation(self.hidden_act)

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> LlamaConfig:
        """From a ``transformers.LlamaConfig`` (or its ``config.json`` dict); ``overrides`` win.

        Reads ``rope_parameters`` (transformers 5) or the older ``rope_theta`` + ``rope_scaling``.
        """
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {
            name: hf_get(hf, name, default)
            for name, default in fields.items()
            if name not in ("rope_theta", "rope_scaling", "dropout", "num_labels")
        }
        values["num_key_value_heads"] = hf_get(hf, "num_key_value_heads")
        values["head_dim"] = hf_get(hf, "head_dim")
        values["pad_token_id"] = hf_get(hf, "pad_token_id")
        rope = dict(hf_get(hf, "rope_parameters", {}) or {})
        if not rope:
            rope = dict(hf_get(hf, "rope_scaling", {}) or {})
            rope.setdefault("rope_theta", hf_get(hf, "rope_theta", cls.rope_theta))
        if "type" in rope and "rope_type" not in rope:  # older configs
            rope["rope_type"] = rope.pop("type")
        values["rope_theta"] = float(rope.pop("rope_theta", cls.rope_theta))
        values["rope_scaling"] = tuple(sorted((k, v) for k, v in rope.items() if v is not None))
        values["num_labels"] = num_labels(hf, cls.num_labels)
        values.update(overrides)
        return cls(**values)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,) for the config's rope type, as Hugging Face."""
    dim = cfg.dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv = inv.astype(np.float32)
    params = dict(cfg.rope_scaling)
    if cfg.rope_type == "linear":
        inv = inv / float(params["factor"])
    elif cfg.rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (batch, length, heads, dim) by per-position angles (batch, length, dim)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``, statistics in float32."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * xf.astype(self.dtype)


def _projection(cfg: LlamaConfig, use_bias: bool, module: nn.Module) -> dict[str, Any]:
    """``dense`` keywords for a projection of ``module`` (its dtypes, the config's init)."""
    return {
        "std": cfg.initializer_range,
        "use_bias": use_bias,
        "dtype": module.dtype,
        "param_dtype": module.param_dtype,
    }


class LlamaAttention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    decode: bool = False  # keys (rotated) and values through the ``cache`` collection
    attention_impl: str = "auto"  # ftlab.models.layers.ATTENTION

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        bias: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        h, kvh, d = cfg.num_attention_heads, cfg.kv_heads, cfg.dim
        kw = _projection(cfg, cfg.attention_bias, self)
        q = dense(h * d, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, t, h, d)
        k = dense(kvh * d, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(b, t, kvh, d)
        v = dense(kvh * d, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(b, t, kvh, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = kv_cache(self, k, v, self.decode)
        drop = nn.Dropout(cfg.attention_dropout, deterministic=not train)
        impl = "xla" if (self.decode and self.attention_impl == "splash") else self.attention_impl
        out = attention(q, k, v, bias, 1.0 / math.sqrt(d), drop, impl=impl, causal=True)
        out = out.reshape(b, t, h * d)
        return dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out)


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = _projection(cfg, cfg.mlp_bias, self)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = activation(cfg.hidden_act)(gate) * up
        return dense(cfg.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(h)


class LlamaBlock(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    decode: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        bias: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        train: bool = False,
    ) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        drop = nn.Dropout(cfg.dropout, deterministic=not train)
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        attn = LlamaAttention(cfg, dt, pdt, self.decode, self.attention_impl, name="self_attn")
        x = x + drop(attn(h, bias, cos, sin, train))
        h = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        return x + drop(LlamaMLP(cfg, dt, pdt, name="mlp")(h))


class Llama(Decoder):
    """LLaMA with a causal-LM head (``head="lm"``), a sequence classifier (``"classifier"``),
    or none (``"none"``: final hidden states).

    Inputs as ``ftlab.models.gpt2.GPT2``: token ids or a dict with ``input_ids`` and optional
    ``attention_mask`` / ``position_ids`` (default ``0..length-1`` per row, as Hugging Face).
    ``decode=True`` runs with a key/value cache (``Decoder``): keys are cached after RoPE at
    their absolute positions.
    """

    def backbone(self, input_ids, position_ids, bias, train, decode, prompt=None):  # Decoder
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        angles = jnp.asarray(position_ids, jnp.float32)[..., None] * rope_frequencies(cfg)
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")
            ),
            name="embed_tokens",
        )
        x = embed(input_ids)
        if prompt is not None:  # a soft prompt: before the tokens, positions 0..v-1 (Decoder)
            x = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        block = layer_stack(
            LlamaBlock,
            cfg.num_hidden_layers,
            num_broadcast=3,
            scan=self.scan_layers,
            remat=self.remat,
        )
        if self.scan_layers:
            x, _ = block(cfg, dt, pdt, False, self.attention_impl, name="layers")(
                x, bias, cos, sin, train
            )
        else:
            for i in range(cfg.num_hidden_layers):
                x = block(cfg, dt, pdt, decode, self.attention_impl, name=f"layers_{i}")(
                    x, bias, cos, sin, train
                )
        x = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="norm")(x)
        return x, embed
