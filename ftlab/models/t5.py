"""T5 (``T5ForConditionalGeneration``) in Flax linen: an encoder-decoder with T5's RMSNorm (no
mean subtraction, no bias), relative position buckets instead of position embeddings, no
``1/sqrt(d)`` attention scaling (T5 folds it into the initialisation), cross attention, a
``DenseReluDense`` (v1.0, ``feed_forward_proj="relu"``) or gated-GELU (v1.1 / flan-t5,
``"gated-gelu"``) feed-forward, and an LM head tied to the shared embedding (v1.0) or untied.

Parameter paths (stable; LoRA and partial-training regexes are written against them)::

    shared/embedding                                        (vocab, embed)
    {encoder,decoder}/relative_attention_bias/embedding     (buckets, heads)
    {encoder,decoder}/block_<i>/self_attn/{q,k,v}/kernel    (embed, heads)
    {encoder,decoder}/block_<i>/self_attn/o/kernel          (heads, embed)
    {encoder,decoder}/block_<i>/self_attn_norm/scale        (embed,)
    decoder/block_<i>/cross_attn/{q,k,v,o}/kernel           as self_attn
    decoder/block_<i>/cross_attn_norm/scale                 (embed,)
    {encoder,decoder}/block_<i>/mlp/wi/kernel               (embed, mlp)   relu
    {encoder,decoder}/block_<i>/mlp/{wi_0,wi_1}/kernel      (embed, mlp)   gated
    {encoder,decoder}/block_<i>/mlp/wo/kernel               (mlp, embed)
    {encoder,decoder}/final_layer_norm/scale                (embed,)
    lm_head/kernel                                          (embed, vocab) untied only

Each stack has ONE relative-position table, computed once per call and added to every layer's
self-attention scores, exactly as Hugging Face (which stores it in the stack's first layer,
``block.0.layer.0.SelfAttention.relative_attention_bias``: ``ftlab.interop.t5`` maps the two
names). It lives beside the blocks, not inside block 0, so that the blocks are identical and
``scan_layers=True`` runs each stack as one ``nn.scan`` module ``block`` (leaves with a leading
``layers`` axis; ``ftlab.models.layers.stack_layers(params["encoder"], "block")`` /
``unstack_layers`` convert). Cross attention has no position bias (as HF).

Logical axis names are those of ``ftlab.models.gpt2`` (``vocab``, ``embed``, ``heads``, ``mlp``);
the small bias tables are replicated. The tree from ``init`` is boxed
(``nn.with_logical_partitioning``); ``flax.linen.meta.unbox`` gives plain arrays.

Inputs: ``model.apply(v, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)``
or one batch dict with those keys (what ``ftlab.train.step`` passes); returns float32 logits
(batch, target length, vocab). Decoding with a cache (``decode=True``, see ``T5``): the
encoder runs once, each decoder layer computes its cross-attention keys and values once from
the encoder output, and the self-attention cache grows a chunk at a time.
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
    _additive,
    _bool,
    _without_scan,
    activation,
    attention,
    dense,
    hf_get,
    kv_cache,
    layer_stack,
)
from ftlab.models.llama import RMSNorm

HEADS = ("lm", "none")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The T5 hyperparameters ftlab uses (names as in ``transformers.T5Config``).

    ``tie_word_embeddings``: the LM head is the shared embedding (no ``lm_head`` leaf);
    ``scale_decoder_outputs``: multiply the decoder output by ``d_model ** -0.5`` before the LM
    head (T5 v1.0; None: as ``tie_word_embeddings``, the rule of transformers < 5).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    initializer_factor: float = 1.0
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def act(self) -> str:
        """The feed-forward activation's HF name (``gated-gelu`` is the tanh ``gelu_new``)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def scale(self) -> bool:
        s = self.scale_decoder_outputs
        return self.tie_word_embeddings if s is None else bool(s)

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj {self.feed_forward_proj!r}: use 'gated-<act>' or '<act>'"
            )
        activation(self.act)

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> T5Config:
        """From a ``transformers.T5Config`` (or its ``config.json`` dict); ``overrides`` win.

        ``scale_decoder_outputs`` is read when the config has it (transformers 5 writes it and
        always writes ``tie_word_embeddings: true``), else it follows ``tie_word_embeddings``
        (older configs: false in v1.1 / flan-t5). Whether an own ``lm_head`` exists is then
        ``tie_word_embeddings`` (``ftlab.interop.t5`` unties it when the checkpoint has one).
        """
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {name: hf_get(hf, name, default) for name, default in fields.items()}
        values["num_decoder_layers"] = hf_get(hf, "num_decoder_layers")
        tie = hf_get(hf, "tie_word_embeddings", True) is not False
        values["tie_word_embeddings"] = tie
        scale = hf_get(hf, "scale_decoder_outputs")
        values["scale_decoder_outputs"] = tie if scale is None else bool(scale)
        eos = values["eos_token_id"]
        if isinstance(eos, list | tuple):
            values["eos_token_id"] = int(eos[0])
        start = hf_get(hf, "decoder_start_token_id")
        values["decoder_start_token_id"] = values["pad_token_id"] if start is None else start
        values.update(overrides)
        return cls(**values)


