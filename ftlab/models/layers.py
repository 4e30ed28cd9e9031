"""Building blocks shared by ftlab's model families (GPT-2, LLaMA, BERT, ViT, ResNet).

- activations by their Hugging Face names (``activation``);
- reading Hugging Face configs (``hf_get``, ``num_labels``, ``hf_config_dict``, ``hf_fields``);
- logically partitioned layers (``dense``, ``layer_norm``);
- attention: additive masks (``attention_bias`` causal, ``padding_bias``), the decoders'
  grouped-query ``attention`` and the encoders' ``SelfAttention`` module;
- decoder inputs and heads (``unpack_inputs``, ``decoder_inputs``, ``last_token_index``,
  ``classify``, ``decoder_head``);
- the decoders' key/value cache for autoregressive decoding (``kv_cache``, ``Decoder`` with
  ``decode=True``; see ``Decoder``).

Functions that create layers (``dense``, ``layer_norm``, ``classify``, ``decoder_head``) are
called inside a compact ``__call__``: the layers belong to the calling module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# -- activations ----------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation HF calls ``name`` (``gelu`` is the exact erf form, ``gelu_new`` the tanh)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


# -- reading Hugging Face configs ----------------------------------------------------------

# ftlab field -> Hugging Face config key, where the encoders name a field differently.
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_size": "intermediate_size",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}


def hf_get(hf: Any, name: str, default: Any = None) -> Any:
    """A field of a ``transformers`` config object or of its ``config.json`` dict (None: default)."""
    if isinstance(hf, Mapping):
        value = hf.get(name, default)
    else:
        value = getattr(hf, name, default)
    return default if value is None else value


def num_labels(hf: Any, default: int) -> int:
    """``len(id2label)`` when the config has labels, else its ``num_labels``, else ``default``."""
    id2label = hf_get(hf, "id2label")
    if id2label:
        return len(id2label)
    return int(hf_get(hf, "num_labels", default))


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A transformers config (or its dict) as a plain dict that always holds ``num_labels``."""
    if isinstance(config, Mapping):
        c = dict(config)
    else:
        c = config.to_dict()
        c["num_labels"] = getattr(config, "num_labels", None)
    if c.get("num_labels") is None:
        c["num_labels"] = len(c.get("id2label") or {}) or 2
    return c


def hf_fields(
    cls: type, config: Any, required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, Any]:
    """Keyword arguments of ``cls`` read from a HF config (keys renamed by ``HF_NAMES``).

    A ``required`` field missing from the config is a ``KeyError``; a missing ``optional`` one
    takes the field's default in ``cls``.
    """
    c = hf_config_dict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs = {name: c[HF_NAMES.get(name, name)] for name in required}
    kwargs.update({name: c.get(HF_NAMES.get(name, name), defaults[name]) for name in optional})
    return kwargs


# -- layers -------------------------------------------------------------------------------


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype: Any,
    param_dtype: Any,
    name: str,
    std: float = 0.02,
    use_bias: bool = True,
) -> nn.Dense:
    """``nn.Dense`` with a normal(std) kernel and zero bias, both logically partitioned."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


def layer_norm(
    eps: float, axis: str = "embed", *, dtype: Any, param_dtype: Any, name: str
) -> nn.LayerNorm:
    """``nn.LayerNorm`` with unit scale and zero bias on the logical ``axis``."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis,)),
        name=name,
    )


# -- attention ------------------------------------------------------------------------------


def _key_mask(attention_mask: jax.Array) -> jax.Array:
    """(batch, k_len) 1/0 mask -> boolean (batch, 1, 1, k_len)."""
    return jnp.asarray(attention_mask).astype(bool)[:, None, None, :]


def _additive(allowed: jax.Array, dtype: Any) -> jax.Array:
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """(batch, k_len) 1/0 mask -> additive (batch, 1, 1, k_len) bias (float32 min where 0)."""
    return _additive(_key_mask(attention_mask), jnp.float32)


