"""Whisper (``model_type`` ``whisper``): ``ftlab.models.whisper.Whisper`` and its one name table.

PyTorch's ``Conv1d.weight`` (out, in, width) is Flax's ``Conv`` kernel (width, in, out); the
encoder's sinusoidal ``embed_positions`` are a parameter on both sides (HF saves them). The
output projection ``proj_out`` is tied to ``decoder.embed_tokens`` (not saved) unless the config
unties it. Names carry ``model.`` in ``WhisperForConditionalGeneration`` and none in a bare
``WhisperModel``.

The table names the per-layer tree (``encoder/layers_<i>``, ``decoder/layers_<i>``). A
``Whisper(scan_layers=True)`` tree converts to it and back with
``ftlab.models.whisper.unscan_params`` / ``scan_params``, bit for bit: import, then
``scan_params``; ``export_hf`` unscans a scanned tree itself (the family's ``unscan``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ftlab.interop.errors import HFExportError
from ftlab.interop.family import Family, register_family
from ftlab.interop.table import LINEAR, Entry, Table, elementwise, layer_norm, linear, rows
from ftlab.models.whisper import Whisper, WhisperConfig, unscan_params

TASK, BARE = "WhisperForConditionalGeneration", "WhisperModel"
# PyTorch Conv1d.weight (out, in, width) <-> Flax Conv kernel (width, in, out)
CONV1D = elementwise("OIW -> WIO", lambda a: a.transpose(2, 1, 0), lambda a: a.transpose(2, 1, 0))
ENC, DEC = "encoder.layers.{i}", "decoder.layers.{i}"
ATTN = "{a:self_attn|encoder_attn}"

TABLE = Table(
    rows(
        Entry("encoder.{c:conv1|conv2}.weight", "encoder/{c}/kernel", CONV1D),
        Entry("encoder.{c:conv1|conv2}.bias", "encoder/{c}/bias"),
        Entry("encoder.embed_positions.weight", "encoder/embed_positions"),
        linear(ENC + ".self_attn.{p:q_proj|v_proj|out_proj}", "encoder/layers_{i}/self_attn/{p}"),
        linear(ENC + ".self_attn.k_proj", "encoder/layers_{i}/self_attn/k_proj", bias=False),
        layer_norm(ENC + ".{ln:self_attn_layer_norm|final_layer_norm}", "encoder/layers_{i}/{ln}"),
        linear(ENC + ".{fc:fc1|fc2}", "encoder/layers_{i}/{fc}"),
        layer_norm("encoder.layer_norm", "encoder/layer_norm"),
        Entry("decoder.embed_tokens.weight", "decoder/embed_tokens/embedding"),
        Entry("decoder.embed_positions.weight", "decoder/embed_positions/embedding"),
        linear(DEC + f".{ATTN}.{{p:q_proj|v_proj|out_proj}}", "decoder/layers_{i}/{a}/{p}"),
        linear(DEC + f".{ATTN}.k_proj", "decoder/layers_{i}/{a}/k_proj", bias=False),
        layer_norm(
            DEC + ".{ln:self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm}",
            "decoder/layers_{i}/{ln}",
        ),
        linear(DEC + ".{fc:fc1|fc2}", "decoder/layers_{i}/{fc}"),
        layer_norm("decoder.layer_norm", "decoder/layer_norm"),
        Entry("proj_out.weight", "proj_out/kernel", LINEAR, head=True),
    )
)


def build(hf: dict, head: str, options: dict, overrides: dict) -> Whisper:
    return Whisper(WhisperConfig.from_hf_config(hf, **overrides), head=head, **options)


def example_inputs(model: Whisper) -> dict[str, Any]:
    cfg = model.config
    return {
        "input_features": jnp.zeros((1, cfg.num_mel_bins, cfg.num_frames), jnp.float32),
        "decoder_input_ids": jnp.zeros((1, 1), jnp.int32),
    }


def check_export(config: Mapping[str, Any], flat: Mapping[str, Any], head: str) -> None:
    """An own ``proj_out`` exactly when the config unties the embeddings."""
    tied = bool(config.get("tie_word_embeddings", True))
    if tied and "proj_out/kernel" in flat:
        raise HFExportError(
            "params have an untied proj_out/kernel but hf_config says tie_word_embeddings=true"
        )
    if not tied and head == "lm" and "proj_out/kernel" not in flat:
        raise HFExportError(
            "hf_config says tie_word_embeddings=false (an own proj_out) but params have no "
            "proj_out/kernel"
        )


def config_of(model: Whisper) -> dict[str, Any]:
    """config.json for an ftlab ``Whisper``."""
    c = model.config
    return {
        "model_type": "whisper",
        "architectures": [TASK if model.head == "lm" else BARE],
        "vocab_size": c.vocab_size,
        "num_mel_bins": c.num_mel_bins,
        "d_model": c.d_model,
        "encoder_layers": c.encoder_layers,
        "decoder_layers": c.decoder_layers,
        "encoder_attention_heads": c.encoder_attention_heads,
        "decoder_attention_heads": c.decoder_attention_heads,
        "encoder_ffn_dim": c.encoder_ffn_dim,
        "decoder_ffn_dim": c.decoder_ffn_dim,
        "max_source_positions": c.max_source_positions,
        "max_target_positions": c.max_target_positions,
        "activation_function": c.activation_function,
        "dropout": c.dropout,
        "attention_dropout": c.attention_dropout,
        "activation_dropout": c.activation_dropout,
        "init_std": c.init_std,
        "tie_word_embeddings": c.tie_word_embeddings,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.eos_token_id,
        "eos_token_id": c.eos_token_id,
        "decoder_start_token_id": c.decoder_start_token_id,
        "is_encoder_decoder": True,
        "scale_embedding": False,
    }


FAMILY = register_family(
    Family(
        model_type="whisper",
        build=build,
        table=lambda config: TABLE,
        example_inputs=example_inputs,
        prefix="model.",
        heads={"lm": "proj_out/"},
        tied_heads=("lm",),
        architectures={"lm": TASK, "none": BARE},
        head_of_arch={TASK: "lm", BARE: "none"},
        default_head="lm",
        bare_default="lm",
        options=("dtype", "param_dtype", "remat", "attention_impl"),
        droppable=(r"proj_out/.*",),  # a tied checkpoint that saved proj_out anyway
        check_export=check_export,
        config_of=config_of,
        model_class=Whisper,
        unscan=unscan_params,
        # no task_type, as PEFT's Whisper guide (its SEQ_2_SEQ_LM wrapper passes input_ids,
        # which Whisper does not take): PeftModel.from_pretrained wraps the model as it is
        peft_task={"lm": None, "none": None},
    )
)
