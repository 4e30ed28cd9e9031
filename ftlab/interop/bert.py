"""BERT (``model_type`` ``bert``): ``ftlab.models.bert.Bert`` and its one name table.

Older checkpoints name LayerNorm parameters ``gamma``/``beta`` (read as ``weight``/``bias``);
the pre-training heads (``cls.*``) are dropped with a note; a checkpoint without
``pooler.dense`` builds a model without the pooler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from ftlab.interop import _encoder
from ftlab.interop.family import Family, register_family
from ftlab.interop.table import Entry, Table, layer_norm, linear, rows
from ftlab.models.bert import Bert

TASK, BARE = "BertForSequenceClassification", "BertModel"
LAYER = "encoder.layer.{i}"

TABLE = Table(
    rows(
        Entry("embeddings.word_embeddings.weight", "embeddings/word/embedding"),
        Entry("embeddings.position_embeddings.weight", "embeddings/position/embedding"),
        Entry("embeddings.token_type_embeddings.weight", "embeddings/token_type/embedding"),
        layer_norm("embeddings.LayerNorm", "embeddings/layernorm"),
        linear(LAYER + ".attention.self.{p:query|key|value}", "layer_{i}/attention/{p}"),
        linear(LAYER + ".attention.output.dense", "layer_{i}/attention/output"),
        layer_norm(LAYER + ".attention.output.LayerNorm", "layer_{i}/attention_layernorm"),
        linear(LAYER + ".intermediate.dense", "layer_{i}/intermediate"),
        linear(LAYER + ".output.dense", "layer_{i}/output"),
        layer_norm(LAYER + ".output.LayerNorm", "layer_{i}/output_layernorm"),
        linear("pooler.dense", "pooler"),
        linear("classifier", "classifier", head=True),
    )
)


def _infer(names: Sequence[str]) -> dict[str, Any]:
    if not names:
        return {}
    return {"add_pooler": any(n.endswith("pooler.dense.weight") for n in names)}


def config_of(model: Bert) -> dict[str, Any]:
    """config.json for an ftlab ``Bert``."""
    return {
        **_encoder.common_config("bert", model, TASK, BARE),
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.intermediate_size,
        "max_position_embeddings": model.max_position_embeddings,
        "type_vocab_size": model.type_vocab_size,
        "hidden_act": model.hidden_act,
        "layer_norm_eps": model.layer_norm_eps,
        "hidden_dropout_prob": model.hidden_dropout,
        "attention_probs_dropout_prob": model.attention_dropout,
        "classifier_dropout": model.classifier_dropout,
        "position_embedding_type": "absolute",
    }


FAMILY = register_family(
    Family(
        model_type="bert",
        build=_encoder.builder(Bert),
        table=lambda config: TABLE,
        example_inputs=lambda model: jnp.zeros(
            (1, min(8, model.max_position_embeddings)), jnp.int32
        ),
        prefix="bert.",
        heads=_encoder.HEADS,
        **_encoder.architectures(TASK, BARE),
        default_head="classifier",
        bare_default="none",
        ignore=_encoder.IGNORE,
        aliases=((r"(LayerNorm)\.gamma$", r"\1.weight"), (r"(LayerNorm)\.beta$", r"\1.bias")),
        drop_hf=(r"cls\..*",),
        droppable=(r"classifier/.*",),
        fresh=(r"classifier/.*",),
        infer=_infer,
        config_of=config_of,
        model_class=Bert,
        peft_task={"classifier": "SEQ_CLS", "none": "FEATURE_EXTRACTION"},
    )
)
