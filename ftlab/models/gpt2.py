"""GPT-2 in Flax linen: pre-LN decoder, GELU (tanh), learned positions, tied LM head.

Parameter paths (stable; LoRA and partial-training regexes are written against them)::

    wte/embedding                      (vocab, embed)
    wpe/embedding                      (positions, embed)
    h_<i>/ln_1/{scale,bias}            (embed,)
    h_<i>/attn/{q_proj,k_proj,v_proj}/kernel (embed, heads)   bias (heads,)
    h_<i>/attn/c_proj/kernel           (heads, embed)         bias (embed,)
    h_<i>/ln_2/{scale,bias}            (embed,)
    h_<i>/mlp/c_fc/kernel              (embed, mlp)           bias (mlp,)
    h_<i>/mlp/c_proj/kernel            (mlp, embed)           bias (embed,)
    ln_f/{scale,bias}                  (embed,)
    lm_head/kernel                     (embed, vocab)   only when embeddings are untied
    score/kernel                       (embed, classes) head="classifier"

With ``scan_layers=True`` the blocks are one ``nn.scan`` module ``h``: ``h/ln_1/scale``
(layers, embed) and so on, every leaf with a leading ``layers`` axis
(``ftlab.models.layers.stack_layers`` / ``unstack_layers`` convert to and from ``h_<i>``).

Hugging Face's fused ``c_attn`` is three separate ``nn.Dense`` layers here, so a LoRA regex such
as ``attn/(q|v)_proj/kernel`` adapts the query and value projections alone.

Logical axis names (every weight is created with ``nn.with_logical_partitioning``, so the tree
returned by ``init`` is boxed; use ``flax.linen.meta.unbox`` for plain arrays):

- ``vocab``      token vocabulary
- ``positions``  learned position table rows
- ``embed``      model width (the residual stream)
- ``heads``      attention heads x head size, flattened (query and output projections)
- ``kv_heads``   key/value heads x head size, flattened (GPT-2: equal to ``heads``; LLaMA: GQA)
- ``mlp``        feed-forward hidden width
- ``classes``    classifier outputs

The helpers ``attention``, ``attention_bias``, ``last_token_index`` and ``unpack_inputs`` live in
``ftlab.models.layers`` (shared with the other families) and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.models.layers import (  # noqa: F401  (re-exported: other modules import them here)
    HEADS,
    Decoder,
    activation,
    attention,
    attention_bias,
    classify,
    decoder_head,
    decoder_inputs,
    dense,
    hf_get,
    kv_cache,
    last_token_index,
    layer_norm,
    layer_stack,
    num_labels,
    unpack_inputs,
)

LOGICAL_AXES = ("vocab", "positions", "embed", "heads", "kv_heads", "mlp", "classes")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The GPT-2 hyperparameters ftlab uses (names as in ``transformers.GPT2Config``)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    num_labels: int = 2

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        activation(self.activation_function)

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides: Any) -> GPT2Config:
        """From a ``transformers.GPT2Config`` (or its ``config.json`` dict); ``overrides`` win.

        ``num_labels`` is read from the config's ``id2label`` / ``num_labels`` when present.
        """
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        values = {name: hf_get(hf, name, default) for name, default in fields.items()}
        values["pad_token_id"] = hf_get(hf, "pad_token_id")
        values["n_inner"] = hf_get(hf, "n_inner")
        values["num_labels"] = num_labels(hf, cls.num_labels)
        values.update(overrides)
        return cls(**values)


# -- GPT-2 ----------------------------------------------------------------------------------


def _layer_norm(cfg: GPT2Config, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return layer_norm(cfg.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer_idx: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    decode: bool = False  # keys and values through the ``cache`` collection (``kv_cache``)
    attention_impl: str = "auto"  # ftlab.models.layers.ATTENTION

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        std = cfg.initializer_range
        kw = {"std": std, "use_bias": True, "dtype": self.dtype, "param_dtype": self.param_dtype}
        q = dense(cfg.n_embd, ("embed", "heads"), name="q_proj", **kw)(x)
        k = dense(cfg.n_embd, ("embed", "kv_heads"), name="k_proj", **kw)(x)
        v = dense(cfg.n_embd, ("embed", "kv_heads"), name="v_proj", **kw)(x)
        shape = (b, t, cfg.n_head, cfg.head_dim)
        k, v = kv_cache(self, k.reshape(shape), v.reshape(shape), self.decode)
        scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        drop = nn.Dropout(cfg.attn_pdrop, deterministic=not train)
        impl = "xla" if (self.decode and self.attention_impl == "splash") else self.attention_impl
        out = attention(q.reshape(shape), k, v, bias, scale, drop, impl=impl, causal=True)
        kw["std"] = std / math.sqrt(2 * cfg.n_layer)
        out = dense(cfg.n_embd, ("heads", "embed"), name="c_proj", **kw)(
            out.reshape(b, t, cfg.n_embd)
        )
        return nn.Dropout(cfg.resid_pdrop, deterministic=not train)(out)


class GPT2MLP(nn.Module):
    config: GPT2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg = self.config
        kw = {"use_bias": True, "dtype": self.dtype, "param_dtype": self.param_dtype}
        h = dense(cfg.inner, ("embed", "mlp"), std=cfg.initializer_range, name="c_fc", **kw)(x)
        h = activation(cfg.activation_function)(h)
        std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        h = dense(cfg.n_embd, ("mlp", "embed"), std=std, name="c_proj", **kw)(h)
        return nn.Dropout(cfg.resid_pdrop, deterministic=not train)(h)


class GPT2Block(nn.Module):
    config: GPT2Config
    layer_idx: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    decode: bool = False
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, train: bool = False) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        h = _layer_norm(cfg, dt, pdt, "ln_1")(x)
        attn = GPT2Attention(
            cfg, self.layer_idx, dt, pdt, self.decode, self.attention_impl, name="attn"
        )
        x = x + attn(h, bias, train)
        h = _layer_norm(cfg, dt, pdt, "ln_2")(x)
        return x + GPT2MLP(cfg, dt, pdt, name="mlp")(h, train)


class GPT2(Decoder):
    """GPT-2 with a causal-LM head (``head="lm"``), a sequence classifier (``"classifier"``),
    or none (``"none"``: final hidden states).

    Call with token ids (batch, length) or a batch dict holding ``input_ids`` and optionally
    ``attention_mask`` (1 = token, 0 = padding) and ``position_ids``. Logits are float32;
    ``dtype`` is the compute dtype, parameters are kept in ``param_dtype``. ``remat``
    recomputes each block in the backward pass (activation memory for compute);
    ``scan_layers`` runs the blocks as one ``nn.scan`` (parameters under ``h``).
    ``decode=True`` runs with a key/value cache (``Decoder``); the cache, sized at ``init``,
    must not exceed ``n_positions``.
    """

    def backbone(self, input_ids, position_ids, bias, train, decode, prompt=None):  # Decoder
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        t = input_ids.shape[1] + (0 if prompt is None else prompt.shape[1])
        if t > cfg.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions {cfg.n_positions}")
        init = nn.initializers.normal(cfg.initializer_range)
        wte = nn.Embed(
            cfg.vocab_size,
            cfg.n_embd,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
            name="wte",
        )
        wpe = nn.Embed(
            cfg.n_positions,
            cfg.n_embd,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.01), ("positions", "embed")
            ),
            name="wpe",
        )
        x = wte(input_ids)
        if prompt is not None:  # a soft prompt: before the tokens, positions 0..v-1 (Decoder)
            x = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
        x = x + wpe(position_ids)
        x = nn.Dropout(cfg.embd_pdrop, deterministic=not train)(x)
        block = layer_stack(
            GPT2Block, cfg.n_layer, num_broadcast=1, scan=self.scan_layers, remat=self.remat
        )
        if self.scan_layers:
            if cfg.scale_attn_by_inverse_layer_idx:
                raise ValueError(
                    "scan_layers=True shares one block for all layers, so it cannot scale "
                    "attention by the layer index (scale_attn_by_inverse_layer_idx=True)"
                )
            x, _ = block(cfg, 0, dt, pdt, False, self.attention_impl, name="h")(x, bias, train)
        else:
            for i in range(cfg.n_layer):
                x = block(cfg, i, dt, pdt, decode, self.attention_impl, name=f"h_{i}")(
                    x, bias, train
                )
        x = _layer_norm(cfg, dt, pdt, "ln_f")(x)
        return x, wte