# -- relative positions ---------------------------------------------------------------------


def relative_position_bucket(
    relative_position: Any, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Hugging Face's ``T5Attention._relative_position_bucket`` in numpy float32 (the same
    buckets as torch's float32 arithmetic; tested over +-5000). ``relative_position`` is
    ``key position - query position``; the decoder (``bidirectional=False``) buckets only
    the past."""
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        n = np.abs(rel)
    else:
        n = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(n.astype(np.float32) / np.float32(max_exact))
        ratio = ratio / np.float32(math.log(max_distance / max_exact))
        large = np.where(
            n < max_exact, 0, max_exact + (ratio * np.float32(num_buckets - max_exact))
        ).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(n < max_exact, n, large)


class RelativeBias(nn.Module):
    """A stack's relative-position table (buckets, heads) -> additive (1, heads, q, k) bias."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_start: Any, queries: int, keys: int) -> jax.Array:
        cfg = self.config
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_factor * cfg.d_model**-0.5), (None, None)
            ),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            jnp.float32,
        )
        buckets = lambda rel: relative_position_bucket(
            rel,
            self.bidirectional,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        if isinstance(query_start, int):  # static positions: the buckets are constants
            rel = np.arange(keys)[None, :] - (query_start + np.arange(queries))[:, None]
            index = jnp.asarray(buckets(rel), jnp.int32)
        else:  # decoding: the query offset is traced; look the buckets up in a static table
            span = max(queries, keys)
            lookup = jnp.asarray(buckets(np.arange(-span, span + 1)), jnp.int32)
            rel = jnp.arange(keys)[None, :] - (query_start + jnp.arange(queries))[:, None]
            index = lookup[rel + span]
        values = jnp.asarray(table, jnp.float32)[index]  # (q, k, heads)
        return values.transpose(2, 0, 1)[None]


# -- layers ---------------------------------------------------------------------------------


class T5Attention(nn.Module):
    """Self (``cross=False``) or cross attention, bias-free projections ``q k v o``.

    ``bias``: additive float32, broadcastable to (batch, heads, q, k) (position bias + mask).
    Cross attention with ``decode``: keys and values computed from ``kv`` once and kept in
    the ``cache`` (``cross_key`` / ``cross_value``); a call with ``kv=None`` reads them.
    ``attention_impl``: ``naive`` (the materialised softmax, ``layers.attention``) or any
    other name: ``jax.nn.dot_product_attention`` with the additive bias (XLA's fused path;
    the boolean-mask kernels cannot take T5's position bias); attention dropout in training
    always runs the naive path.
    """

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False
    cross: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, kv: jax.Array | None, bias: jax.Array, train: bool):
        cfg = self.config
        b, t, _ = x.shape
        h, d, f = cfg.num_heads, cfg.d_kv, cfg.initializer_factor
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": False}
        q = dense(cfg.inner, ("embed", "heads"), std=f * (cfg.d_model * d) ** -0.5, name="q", **kw)
        k = dense(cfg.inner, ("embed", "heads"), std=f * cfg.d_model**-0.5, name="k", **kw)
        v = dense(cfg.inner, ("embed", "heads"), std=f * cfg.d_model**-0.5, name="v", **kw)
        o = dense(cfg.d_model, ("heads", "embed"), std=f * cfg.inner**-0.5, name="o", **kw)

        def heads(y):
            return y.reshape(*y.shape[:2], h, d)

        query = heads(q(x))
        if not self.cross:
            keys, values = kv_cache(self, heads(k(x)), heads(v(x)), self.decode)
        elif kv is not None:
            keys, values = heads(k(kv)), heads(v(kv))
            if self.decode:
                ck = self.variable("cache", "cross_key", jnp.zeros, keys.shape, keys.dtype)
                cv = self.variable("cache", "cross_value", jnp.zeros, values.shape, values.dtype)
                ck.value, cv.value = keys, values
        else:
            keys = self.get_variable("cache", "cross_key")
            values = self.get_variable("cache", "cross_value")
        drop = nn.Dropout(cfg.dropout_rate, deterministic=not train)
        if self.attention_impl == "naive" or (train and cfg.dropout_rate > 0):
            out = attention(query, keys, values, bias, 1.0, drop, impl="naive")
        else:
            out = jax.nn.dot_product_attention(
                query, keys, values, bias=bias.astype(query.dtype), scale=1.0
            )
        return o(out.reshape(b, t, cfg.inner))


