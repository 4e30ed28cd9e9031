"""BERT encoder with a sequence-classification head (as ``BertForSequenceClassification``).

Parameter paths (post-LN layers, one ``layer_<i>`` per encoder layer so method regexes and
``partial.last_k`` read the same as on the other models)::

    embeddings/word/embedding            (vocab, embed)
    embeddings/position/embedding        (position, embed)
    embeddings/token_type/embedding      (token_type, embed)
    embeddings/layernorm/{scale,bias}    (embed,)
    layer_<i>/attention/{query,key,value}/{kernel (embed, heads), bias (heads,)}
    layer_<i>/attention/output/{kernel (heads, embed), bias (embed,)}
    layer_<i>/attention_layernorm/{scale,bias}
    layer_<i>/intermediate/{kernel (embed, mlp), bias (mlp,)}
    layer_<i>/output/{kernel (mlp, embed), bias (embed,)}
    layer_<i>/output_layernorm/{scale,bias}
    pooler/{kernel (embed, pooler), bias (pooler,)}      (when ``add_pooler``)
    classifier/{kernel (pooler, classes), bias (classes,)} (when ``num_labels > 0``)

With ``scan_layers=True`` the layers are one ``nn.scan`` module ``layer`` whose leaves lead with a
``layers`` axis (``ftlab.models.layers.stack_layers`` / ``unstack_layers`` convert).

Logical axis names: ``vocab``, ``position``, ``token_type``, ``embed``, ``heads`` (the fused
heads x head_dim projection axis: sharding it over a mesh axis that divides the number of heads
shards whole heads), ``mlp``, ``pooler``, ``classes``. ``model.init`` returns these boxed
(``flax.linen.meta.unbox`` gives plain arrays). Projections are ``nn.Dense`` so LoRA can adapt them.

``__call__`` takes token ids (or a mapping with ``input_ids`` and optionally ``attention_mask``
and ``token_type_ids``) and returns logits when ``num_labels > 0``, else the pooled output
(``add_pooler``), else the last hidden states.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.models.layers import (  # noqa: F401  (re-exported: imported from here before)
    ACTIVATIONS,
    SelfAttention,
    activation,
    dense,
    hf_config_dict,
    hf_fields,
    layer_norm,
    layer_stack,
    padding_bias,
)


class BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + out(act(inter(x))))."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"  # ftlab.models.layers.ATTENTION

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None, *, train: bool = False):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        drop = nn.Dropout(self.hidden_dropout, deterministic=not train)
        a = SelfAttention(
            self.hidden_size,
            self.num_heads,
            self.attention_dropout,
            attention_impl=self.attention_impl,
            name="attention",
            **kw,
        )(x, bias, train=train)
        x = layer_norm(self.layer_norm_eps, "embed", name="attention_layernorm", **kw)(x + drop(a))
        h = dense(self.intermediate_size, ("embed", "mlp"), name="intermediate", **kw)(x)
        h = dense(self.hidden_size, ("mlp", "embed"), name="output", **kw)(
            activation(self.hidden_act)(h)
        )
        return layer_norm(self.layer_norm_eps, "embed", name="output_layernorm", **kw)(x + drop(h))


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    dropout: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, *, train: bool = False):
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

        def embed(num: int, axis: str, name: str) -> nn.Embed:
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (axis, "embed"))
            return nn.Embed(num, self.hidden_size, embedding_init=init, name=name, **kw)

        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            embed(self.vocab_size, "vocab", "word")(input_ids)
            + embed(self.max_position_embeddings, "position", "position")(positions)
            + embed(self.type_vocab_size, "token_type", "token_type")(token_type_ids)
        )
        x = layer_norm(self.layer_norm_eps, "embed", name="layernorm", **kw)(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class Bert(nn.Module):
    """BERT encoder (+ pooler) with an optional sequence-classification head."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout, as HF
    num_labels: int = 0  # 0: no classifier head
    add_pooler: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool | str = False  # recompute each layer in the backward pass: True/"full", "dots"
    scan_layers: bool = False  # one nn.scan over the layers (parameters under ``layer``)
    attention_impl: str = "auto"  # ftlab.models.layers.ATTENTION

    @classmethod
    def from_hf_config(cls, config: Any, **overrides: Any) -> Bert:
        """From a ``transformers.BertConfig`` (or its dict); keyword overrides win."""
        c = hf_config_dict(config)
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {c['position_embedding_type']!r} is not supported "
                "(only 'absolute')"
            )
        kwargs = hf_fields(
            cls,
            c,
            required=(
                "vocab_size",
                "hidden_size",
                "num_layers",
                "num_heads",
                "intermediate_size",
                "max_position_embeddings",
                "type_vocab_size",
                "num_labels",
            ),
            optional=(
                "hidden_act",
                "layer_norm_eps",
                "hidden_dropout",
                "attention_dropout",
                "classifier_dropout",
            ),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array | Mapping[str, jax.Array],
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        if isinstance(input_ids, Mapping):
            batch = input_ids
            input_ids = batch["input_ids"]
            attention_mask = batch.get("attention_mask", attention_mask)
            token_type_ids = batch.get("token_type_ids", token_type_ids)
        input_ids = jnp.asarray(input_ids)
        seq_len = input_ids.shape[-1]
        if seq_len > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

        emb = Embeddings(
            self.vocab_size,
            self.hidden_size,
            self.max_position_embeddings,
            self.type_vocab_size,
            self.layer_norm_eps,
            self.hidden_dropout,
            name="embeddings",
            **kw,
        )
        x = emb(input_ids, token_type_ids, train=train)
        bias = None if attention_mask is None else padding_bias(attention_mask)
        layer = layer_stack(
            BertLayer,
            self.num_layers,
            num_broadcast=1,
            scan=self.scan_layers,
            remat=self.remat,
            train_keyword=True,
        )
        fields = (
            self.hidden_size,
            self.num_heads,
            self.intermediate_size,
            self.hidden_act,
            self.layer_norm_eps,
            self.hidden_dropout,
            self.attention_dropout,
        )
        if self.scan_layers:
            x, _ = layer(*fields, name="layer", attention_impl=self.attention_impl, **kw)(
                x, bias, train
            )
        else:
            for i in range(self.num_layers):
                x = layer(*fields, name=f"layer_{i}", attention_impl=self.attention_impl, **kw)(
                    x, bias, train
                )
        if not self.add_pooler:
            if self.num_labels:
                raise ValueError("a classifier head needs the pooler (add_pooler=True)")
            return x
        pooled = jnp.tanh(
            dense(self.hidden_size, ("embed", "pooler"), name="pooler", **kw)(x[:, 0])
        )
        if not self.num_labels:
            return pooled
        rate = self.hidden_dropout if self.classifier_dropout is None else self.classifier_dropout
        pooled = nn.Dropout(rate, deterministic=not train)(pooled)
        return dense(self.num_labels, ("pooler", "classes"), name="classifier", **kw)(pooled)
