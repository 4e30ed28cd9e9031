"""T5 (``model_type`` ``t5``): ``ftlab.models.t5.T5`` and its one name table.

Hugging Face keeps each stack's relative-position table in its first block
(``encoder.block.0.layer.0.SelfAttention.relative_attention_bias``); ftlab keeps it beside the
blocks (``encoder/relative_attention_bias/embedding``). The encoder's feed-forward is its block's
``layer.1``, the decoder's ``layer.2`` (``layer.1`` is cross attention). The encoder's and
decoder's ``embed_tokens`` are the tied ``shared`` embedding: skipped on import, not written.

Tied or untied LM head: transformers 5 always writes ``tie_word_embeddings: true`` and says
``scale_decoder_outputs`` instead, and saves an untied (v1.1 / flan-t5) ``lm_head.weight``
beside ``shared.weight``; older configs say ``tie_word_embeddings: false``. So the model gets an
own ``lm_head`` when the checkpoint has one or the config unties it, and the
``d_model ** -0.5`` rescale follows ``scale_decoder_outputs`` (else the tie flag).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftlab.interop.errors import HFExportError
from ftlab.interop.family import Family, register_family
from ftlab.interop.table import LINEAR, Entry, Table, linear, rows
from ftlab.models.layers import unstack_layers
from ftlab.models.t5 import T5, T5Config

STACK = "{s:encoder|decoder}"
FF = "{p:wi|wi_0|wi_1|wo}"
ATTN = "{p:q|k|v|o}"

TABLE = Table(
    rows(
        Entry("shared.weight", "shared/embedding"),
        Entry(
            f"{STACK}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "{s}/relative_attention_bias/embedding",
        ),
        linear(
            f"{STACK}.block.{{i}}.layer.0.SelfAttention.{ATTN}",
            "{s}/block_{i}/self_attn/{p}",
            bias=False,
        ),
        Entry(
            f"{STACK}.block.{{i}}.layer.0.layer_norm.weight", "{s}/block_{i}/self_attn_norm/scale"
        ),
        linear(
            f"decoder.block.{{i}}.layer.1.EncDecAttention.{ATTN}",
            "decoder/block_{i}/cross_attn/{p}",
            bias=False,
        ),
        Entry(
            "decoder.block.{i}.layer.1.layer_norm.weight", "decoder/block_{i}/cross_attn_norm/scale"
        ),
        linear(
            f"encoder.block.{{i}}.layer.1.DenseReluDense.{FF}",
            "encoder/block_{i}/mlp/{p}",
            bias=False,
        ),
        Entry("encoder.block.{i}.layer.1.layer_norm.weight", "encoder/block_{i}/mlp_norm/scale"),
        linear(
            f"decoder.block.{{i}}.layer.2.DenseReluDense.{FF}",
            "decoder/block_{i}/mlp/{p}",
            bias=False,
        ),
        Entry("decoder.block.{i}.layer.2.layer_norm.weight", "decoder/block_{i}/mlp_norm/scale"),
        Entry(f"{STACK}.final_layer_norm.weight", "{s}/final_layer_norm/scale"),
        Entry("lm_head.weight", "lm_head/kernel", LINEAR, head=True),
    )
)


def build(hf: dict, head: str, options: dict, overrides: dict) -> nn.Module:
    return T5(T5Config.from_hf_config(hf, **overrides), head=head, **options)


def infer(names: Sequence[str]) -> dict[str, Any]:
    """An own ``lm_head`` when the checkpoint has one (whatever the config's tie flag says)."""
    return {"tie_word_embeddings": False} if "lm_head.weight" in set(names) else {}


def example_inputs(model: nn.Module) -> Any:
    ids = jnp.zeros((1, 1), jnp.int32)
    return {"input_ids": ids, "decoder_input_ids": ids}


def check_export(config: Mapping[str, Any], flat: Mapping[str, Any], head: str) -> None:
    if config.get("tie_word_embeddings") is False and head == "lm" and "lm_head/kernel" not in flat:
        raise HFExportError(
            "hf_config says tie_word_embeddings=false (an own lm_head) but params have no "
            "lm_head/kernel"
        )


def config_of(model: T5) -> dict[str, Any]:
    """config.json for an ftlab-built ``T5`` (transformers 5 spelling: the tie flag says
    whether ``lm_head`` is separate, ``scale_decoder_outputs`` the rescale)."""
    cfg = model.config
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    out.update(
        model_type="t5",
        architectures=["T5ForConditionalGeneration"],
        num_decoder_layers=cfg.decoder_layers,
        scale_decoder_outputs=cfg.scale,
        is_encoder_decoder=True,
    )
    return out


def unscan(params: Mapping[str, Any]) -> dict:
    """A ``T5(scan_layers=True)`` tree (``encoder/block``, ``decoder/block`` with a leading
    layer axis) as the per-layer tree (``block_<i>``); a per-layer stack is left as it is."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        if isinstance(params.get(stack), Mapping) and "block" in params[stack]:
            out[stack] = unstack_layers(params[stack], "block")
    return out


FAMILY = register_family(
    Family(
        model_type="t5",
        build=build,
        table=lambda config: TABLE,
        example_inputs=example_inputs,
        prefix="",
        heads={"lm": "lm_head/"},
        tied_heads=("lm",),
        architectures={"lm": "T5ForConditionalGeneration"},
        head_of_arch={"T5ForConditionalGeneration": "lm"},
        ignore=(
            r"(encoder|decoder)\.embed_tokens\.weight",
            r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
        ),
        droppable=(r"lm_head/.*",),
        infer=infer,
        check_export=check_export,
        config_of=config_of,
        model_class=T5,
        unscan=unscan,
        peft_task={"lm": "SEQ_2_SEQ_LM", "none": "FEATURE_EXTRACTION"},
    )
)
