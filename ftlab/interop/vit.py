"""ViT (``model_type`` ``vit``): ``ftlab.models.vit.ViT`` and its one name table."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ftlab.interop import _encoder
from ftlab.interop.family import MODEL_OPTIONS, Family, register_family
from ftlab.interop.table import CONV, Entry, Renames, Table, layer_norm, linear, rows
from ftlab.models.vit import ViT

TASK, BARE = "ViTForImageClassification", "ViTModel"
LAYER = "encoder.layer.{i}"

TABLE = Table(
    rows(
        Entry("embeddings.cls_token", "embeddings/cls"),
        Entry("embeddings.position_embeddings", "embeddings/position"),
        Entry("embeddings.patch_embeddings.projection.weight", "embeddings/patch/kernel", CONV),
        Entry("embeddings.patch_embeddings.projection.bias", "embeddings/patch/bias"),
        layer_norm(LAYER + ".{n:layernorm_before|layernorm_after}", "layer_{i}/{n}"),
        linear(LAYER + ".attention.attention.{p:query|key|value}", "layer_{i}/attention/{p}"),
        linear(LAYER + ".attention.output.dense", "layer_{i}/attention/output"),
        linear(LAYER + ".intermediate.dense", "layer_{i}/mlp/fc1"),
        linear(LAYER + ".output.dense", "layer_{i}/mlp/fc2"),
        layer_norm("layernorm", "layernorm"),
        linear("classifier", "classifier", head=True),
    )
)


# transformers 5 loads these modules under other names, and PEFT names adapters by them
MEMORY_NAMES = Renames(
    [
        (LAYER + ".attention.attention.query", "layers.{i}.attention.q_proj"),
        (LAYER + ".attention.attention.key", "layers.{i}.attention.k_proj"),
        (LAYER + ".attention.attention.value", "layers.{i}.attention.v_proj"),
        (LAYER + ".attention.output.dense", "layers.{i}.attention.o_proj"),
        (LAYER + ".intermediate.dense", "layers.{i}.mlp.fc1"),
        (LAYER + ".output.dense", "layers.{i}.mlp.fc2"),
        (LAYER + ".{n:layernorm_before|layernorm_after}", "layers.{i}.{n}"),
        (LAYER, "layers.{i}"),
        ("encoder.layer", "layers"),
    ]
)


def config_of(model: ViT) -> dict[str, Any]:
    """config.json for an ftlab ``ViT``."""
    return {
        **_encoder.common_config("vit", model, TASK, BARE),
        **({"num_channels": model.num_channels} if model.num_channels else {}),
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.mlp_size,
        "hidden_act": model.hidden_act,
        "layer_norm_eps": model.layer_norm_eps,
        "qkv_bias": model.qkv_bias,
        "hidden_dropout_prob": model.hidden_dropout,
        "attention_probs_dropout_prob": model.attention_dropout,
    }


def example_inputs(model: ViT) -> Any:
    return jnp.zeros((1, model.image_size, model.image_size, model.num_channels or 3), jnp.float32)


FAMILY = register_family(
    Family(
        model_type="vit",
        build=_encoder.builder(ViT),
        table=lambda config: TABLE,
        example_inputs=example_inputs,
        prefix="vit.",
        heads=_encoder.HEADS,
        **_encoder.architectures(TASK, BARE),
        default_head="classifier",
        bare_default="none",
        options=MODEL_OPTIONS,
        ignore=_encoder.IGNORE,
        droppable=(r"classifier/.*",),
        fresh=(r"classifier/.*",),
        config_of=config_of,
        model_class=ViT,
        memory_names=MEMORY_NAMES,
        peft_task={"classifier": None, "none": None},  # PEFT has no image task type
    )
)