def attention_bias(
    attention_mask: jax.Array | None, batch: int, length: int, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Additive (batch, 1, query, key) bias: causal, plus padding keys masked out (mask 0)."""
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & _key_mask(attention_mask)
    return _additive(jnp.broadcast_to(allowed, (batch, 1, length, length)), dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    scale: float,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Multi-head / grouped-query attention, softmax in float32.

    ``q``: (batch, length, heads, dim); ``k``, ``v``: (batch, keys, kv_heads, dim) with
    ``heads`` a multiple of ``kv_heads`` (query head ``h`` reads kv head ``h // group``);
    ``bias``: (batch, 1, length, keys). ``keys`` is ``length`` except when decoding with a
    cache (the cache's length). Returns (batch, length, heads, dim).
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} key/value heads")
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * scale
    scores = scores + bias[:, :, None].astype(jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout is not None:
        weights = dropout(weights)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
    return out.reshape(b, t, h, d)


def kv_cache(
    module: nn.Module, k: jax.Array, v: jax.Array, decode: bool
) -> tuple[jax.Array, jax.Array]:
    """Keys and values to attend to, through ``module``'s ``cache`` collection when ``decode``.

    The usual linen pattern: the first ``decode`` call (``init``, with inputs of the maximum
    length) creates ``cached_key`` / ``cached_value`` (batch, max_length, kv_heads, dim) and
    ``cache_index`` (0) and attends over its own inputs; later calls (with ``mutable=["cache"]``)
    write ``k``, ``v`` at ``cache_index``, advance it by their length and return the whole cache
    (unfilled slots are masked by the ``Decoder``'s bias). Writing past the end is not checked
    (``dynamic_update_slice`` clamps); the caller sizes the cache.
    """
    if not decode:
        return k, v
    initialized = module.has_variable("cache", "cached_key")
    cached_k = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
        return k, v
    i = index.value
    start = (0, i, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(
        cached_k.value, k.astype(cached_k.value.dtype), start
    )
    cached_v.value = jax.lax.dynamic_update_slice(
        cached_v.value, v.astype(cached_v.value.dtype), start
    )
    index.value = i + k.shape[1]
    return cached_k.value, cached_v.value


class SelfAttention(nn.Module):
    """Multi-head attention with ``query``/``key``/``value``/``output`` dense projections.

    ``bias`` is additive, broadcastable to (batch, heads, q_len, k_len); softmax runs in float32.
    """

    hidden_size: int
    num_heads: int
    attention_dropout: float = 0.0
    use_bias: bool = True
    stddev: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None = None, *, train: bool = False):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "std": self.stddev}

        def heads(name: str) -> jax.Array:
            y = dense(
                self.hidden_size, ("embed", "heads"), use_bias=self.use_bias, name=name, **kw
            )(x)
            return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
        scores = scores.astype(jnp.float32)
        if bias is not None:
            scores = scores + bias.astype(jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(self.attention_dropout, deterministic=not train)(probs)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*x.shape[:-1], self.hidden_size)
        return dense(self.hidden_size, ("heads", "embed"), name="output", **kw)(out)


# -- decoder inputs and heads ---------------------------------------------------------------

HEADS = ("lm", "classifier", "none")


def unpack_inputs(
    inputs: Any, attention_mask: jax.Array | None, position_ids: jax.Array | None
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """``input_ids`` or a batch dict ``{"input_ids", "attention_mask"?, "position_ids"?}``."""
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise KeyError(f"decoder inputs need 'input_ids'; got keys {sorted(inputs)}")
        attention_mask = inputs.get("attention_mask", attention_mask)
        position_ids = inputs.get("position_ids", position_ids)
        inputs = inputs["input_ids"]
    input_ids = jnp.asarray(inputs)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    return input_ids, attention_mask, position_ids


def decoder_inputs(
    model: str,
    head: str,
    inputs: Any,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Check ``head``, unpack the inputs, and default ``position_ids`` to ``0..length-1``."""
    if head not in HEADS:
        raise ValueError(f"{model} head {head!r}: choose one of {', '.join(HEADS)}")
    input_ids, attention_mask, position_ids = unpack_inputs(inputs, attention_mask, position_ids)
    if position_ids is None:
        b, t = input_ids.shape
        position_ids = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    return input_ids, attention_mask, position_ids


def last_token_index(
    input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None
) -> jax.Array:
    """Per row, the position the sequence-classification head reads.

    As Hugging Face: the rightmost token that is not ``pad_token_id`` when the config has one;
    otherwise the rightmost position the attention mask keeps; otherwise the last position.
    """
    b, t = input_ids.shape
    positions = jnp.arange(t)[None, :]
    if pad_token_id is not None:
        keep = input_ids != pad_token_id
    elif attention_mask is not None:
        keep = jnp.asarray(attention_mask).astype(bool)
    else:
        return jnp.full((b,), t - 1, jnp.int32)
    return jnp.argmax(jnp.where(keep, positions, -1), axis=-1).astype(jnp.int32)


def classify(
    x: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    pad_token_id: int | None,
    num_labels: int,
    std: float,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
) -> jax.Array:
    """The ``score`` head (no bias, as Hugging Face) on each row's last non-pad token."""
    index = last_token_index(input_ids, attention_mask, pad_token_id)
    pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    score = _head(num_labels, "classes", "score", std, dtype, param_dtype)
    return score(pooled).astype(jnp.float32)


def _head(features: int, axis: str, name: str, std: float, dtype, param_dtype) -> nn.Dense:
    """A bias-free output projection from ``embed`` to the logical ``axis``."""
    return dense(
        features,
        ("embed", axis),
        std=std,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def decoder_head(
    x: jax.Array,
    head: str,
    embed: nn.Embed,
    *,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    config: Any,
    vocab_size: int,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
) -> jax.Array:
    """Final hidden states ``x`` through a decoder's head: ``"none"`` returns them,
    ``"classifier"`` is ``classify``, ``"lm"`` is ``embed.attend`` when ``config`` ties the word
    embeddings, else a bias-free ``lm_head``. ``config`` gives ``pad_token_id``,
    ``num_labels``, ``initializer_range`` and ``tie_word_embeddings``; logits are float32."""
    if head == "none":
        return x
    std = config.initializer_range
    if head == "classifier":
        return classify(
            x,
            input_ids,
            attention_mask,
            config.pad_token_id,
            config.num_labels,
            std,
            dtype,
            param_dtype,
        )
    if config.tie_word_embeddings:
        return embed.attend(x).astype(jnp.float32)  # x @ embedding.T
    lm_head = _head(vocab_size, "vocab", "lm_head", std, dtype, param_dtype)
    return lm_head(x).astype(jnp.float32)


class Decoder(nn.Module):
    """What the decoder families share: fields, input handling, the decoding cache and the head.

    A subclass defines ``backbone(input_ids, position_ids, bias, train, decode)`` returning the
    final hidden states and the token ``nn.Embed`` (tied LM heads attend with it); ``bias`` is
    the additive attention bias (batch, 1, length, keys) and ``decode`` is passed to each
    attention layer's ``kv_cache``. ``__call__`` takes token ids (batch, length) or a batch
    dict holding ``input_ids`` and optionally ``attention_mask`` (1 = token, 0 = padding) and
    ``position_ids`` (default ``0..length-1`` per row), and applies ``decoder_head``. Logits are
    float32; ``dtype`` is the compute dtype, parameters are kept in ``param_dtype``; ``remat``
    recomputes each block in the backward pass.

    Decoding with a key/value cache (``decode=True``), the usual linen pattern:

    - ``model.init(rng, jnp.zeros((batch, max_length), int), decode=True)["cache"]`` (or
      ``ftlab.eval.generate.init_cache``) creates the ``cache`` collection: per attention layer
      ``cached_key``, ``cached_value``, ``cache_index``, and here ``cache_index``, ``key_mask``
      (batch, max_length: which cache slots hold real tokens) and ``positions`` (batch,: real
      tokens seen per row). All zeros: an empty cache.
    - ``model.apply({"params": p, "cache": c}, ids, attention_mask=m, decode=True,
      mutable=["cache"])`` appends a chunk (the prompt, then one token a step) and returns
      ``(logits, {"cache": c'})``. Queries attend causally to the filled part of the cache
      whose ``attention_mask`` was 1. Default positions continue each row's count of real
      tokens (``cumsum(mask) - 1`` over the prompt, as Hugging Face for left padding), so a
      left-padded row gets the positions it would have unpadded; explicit ``position_ids``
      win. All rows share one cache index: pad prompts on the left.

    With ``decode=False`` (the default) nothing of this runs.
    """

    config: Any
    head: str = "lm"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def backbone(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        bias: jax.Array,
        train: bool,
        decode: bool,
    ) -> tuple[jax.Array, nn.Embed]:
        raise NotImplementedError

    def _decode_bias(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, position_ids: Any
    ) -> tuple[jax.Array, jax.Array]:
        """Positions and the additive bias of a decoding chunk; advances the cache counters."""
        b, t = input_ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else _bool(attention_mask)
        initialized = self.has_variable("cache", "key_mask")
        key_mask = self.variable("cache", "key_mask", jnp.zeros, (b, t), bool)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        seen = self.variable("cache", "positions", jnp.zeros, (b,), jnp.int32)
        if position_ids is None:
            counts = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
            position_ids = jnp.maximum(seen.value[:, None] + counts, 0)
        if not initialized:  # the init call: plain causal attention over its inputs
            return position_ids, attention_bias(attention_mask, b, t, self.dtype)
        i = index.value
        keys = jax.lax.dynamic_update_slice(key_mask.value, mask, (0, i))
        key_mask.value = keys
        index.value = i + t
        seen.value = seen.value + mask.sum(axis=1, dtype=jnp.int32)
        slot = jnp.arange(keys.shape[1])[None, :]
        causal = slot <= i + jnp.arange(t)[:, None]  # (t, keys)
        allowed = keys[:, None, None, :] & causal[None, None]
        return position_ids, _additive(allowed, self.dtype)

    @nn.compact
    def __call__(
        self,
        inputs: Any,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        train: bool = False,
        decode: bool = False,
    ) -> jax.Array:
        explicit = position_ids is not None or (
            isinstance(inputs, Mapping) and inputs.get("position_ids") is not None
        )
        input_ids, attention_mask, position_ids = decoder_inputs(
            type(self).__name__, self.head, inputs, attention_mask, position_ids
        )
        b, t = input_ids.shape
        if decode:
            position_ids, bias = self._decode_bias(
                input_ids, attention_mask, position_ids if explicit else None
            )
        else:
            bias = attention_bias(attention_mask, b, t, self.dtype)
        x, embed = self.backbone(input_ids, position_ids, bias, train, decode)
        return decoder_head(
            x,
            self.head,
            embed,
            input_ids=input_ids,
            attention_mask=attention_mask,
            config=self.config,
            vocab_size=self.config.vocab_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(bool)