class T5FeedForward(nn.Module):
    """``wo(drop(act(wi(x))))`` or, gated, ``wo(drop(act(wi_0(x)) * wi_1(x)))``."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        f = cfg.initializer_factor
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "use_bias": False}
        act = activation(cfg.act)
        std_in, std_out = f * cfg.d_model**-0.5, f * cfg.d_ff**-0.5
        if cfg.gated:
            gate = dense(cfg.d_ff, ("embed", "mlp"), std=std_in, name="wi_0", **kw)(x)
            up = dense(cfg.d_ff, ("embed", "mlp"), std=std_in, name="wi_1", **kw)(x)
            y = act(gate) * up
        else:
            y = act(dense(cfg.d_ff, ("embed", "mlp"), std=std_in, name="wi", **kw)(x))
        y = nn.Dropout(cfg.dropout_rate, deterministic=not train)(y)
        return dense(cfg.d_model, ("mlp", "embed"), std=std_out, name="wo", **kw)(y)


class T5Block(nn.Module):
    """Pre-norm self attention, cross attention (decoder), feed-forward; residual dropout."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decoder: bool = False
    decode: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, bias, encoded, cross_bias, train: bool = False):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        eps = cfg.layer_norm_epsilon
        drop = nn.Dropout(cfg.dropout_rate, deterministic=not train)
        h = RMSNorm(eps, dt, pdt, name="self_attn_norm")(x)
        impl = self.attention_impl
        attn = T5Attention(cfg, dt, pdt, self.decode, False, impl, name="self_attn")
        x = x + drop(attn(h, None, bias, train))
        if self.decoder:
            h = RMSNorm(eps, dt, pdt, name="cross_attn_norm")(x)
            cross = T5Attention(cfg, dt, pdt, self.decode, True, impl, name="cross_attn")
            x = x + drop(cross(h, encoded, cross_bias, train))
        h = RMSNorm(eps, dt, pdt, name="mlp_norm")(x)
        return x + drop(T5FeedForward(cfg, dt, pdt, name="mlp")(h, train))


