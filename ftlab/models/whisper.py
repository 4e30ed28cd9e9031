"""Whisper (``WhisperForConditionalGeneration``) in Flax linen: a log-mel encoder and a text
decoder with cross attention, as Hugging Face's ``modeling_whisper``.

- **Encoder**: two ``Conv1d`` (kernel 3, padding 1; the second with stride 2) with exact GELU,
  fixed sinusoidal positions (stored as a parameter, as Hugging Face's checkpoints hold them,
  under ``stop_gradient``: never trained, as HF's ``requires_grad=False``),
  pre-LN blocks (self attention, GELU MLP), a final LayerNorm. It takes exactly
  ``2 * max_source_positions`` mel frames (3,000 = 30 s for the real models).
- **Decoder**: token embeddings + learned positions, pre-LN blocks of causal self attention,
  cross attention to the encoder's output and an MLP, a final LayerNorm, and the output
  projection tied to the token embeddings (``proj_out``: an own kernel only when
  ``tie_word_embeddings`` is false).
- Attention: ``q_proj``, ``v_proj`` and ``out_proj`` have biases, ``k_proj`` none (as HF).

Parameter paths (stable; LoRA and partial-training regexes are written against them)::

    encoder/conv1/{kernel (3, mels, embed), bias}
    encoder/conv2/{kernel (3, embed, embed), bias}
    encoder/embed_positions/embedding                 (source positions, embed)  sinusoids
    encoder/layers_<i>/self_attn/{q_proj,k_proj,v_proj}/kernel   (embed, heads)
    encoder/layers_<i>/self_attn/out_proj/kernel      (heads, embed)
    encoder/layers_<i>/{self_attn_layer_norm,final_layer_norm}/{scale,bias}
    encoder/layers_<i>/fc1/kernel (embed, mlp), fc2/kernel (mlp, embed)
    encoder/layer_norm/{scale,bias}
    decoder/embed_tokens/embedding                    (vocab, embed)
    decoder/embed_positions/embedding                 (target positions, embed)
    decoder/layers_<i>/{self_attn,encoder_attn}/{q_proj,k_proj,v_proj,out_proj}/...
    decoder/layers_<i>/{self_attn_layer_norm,encoder_attn_layer_norm,final_layer_norm}/...
    decoder/layers_<i>/{fc1,fc2}/...
    decoder/layer_norm/{scale,bias}
    proj_out/kernel                                   (embed, vocab)  untied only

Logical axes: ``vocab``, ``positions``, ``embed``, ``heads``, ``mlp`` (conv kernels: ``embed``
on the output channels, the window and the mel bins replicated). So ``(self_attn|encoder_attn)/
(q_proj|v_proj)/kernel`` is LoRA on the query and value projections of every attention.

Calling: ``model.apply(variables, batch)`` with a dict holding ``input_features`` (batch, mels,
frames) as the feature extractor gives them, ``decoder_input_ids`` (batch, length) and optionally
``decoder_attention_mask``; or ``model.apply(variables, input_features, decoder_input_ids)``.
Logits are float32; ``dtype`` is the compute dtype, parameters stay in ``param_dtype``;
``remat`` recomputes each block in the backward pass. ``head="none"`` returns the decoder's
final hidden states (``WhisperModel``).

``scan_layers=True`` runs each stack as one ``nn.scan`` module ``layers`` (``encoder/layers/...``
and ``decoder/layers/...``, every leaf with a leading layer axis named ``layers``): one compiled
block per stack; ``scan_params`` / ``unscan_params`` convert the per-layer tree (the one import,
export and LoRA regexes use) both ways. Decoding with the cache needs the unrolled layers (a
scanned model refuses ``decode=True``): ``unscan_params`` and a ``scan_layers=False`` model.

Decoding with a cache (``decode=True``; greedy, beam search and sampling from the forced
prefix: ``ftlab.eval.generate.generate_seq2seq(model, params, None, input_features=...,
decoder_start_token_id=prefix, num_beams=...)``, as for T5):

- ``model.apply(v, features, method=Whisper.encode)``: the encoder's output, once;
- ``init_cache(model, batch, max_length, encoder_length)``: an empty ``cache`` collection;
- ``model.apply({"params": p, "cache": c}, None, ids, encoder_hidden_states=enc, decode=True,
  mutable=["cache"])``: the first chunk (the forced prefix) computes each layer's cross-attention
  keys and values from ``enc`` and stores them; later calls pass ``encoder_hidden_states=None``
  and one token each: self-attention keys/values grow by the chunk, cross ones are read back.
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

from ftlab.models.layers import (
    _without_scan,
    activation,
    attention,
    attention_bias,
    dense,
    hf_get,
    kv_cache,
    layer_norm,
    layer_stack,
    stack_layers,
    unstack_layers,
)

LOGICAL_AXES = ("vocab", "positions", "embed", "heads", "mlp")
HEADS = ("lm", "none")


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """The Whisper hyperparameters ftlab uses (names as in ``transformers.WhisperConfig``)."""

    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_attention_heads: int = 6
    decoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500
    max_target_positions: int = 448
    activation_function: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default; HF has no field for it
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 50257
    eos_token_id: int | None = 50257
    decoder_start_token_id: int = 50258

    @property
    def num_frames(self) -> int:
        """Mel frames the encoder takes (the conv stem halves them): 3,000 for 30 s."""
        return 2 * self.max_source_positions

    def __post_init__(self):
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {side} heads {heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even (sinusoidal positions)")
        activation(self.activation_function)

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> WhisperConfig:
        """From a ``transformers.WhisperConfig`` (or its ``config.json`` dict); ``overrides`` win."""
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {name: hf_get(hf, name, default) for name, default in fields.items()}
        for name in ("pad_token_id", "eos_token_id"):
            values[name] = hf_get(hf, name)
        # (``scale_embedding``: HF's Whisper computes embed_scale but never applies it)
        values.update(overrides)
        return cls(**values)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's encoder positions: ``[sin(t * f), cos(t * f)]`` over ``channels // 2``
    log-spaced frequencies (Hugging Face's ``sinusoids``), float32 (length, channels)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _ln(cfg: WhisperConfig, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return layer_norm(cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


class WhisperAttention(nn.Module):
    """Multi-head attention, HF's ``WhisperAttention``: ``k_proj`` without bias.

    ``kind``: ``"self"`` (keys from ``x``; with ``decode`` they grow in the ``cache``),
    ``"cross"`` (keys from ``context``, the encoder's output; with ``decode`` they are computed
    by the call that passes ``context`` and read back from the cache by calls that pass None).
    """

    config: WhisperConfig
    num_heads: int
    kind: str = "self"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, context, bias, train: bool = False):
        cfg = self.config
        b, t, d = x.shape
        hd = d // self.num_heads
        kw = {"std": cfg.init_std, "dtype": self.dtype, "param_dtype": self.param_dtype}

        def proj(name: str, inputs, bias_: bool = True):
            y = dense(d, ("embed", "heads"), use_bias=bias_, name=name, **kw)(inputs)
            return y.reshape(*y.shape[:-1], self.num_heads, hd)

        q = proj("q_proj", x)
        if self.kind == "self":
            k, v = kv_cache(self, proj("k_proj", x, False), proj("v_proj", x), self.decode)
        else:
            k, v = self._cross(proj, context)
        drop = nn.Dropout(cfg.attention_dropout, deterministic=not train)
        impl = self.attention_impl
        if impl == "splash" and (self.decode or self.kind == "cross"):
            impl = "xla"
        out = attention(q, k, v, bias, hd**-0.5, drop, impl=impl, causal=self.kind == "self")
        out = out.reshape(b, t, d)
        return dense(d, ("heads", "embed"), name="out_proj", **kw)(out)

    def _cross(self, proj, context):
        if not self.decode:
            return proj("k_proj", context, False), proj("v_proj", context)
        if context is not None:  # init or the prefill call: compute once, keep
            k, v = proj("k_proj", context, False), proj("v_proj", context)
            ck = self.variable("cache", "cross_key", jnp.zeros, k.shape, k.dtype)
            cv = self.variable("cache", "cross_value", jnp.zeros, v.shape, v.dtype)
            ck.value, cv.value = k, v
            return k, v
        if not self.has_variable("cache", "cross_key"):
            raise ValueError("cross attention: the first decode call needs encoder_hidden_states")
        return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")


def _mlp(cfg: WhisperConfig, ffn_dim: int, x, train: bool, dtype, param_dtype):
    """``fc1`` -> activation -> dropout -> ``fc2``, created in the calling (compact) layer."""
    kw = {"std": cfg.init_std, "dtype": dtype, "param_dtype": param_dtype}
    h = dense(ffn_dim, ("embed", "mlp"), name="fc1", **kw)(x)
    h = activation(cfg.activation_function)(h)
    h = nn.Dropout(cfg.activation_dropout, deterministic=not train)(h)
    return dense(cfg.d_model, ("mlp", "embed"), name="fc2", **kw)(h)


class WhisperEncoderLayer(nn.Module):
    config: WhisperConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        drop = nn.Dropout(cfg.dropout, deterministic=not train)
        h = _ln(cfg, dt, pdt, "self_attn_layer_norm")(x)
        attn = WhisperAttention(
            cfg, cfg.encoder_attention_heads, "self", dt, pdt, False, self.attention_impl,
            name="self_attn",
        )  # fmt: skip
        x = x + drop(attn(h, None, None, train))
        h = _ln(cfg, dt, pdt, "final_layer_norm")(x)
        h = _mlp(cfg, cfg.encoder_ffn_dim, h, train, dt, pdt)
        return x + drop(h)


class WhisperDecoderLayer(nn.Module):
    config: WhisperConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, context, bias, train: bool = False):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        drop = nn.Dropout(cfg.dropout, deterministic=not train)
        heads, impl = cfg.decoder_attention_heads, self.attention_impl
        h = _ln(cfg, dt, pdt, "self_attn_layer_norm")(x)
        attn = WhisperAttention(cfg, heads, "self", dt, pdt, self.decode, impl, name="self_attn")
        x = x + drop(attn(h, None, bias, train))
        h = _ln(cfg, dt, pdt, "encoder_attn_layer_norm")(x)
        cross = WhisperAttention(
            cfg, heads, "cross", dt, pdt, self.decode, impl, name="encoder_attn"
        )
        x = x + drop(cross(h, context, None, train))
        h = _ln(cfg, dt, pdt, "final_layer_norm")(x)
        h = _mlp(cfg, cfg.decoder_ffn_dim, h, train, dt, pdt)
        return x + drop(h)


class WhisperEncoder(nn.Module):
    config: WhisperConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    attention_impl: str = "auto"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_features: jax.Array, train: bool = False) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        x = jnp.asarray(input_features)
        if x.ndim != 3 or x.shape[1] != cfg.num_mel_bins or x.shape[2] != cfg.num_frames:
            raise ValueError(
                f"Whisper expects input_features of shape (batch, {cfg.num_mel_bins} mel bins, "
                f"{cfg.num_frames} frames) (2 x max_source_positions {cfg.max_source_positions}: "
                f"pad or truncate to the window), got {x.shape}"
            )
        x = x.transpose(0, 2, 1)  # (batch, frames, mels)
        gelu = activation(cfg.activation_function)
        for name, stride in (("conv1", 1), ("conv2", 2)):
            conv = nn.Conv(
                cfg.d_model,
                kernel_size=(3,),
                strides=(stride,),
                padding=((1, 1),),
                dtype=dt,
                param_dtype=pdt,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std), (None, None, "embed")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                name=name,
            )
            x = gelu(conv(x))
        positions = self.param(
            "embed_positions",
            nn.with_logical_partitioning(
                lambda key, shape, dtype: jnp.asarray(sinusoids(*shape), dtype),
                ("positions", "embed"),
            ),
            (cfg.max_source_positions, cfg.d_model),
            pdt,
        )
        # fixed, as HF keeps them (requires_grad=False): no gradient reaches the table
        x = x + jax.lax.stop_gradient(jnp.asarray(positions, dt))[None]
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        block = layer_stack(
            WhisperEncoderLayer,
            cfg.encoder_layers,
            num_broadcast=0,
            scan=self.scan_layers,
            remat=self.remat,
        )
        if self.scan_layers:
            x, _ = block(cfg, dt, pdt, self.attention_impl, name="layers")(x, train)
        else:
            for i in range(cfg.encoder_layers):
                x = block(cfg, dt, pdt, self.attention_impl, name=f"layers_{i}")(x, train)
        return _ln(cfg, dt, pdt, "layer_norm")(x)


class _Embedding(nn.Module):
    """``params/embedding`` under this module's name: lets ``WhisperDecoder`` keep HF's
    ``embed_positions`` a plain table looked up by position."""

    num: int
    features: int
    axes: tuple[str, str]
    std: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.std), self.axes),
            (self.num, self.features),
            self.param_dtype,
        )


class WhisperDecoder(nn.Module):
    config: WhisperConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    attention_impl: str = "auto"
    scan_layers: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        context: jax.Array | None,
        attention_mask: jax.Array | None = None,
        train: bool = False,
        decode: bool = False,
    ) -> tuple[jax.Array, nn.Embed]:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        b, t = input_ids.shape
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("vocab", "embed")
            ),
            name="embed_tokens",
        )
        table = _Embedding(
            cfg.max_target_positions, cfg.d_model, ("positions", "embed"), cfg.init_std, pdt,
            name="embed_positions",
        )()  # fmt: skip
        if decode:
            start, bias = self._decode_bias(attention_mask, b, t)
        else:
            if t > cfg.max_target_positions:
                raise ValueError(
                    f"decoder length {t} exceeds max_target_positions {cfg.max_target_positions}"
                )
            start, bias = 0, attention_bias(attention_mask, b, t, dt)
        positions = jax.lax.dynamic_slice_in_dim(jnp.asarray(table, dt), start, t, axis=0)
        x = embed(input_ids) + positions[None]
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        block = layer_stack(
            WhisperDecoderLayer,
            cfg.decoder_layers,
            num_broadcast=2,
            scan=self.scan_layers,
            remat=self.remat,
        )
        if self.scan_layers:  # (decode is refused by Whisper before the cache is touched)
            layer = block(cfg, dt, pdt, False, self.attention_impl, name="layers")
            x, _ = layer(x, context, bias, train)
        else:
            for i in range(cfg.decoder_layers):
                layer = block(cfg, dt, pdt, decode, self.attention_impl, name=f"layers_{i}")
                x = layer(x, context, bias, train)
        return _ln(cfg, dt, pdt, "layer_norm")(x), embed

    def _decode_bias(self, mask: jax.Array | None, b: int, t: int) -> tuple[jax.Array, jax.Array]:
        """The chunk's first position and its additive bias: causal over the cache's filled
        slots, without the slots whose mask was 0 (``key_mask``). Advances the counters."""
        allowed_keys = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
        initialized = self.has_variable("cache", "cache_index")
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        key_mask = self.variable("cache", "key_mask", jnp.zeros, (b, t), bool)
        if not initialized:  # init: plain causal attention over its own inputs
            return 0, attention_bias(mask, b, t, self.dtype)
        i = index.value
        keys = jax.lax.dynamic_update_slice(key_mask.value, allowed_keys, (0, i))
        key_mask.value, index.value = keys, i + t
        slot = jnp.arange(keys.shape[1])[None, :]
        allowed = keys[:, None, None, :] & (slot <= i + jnp.arange(t)[:, None])[None, None]
        return i, jnp.where(allowed, 0.0, jnp.finfo(self.dtype).min).astype(self.dtype)


class Whisper(nn.Module):
    """``WhisperForConditionalGeneration`` (``head="lm"``) or ``WhisperModel`` (``"none"``:
    the decoder's final hidden states). See the module docstring for inputs and decoding."""

    config: WhisperConfig
    head: str = "lm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    scan_layers: bool = False
    attention_impl: str = "auto"

    def setup(self):
        if self.head not in HEADS:
            raise ValueError(f"Whisper head {self.head!r}: choose one of {', '.join(HEADS)}")
        kw = {
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
            "remat": self.remat,
            "attention_impl": self.attention_impl,
            "scan_layers": self.scan_layers,
        }
        self.encoder = WhisperEncoder(self.config, **kw)
        self.decoder = WhisperDecoder(self.config, **kw)
        if self.head == "lm" and not self.config.tie_word_embeddings:
            self.proj_out = dense(
                self.config.vocab_size,
                ("embed", "vocab"),
                std=self.config.init_std,
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="proj_out",
            )

    def encode(
        self, input_features: jax.Array, attention_mask: Any = None, *, train: bool = False
    ) -> jax.Array:
        """The encoder's output (batch, max_source_positions, d_model); ``attention_mask`` is
        ignored, as in ``__call__`` (the signature T5's ``encode`` has)."""
        return self.encoder(input_features, train)

    def decode_logits(
        self,
        decoder_input_ids: jax.Array,
        encoder_hidden_states: jax.Array | None,
        decoder_attention_mask: jax.Array | None = None,
        train: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        _without_scan(self, decode)
        ids = jnp.asarray(decoder_input_ids)
        if ids.ndim != 2:
            raise ValueError(f"decoder_input_ids must be (batch, length), got {ids.shape}")
        x, embed = self.decoder(ids, encoder_hidden_states, decoder_attention_mask, train, decode)
        if self.head == "none":
            return x
        if self.config.tie_word_embeddings:
            return embed.attend(x).astype(jnp.float32)
        return self.proj_out(x).astype(jnp.float32)

    def __call__(
        self,
        inputs: Any,
        attention_mask: jax.Array | None = None,
        decoder_input_ids: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        *,
        encoder_hidden_states: jax.Array | None = None,
        train: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        """Logits (batch, decoder length, vocab). ``inputs``: ``input_features`` (batch, mels,
        frames) or a batch dict (``input_features``, ``decoder_input_ids``,
        ``decoder_attention_mask``); ``attention_mask`` (of the features) is accepted and
        ignored, as Hugging Face's Whisper ignores it. A decoding step (``decode=True`` without
        ``decoder_input_ids`` or ``encoder_hidden_states``) takes the next decoder chunk as
        ``inputs`` and its mask as ``attention_mask``, as T5 and the decoders are called."""
        features = inputs
        if isinstance(inputs, Mapping):
            features = inputs.get("input_features")
            decoder_input_ids = inputs.get("decoder_input_ids", decoder_input_ids)
            decoder_attention_mask = inputs.get("decoder_attention_mask", decoder_attention_mask)
        elif decode and decoder_input_ids is None and encoder_hidden_states is None:
            return self.decode_logits(inputs, None, attention_mask, train, decode)
        if decoder_input_ids is None:
            raise ValueError("Whisper needs decoder_input_ids")
        if encoder_hidden_states is None:
            if features is None:
                raise ValueError("Whisper needs input_features (or encoder_hidden_states)")
            encoder_hidden_states = self.encode(features, train=train)
        return self.decode_logits(
            decoder_input_ids, encoder_hidden_states, decoder_attention_mask, train, decode
        )


STACKS = ("encoder", "decoder")


def scan_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Per-layer Whisper parameters (``encoder/layers_<i>``, ``decoder/layers_<i>``: what
    import, export and method regexes use) -> the tree of ``Whisper(scan_layers=True)``
    (``encoder/layers``, ``decoder/layers`` with a leading layer axis). Plain arrays only."""
    out = dict(params)
    for stack in STACKS:
        out[stack] = stack_layers(params[stack], "layers")
    return out


def unscan_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``scan_params``: a scanned tree back to per-layer subtrees (a stack
    already per-layer is left as it is)."""
    out = dict(params)
    for stack in STACKS:
        if isinstance(params.get(stack), Mapping) and "layers" in params[stack]:
            out[stack] = unstack_layers(params[stack], "layers")
    return out


# -- decoding with the cache ----------------------------------------------------------------


def init_cache(model: Whisper, batch: int, max_length: int) -> dict:
    """An empty ``cache`` for ``batch`` rows of up to ``max_length`` decoder tokens (shapes from
    ``jax.eval_shape``; zeros)."""
    cfg = model.config

    def init():
        ids = jnp.zeros((batch, max_length), jnp.int32)
        enc = jnp.zeros((batch, cfg.max_source_positions, cfg.d_model), model.dtype)
        variables = model.init(
            jax.random.key(0), None, decoder_input_ids=ids, encoder_hidden_states=enc, decode=True
        )
        return variables["cache"]

    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))