class T5Stack(nn.Module):
    """The encoder (``decoder=False``) or the decoder: blocks, one relative-position table,
    a final RMSNorm and dropout. ``x``: embedded tokens; ``mask``: additive (batch, 1, q, k)
    (padding, and causal in the decoder); ``query_start``: the first query's position (an int,
    or traced when decoding)."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decoder: bool = False
    remat: bool | str = False
    scan_layers: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, mask, encoded, cross_bias, query_start, train, decode):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        t, keys = x.shape[1], mask.shape[-1]
        rel = RelativeBias(cfg, not self.decoder, name="relative_attention_bias")
        bias = rel(query_start, t, keys) + mask.astype(jnp.float32)
        x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)
        length = cfg.decoder_layers if self.decoder else cfg.num_layers
        block = layer_stack(
            T5Block, length, num_broadcast=3, scan=self.scan_layers, remat=self.remat
        )
        if self.scan_layers:
            x, _ = block(cfg, dt, pdt, self.decoder, False, self.attention_impl, name="block")(
                x, bias, encoded, cross_bias, train
            )
        else:
            for i in range(length):
                x = block(
                    cfg, dt, pdt, self.decoder, decode, self.attention_impl, name=f"block_{i}"
                )(x, bias, encoded, cross_bias, train)
        x = RMSNorm(cfg.layer_norm_epsilon, dt, pdt, name="final_layer_norm")(x)
        return nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)


KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


def shift_right(labels: Any, decoder_start_token_id: int, pad_token_id: int) -> Any:
    """Decoder inputs from targets, as Hugging Face's ``_shift_right``: the start token, then
    the labels without their last column, ignored (negative) labels replaced by the pad id.
    numpy in, numpy out (jax arrays likewise)."""
    xp = np if isinstance(labels, np.ndarray) else jnp
    labels = xp.asarray(labels)
    start = xp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = xp.concatenate([start, labels[..., :-1]], axis=-1)
    return xp.where(shifted < 0, pad_token_id, shifted)


class T5(nn.Module):
    """``T5ForConditionalGeneration``: ``head="lm"`` (float32 logits) or ``"none"`` (the
    decoder's final hidden states).

    ``__call__(input_ids, attention_mask=None, decoder_input_ids=None,
    decoder_attention_mask=None, *, encoder_hidden_states=None, train=False, decode=False,
    return_hidden=False, prompt_embeds=None)``; the first argument may be a batch dict holding
    those keys. ``prompt_embeds`` (prompt tuning, ``ftlab.methods.prompt``): a soft prompt
    (v, d_model) or (batch, v, d_model) prepended to the encoder's input embeddings, as PEFT's
    ``PeftModelForSeq2SeqLM.forward`` (PROMPT_TUNING) does: the source mask gets v leading ones,
    the encoder's relative positions span v + source length (as Hugging Face's on
    ``inputs_embeds``), cross attention sees all v + source length positions, and the decoder
    and its outputs are unchanged.
    ``encode(input_ids, attention_mask)`` (``__call__`` with ``encode_only=True``) returns the
    encoder's output; passed back as ``encoder_hidden_states`` (``attention_mask`` still the
    source's) it replaces the encoder (beam search encodes each source once). ``decoder_input_ids`` are required
    outside decoding (``shift_right(labels, decoder_start_token_id, pad_token_id)``). Masks
    are 1 for tokens, 0 for padding; the decoder is causal. ``dtype`` is the compute dtype (parameters in
    ``param_dtype``); ``remat`` recomputes each block in the backward pass; ``scan_layers``
    runs each stack as one ``nn.scan``; ``attention_impl``: ``"naive"`` or the fused XLA
    path (default, see ``T5Attention``). ``return_hidden=True`` returns ``(hidden, kernel)``
    (the scaled decoder output and the LM head's (embed, vocab) matrix) for a chunked loss.

    Decoding (``decode=True``; ``ftlab.eval.generate.generate_seq2seq`` drives it):

    - ``init(rng, input_ids, attention_mask, decoder_input_ids=zeros((batch, max_length)),
      decode=True)["cache"]`` gives the cache's shapes (zeros: empty): per decoder layer the
      self-attention ``cached_key`` / ``cached_value`` / ``cache_index`` and the cross
      attention's ``cross_key`` / ``cross_value`` (batch, source length, heads, d_kv), and the
      decoder's ``key_mask`` / ``cache_index`` and the ``encoder_mask``.
    - ``apply({"params", "cache"}, input_ids, attention_mask, decoder_input_ids=start,
      decode=True, mutable=["cache"])`` runs the encoder once, stores every layer's cross
      keys / values and the source mask, and appends the decoder chunk ``start``.
    - ``apply({"params", "cache"}, tokens, attention_mask=tokens_mask, decode=True,
      mutable=["cache"])`` (no ``decoder_input_ids``): the first argument is the next decoder
      chunk and ``attention_mask`` its mask (a 0 hides the slot from later queries), as a
      decoder-only model is called; the encoder is not run again.
    """

    config: T5Config
    head: str = "lm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False
    scan_layers: bool = False
    attention_impl: str = "auto"  # "naive" or the fused XLA path (see T5Attention)

    def _decoder_mask(self, mask, b: int, t: int, decode: bool):
        """Additive (batch, 1, t, keys) self-attention mask of the decoder and the first
        query's position; advances the decoding counters."""
        allowed_keys = jnp.ones((b, t), bool) if mask is None else _bool(mask)
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if not decode:
            return _additive(causal & allowed_keys[:, None, None, :], jnp.float32), 0
        initialized = self.has_variable("cache", "key_mask")
        key_mask = self.variable("cache", "key_mask", jnp.zeros, (b, t), bool)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return _additive(causal & allowed_keys[:, None, None, :], jnp.float32), 0
        i = index.value
        keys = jax.lax.dynamic_update_slice(key_mask.value, allowed_keys, (0, i))
        key_mask.value, index.value = keys, i + t
        slot = jnp.arange(keys.shape[1])[None, :]
        allowed = keys[:, None, None, :] & (slot <= i + jnp.arange(t)[:, None])[None, None]
        return _additive(allowed, jnp.float32), i

    def encode(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        train: bool = False,
        prompt_embeds: jax.Array | None = None,
    ):
        """The encoder's output (batch, source length, d_model), for ``encoder_hidden_states``
        (beam search encodes each source once and repeats the output per beam). With
        ``prompt_embeds`` (v of them) the output has v + source length positions: pass it back
        with the source mask extended by v leading ones."""
        return self(
            input_ids, attention_mask, encode_only=True, train=train, prompt_embeds=prompt_embeds
        )

    def _prompt(self, prompt_embeds: Any, b: int) -> jax.Array:
        """The soft prompt as (b, v, d_model) in the compute dtype."""
        prompt = jnp.asarray(prompt_embeds)
        if prompt.ndim == 2:
            prompt = prompt[None]
        d = self.config.d_model
        if prompt.ndim != 3 or prompt.shape[0] not in (1, b) or prompt.shape[2] != d:
            raise ValueError(
                f"prompt_embeds must be (v, {d}) or ({b}, v, {d}), got {jnp.shape(prompt_embeds)}"
            )
        return jnp.broadcast_to(prompt, (b, *prompt.shape[1:])).astype(self.dtype)

    @nn.compact
    def __call__(
        self,
        inputs: Any,
        attention_mask: Any = None,
        decoder_input_ids: Any = None,
        decoder_attention_mask: Any = None,
        *,
        encoder_hidden_states: jax.Array | None = None,
        encode_only: bool = False,
        train: bool = False,
        decode: bool = False,
        return_hidden: bool = False,
        prompt_embeds: jax.Array | None = None,
    ):
        if self.head not in HEADS:
            raise ValueError(f"T5 head {self.head!r}: choose one of {', '.join(HEADS)}")
        if isinstance(inputs, Mapping):
            unknown = set(inputs) - set(KEYS)
            if unknown or "input_ids" not in inputs:
                raise KeyError(
                    f"T5 inputs take keys {KEYS} (input_ids required); got {sorted(inputs)}"
                )
            attention_mask = inputs.get("attention_mask", attention_mask)
            decoder_input_ids = inputs.get("decoder_input_ids", decoder_input_ids)
            decoder_attention_mask = inputs.get("decoder_attention_mask", decoder_attention_mask)
            inputs = inputs["input_ids"]
        _without_scan(self, decode)
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_factor), ("vocab", "embed")
            ),
            name="shared",
        )
        stack = {
            "dtype": dt,
            "param_dtype": pdt,
            "remat": self.remat,
            "attention_impl": self.attention_impl,
        }
        encoder = T5Stack(cfg, decoder=False, scan_layers=self.scan_layers, name="encoder", **stack)
        decoder = T5Stack(cfg, decoder=True, scan_layers=self.scan_layers, name="decoder", **stack)

        step = decode and decoder_input_ids is None
        if step:  # a decoding step: the first argument is the decoder chunk
            if not self.has_variable("cache", "encoder_mask"):
                raise ValueError(
                    "T5 decode step without a primed cache: call it first with the encoder "
                    "inputs and decoder_input_ids (see T5)"
                )
            if prompt_embeds is not None:
                raise ValueError(
                    "T5 decode step: prompt_embeds go to the encoder, which the primed cache "
                    "already holds"
                )
            decoder_input_ids, decoder_attention_mask = inputs, attention_mask
            encoded = None
            source_mask = self.get_variable("cache", "encoder_mask")
        else:
            if decoder_input_ids is None and not encode_only:
                raise ValueError("T5 needs decoder_input_ids (ftlab.models.t5.shift_right(labels))")
            if encoder_hidden_states is None:
                input_ids = jnp.asarray(inputs)
                b, s = input_ids.shape
            else:  # the encoder's output, computed once (``encode``)
                if prompt_embeds is not None:
                    raise ValueError(
                        "T5: prompt_embeds go to the encoder; encoder_hidden_states already "
                        "hold them (encode(..., prompt_embeds=...)), with the source mask "
                        "extended by v leading ones"
                    )
                b, s = encoder_hidden_states.shape[:2]
            source_mask = (
                jnp.ones((b, s), bool) if attention_mask is None else _bool(attention_mask)
            )
            if encoder_hidden_states is None:
                embedded = shared(input_ids)
                if prompt_embeds is not None:  # the soft prompt: v more encoder positions
                    prompt = self._prompt(prompt_embeds, b)
                    embedded = jnp.concatenate([prompt.astype(embedded.dtype), embedded], 1)
                    ones = jnp.ones((b, prompt.shape[1]), bool)
                    source_mask = jnp.concatenate([ones, source_mask], axis=1)
                    s = source_mask.shape[1]
                enc_bias = _additive(source_mask[:, None, None, :], jnp.float32)
                encoded = encoder(embedded, enc_bias, None, None, 0, train, False)
            else:
                encoded = jnp.asarray(encoder_hidden_states, self.dtype)
            if encode_only:
                return encoded
            if decode:
                stored = self.variable("cache", "encoder_mask", jnp.zeros, (b, s), bool)
                stored.value = source_mask
        ids = jnp.asarray(decoder_input_ids)
        b, t = ids.shape
        self_mask, start = self._decoder_mask(decoder_attention_mask, b, t, decode)
        cross_bias = _additive(source_mask[:, None, None, :], jnp.float32)
        x = decoder(shared(ids), self_mask, encoded, cross_bias, start, train, decode)
        if self.head == "none":
            return x
        if cfg.scale:
            x = x * jnp.asarray(cfg.d_model**-0.5, x.dtype)
        if cfg.tie_word_embeddings:
            if return_hidden:
                return x, jnp.asarray(shared.embedding, dt).T
            return shared.attend(x).astype(jnp.float32)
        lm_head = dense(
            cfg.vocab_size,
            ("embed", "vocab"),
            std=cfg.initializer_factor,
            use_bias=False,
            dtype=dt,
            param_dtype=pdt,
            name="lm_head",
        )
        if return_hidden:
            if self.is_initializing():
                lm_head(x)
            return x, jnp.asarray(self.variables["params"]["lm_head"]["kernel"], dt)
        return lm_head(x).astype(jnp.float32)
