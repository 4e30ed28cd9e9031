"""Load HF PyTorch encoder checkpoints (BERT, ViT, ResNet) into ftlab's Flax parameter trees.

A checkpoint is a model directory (or a hub id) as ``ftlab.models.hf_import`` reads it: the same
directory/hub resolution, ``config.json`` reading and safetensors files (single or sharded; torch
is not needed), and the same ``HFImportError``. Every leaf the Flax model expects is named by the HF
tensor it comes from, converted (Linear weights transposed, conv weights OIHW -> HWIO, BatchNorm
running mean/var into ``batch_stats``) and checked against the model's shape. Problems are
collected and raised together as one ``HFImportError`` naming each tensor: missing from the
checkpoint, present but unused, or of the wrong shape.

    model, variables = load_hf_encoder("path/to/bert", dtype=jnp.bfloat16)
    logits = model.apply(variables, {"input_ids": ids, "attention_mask": mask})

To fine-tune a backbone with a new head, pass ``allow_missing=(r"^classifier/",)`` (those leaves
keep a fresh init from ``rng``) and ``num_labels=...``; to skip heads the checkpoint has but the
model does not (``cls.predictions.*`` of a pre-training checkpoint), ``ignore_unexpected``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab import tree
from ftlab.models.bert import Bert
from ftlab.models.hf_import import (
    HFImportError,
    abstract_variables,
    iter_tensors,
    read_config,
    resolve,
)
from ftlab.models.resnet import ResNet
from ftlab.models.vit import ViT

# Buffers PyTorch saves that have no Flax counterpart.
ALWAYS_IGNORED = (r"\.num_batches_tracked$", r"\.position_ids$")

KeyFn = Callable[[str], tuple[str, str]]  # Flax "collection/path" -> (HF key, kind)


# -- reading ------------------------------------------------------------------------------
def read_checkpoint(
    path: str | os.PathLike, *, revision: str | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config dict, tensors) of a HF model directory (or hub id) saved as safetensors."""
    directory = resolve(path, revision=revision)
    return read_config(directory), dict(iter_tensors(directory))


# -- Flax path -> HF key, per architecture --------------------------------------------------
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}
_STATS = {"mean": "running_mean", "var": "running_var"}


def _prefix(tensors: Mapping[str, np.ndarray], base: str) -> str:
    """``"bert."`` for a task model's checkpoint, ``""`` for a bare backbone's."""
    return f"{base}." if any(k.startswith(f"{base}.") for k in tensors) else ""


def _by_rules(rules: Sequence[tuple[str, str]], head: str, prefix: str) -> KeyFn:
    """A key function from (Flax module regex, HF module template) pairs."""

    def key(path: str) -> tuple[str, str]:
        collection, rest = path.split("/", 1)
        module, leaf = rest.rsplit("/", 1) if "/" in rest else ("", rest)
        kind = "linear" if leaf == "kernel" else "plain"
        if collection == "batch_stats":
            suffix = _STATS[leaf]
        else:
            suffix = _LEAF.get(leaf, leaf)
        for pattern, template in rules:
            m = re.fullmatch(pattern, module)
            if m:
                hf = m.expand(template)
                return (hf if module == head else prefix + hf) + "." + suffix, kind
        raise HFImportError(f"no HF name is known for the Flax leaf {path!r}")

    return key


BERT_RULES = (
    (r"embeddings/word", "embeddings.word_embeddings"),
    (r"embeddings/position", "embeddings.position_embeddings"),
    (r"embeddings/token_type", "embeddings.token_type_embeddings"),
    (r"embeddings/layernorm", "embeddings.LayerNorm"),
    (r"layer_(\d+)/attention/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
    (r"layer_(\d+)/attention/output", r"encoder.layer.\1.attention.output.dense"),
    (r"layer_(\d+)/attention_layernorm", r"encoder.layer.\1.attention.output.LayerNorm"),
    (r"layer_(\d+)/intermediate", r"encoder.layer.\1.intermediate.dense"),
    (r"layer_(\d+)/output", r"encoder.layer.\1.output.dense"),
    (r"layer_(\d+)/output_layernorm", r"encoder.layer.\1.output.LayerNorm"),
    (r"pooler", "pooler.dense"),
    (r"classifier", "classifier"),
)

VIT_RULES = (
    (r"embeddings/patch", "embeddings.patch_embeddings.projection"),
    (r"layer_(\d+)/layernorm_(before|after)", r"encoder.layer.\1.layernorm_\2"),
    (r"layer_(\d+)/attention/(query|key|value)", r"encoder.layer.\1.attention.attention.\2"),
    (r"layer_(\d+)/attention/output", r"encoder.layer.\1.attention.output.dense"),
    (r"layer_(\d+)/mlp/fc1", r"encoder.layer.\1.intermediate.dense"),
    (r"layer_(\d+)/mlp/fc2", r"encoder.layer.\1.output.dense"),
    (r"layernorm", "layernorm"),
    (r"classifier", "classifier"),
)


def bert_keys(tensors: Mapping[str, np.ndarray]) -> KeyFn:
    return _by_rules(BERT_RULES, "classifier", _prefix(tensors, "bert"))


def vit_keys(tensors: Mapping[str, np.ndarray]) -> KeyFn:
    prefix = _prefix(tensors, "vit")
    by_rules = _by_rules(VIT_RULES, "classifier", prefix)
    params = {
        "params/embeddings/cls": "cls_token",
        "params/embeddings/position": "position_embeddings",
    }

    def key(path: str) -> tuple[str, str]:
        if path in params:
            return f"{prefix}embeddings.{params[path]}", "plain"
        hf, kind = by_rules(path)
        return hf, ("conv" if path == "params/embeddings/patch/kernel" else kind)

    return key


def resnet_keys(tensors: Mapping[str, np.ndarray], depths: Sequence[int]) -> KeyFn:
    prefix = _prefix(tensors, "resnet")
    firsts = np.cumsum([0, *depths])

    def key(path: str) -> tuple[str, str]:
        collection, rest = path.split("/", 1)
        module, leaf = rest.rsplit("/", 1)
        suffix = _STATS[leaf] if collection == "batch_stats" else _LEAF[leaf]
        if module == "classifier":
            return f"classifier.1.{suffix}", "linear" if leaf == "kernel" else "plain"
        kind = "conv" if leaf == "kernel" else "plain"
        if module.startswith("stem_"):
            part = "convolution" if module == "stem_conv" else "normalization"
            return f"{prefix}embedder.embedder.{part}.{suffix}", kind
        m = re.fullmatch(r"stage_(\d+)/block_(\d+)/(conv|norm|shortcut)_?(\d+|conv|norm)", module)
        if not m:
            raise HFImportError(f"no HF name is known for the Flax leaf {path!r}")
        stage, block = int(m.group(1)), int(m.group(2))
        layer = block - int(firsts[stage])
        base = f"{prefix}encoder.stages.{stage}.layers.{layer}"
        if m.group(3) == "shortcut":
            part = "convolution" if m.group(4) == "conv" else "normalization"
            return f"{base}.shortcut.{part}.{suffix}", kind
        part = "convolution" if m.group(3) == "conv" else "normalization"
        return f"{base}.layer.{m.group(4)}.{part}.{suffix}", kind

    return key


# -- conversion ---------------------------------------------------------------------------
def _convert(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "conv":  # PyTorch OIHW -> Flax HWIO
        return array.transpose(2, 3, 1, 0)
    return array


def _aliases(key: str) -> list[str]:
    """Older BERT checkpoints name LayerNorm parameters gamma/beta."""
    out = [key]
    if "LayerNorm." in key:
        out.append(re.sub(r"\.weight$", ".gamma", key))
        out.append(re.sub(r"\.bias$", ".beta", key))
    return out


def _shapes(model: nn.Module, sample: Any) -> dict[str, jax.ShapeDtypeStruct]:
    return tree.flatten(nn.meta.unbox(abstract_variables(model, sample)))


def _sample_input(model: nn.Module, num_channels: int) -> Any:
    if isinstance(model, Bert):
        return jnp.zeros((1, min(8, model.max_position_embeddings)), jnp.int32)
    if isinstance(model, ViT):
        return jnp.zeros((1, model.image_size, model.image_size, num_channels), jnp.float32)
    if isinstance(model, ResNet):
        return jnp.zeros((1, 32, 32, num_channels), jnp.float32)
    raise TypeError(f"no HF import for {type(model).__name__} (Bert, ViT and ResNet have one)")


# The base model's attribute in HF's task models (``BertForSequenceClassification.bert``).
BASES: dict[type[nn.Module], str] = {Bert: "bert", ViT: "vit", ResNet: "resnet"}


def base_name(model: nn.Module) -> str:
    """``"bert"``, ``"vit"`` or ``"resnet"``: the prefix of a task checkpoint's backbone names."""
    for cls, base in BASES.items():
        if isinstance(model, cls):
            return base
    raise TypeError(f"no HF names for {type(model).__name__} (Bert, ViT and ResNet have them)")


def keys_for(model: nn.Module, prefixed: bool) -> KeyFn:
    """Flax ``"collection/path"`` -> (HF name, conversion kind) for ``model``; ``prefixed``: the
    backbone's names start with its base name (``bert.``), as in a task model's checkpoint
    (a bare ``BertModel`` has none). ``hf_export_encoders`` writes with the same function, so
    the two directions agree."""
    marker = {f"{base_name(model)}.": None} if prefixed else {}
    if isinstance(model, Bert):
        return bert_keys(marker)
    if isinstance(model, ViT):
        return vit_keys(marker)
    return resnet_keys(marker, model.depths)


def _key_fn(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> KeyFn:
    return keys_for(model, bool(_prefix(tensors, base_name(model))))


def _listing(title: str, lines: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"  {title} ({len(lines)}):\n    " + "\n    ".join(lines[:limit]) + more


def convert_state_dict(
    model: nn.Module,
    tensors: Mapping[str, np.ndarray],
    *,
    num_channels: int = 3,
    allow_missing: Sequence[str] = (),
    ignore_unexpected: Sequence[str] = (),
    rng: jax.Array | None = None,
) -> dict[str, dict]:
    """HF tensors (``{name: array}``) -> the model's variables (``params``, ``batch_stats``).

    ``allow_missing``: regexes of Flax paths (``classifier/``) that may be absent from the
    checkpoint; they keep a fresh init from ``rng``. ``ignore_unexpected``: regexes of HF names
    to skip. Anything else absent, unused or of the wrong shape raises ``HFImportError``.
    """
    sample = _sample_input(model, num_channels)
    expected = _shapes(model, sample)
    key_fn = _key_fn(model, tensors)
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing, mismatched, fresh = [], [], []
    for path, shape in sorted(expected.items()):
        hf_key, kind = key_fn(path)
        found = next((k for k in _aliases(hf_key) if k in tensors), None)
        local = path.split("/", 1)[1]
        if found is None:
            if any(re.search(p, local) for p in allow_missing):
                fresh.append(path)
            else:
                missing.append(f"{hf_key} (for {path}, shape {tuple(shape.shape)})")
            continue
        used.add(found)
        source = np.asarray(tensors[found])
        value = _convert(source, kind)
        if tuple(value.shape) != tuple(shape.shape):
            how = f" -> {tuple(value.shape)} after {kind} conversion" if kind != "plain" else ""
            mismatched.append(
                f"{found}: shape {tuple(source.shape)}{how}, but {path} expects "
                f"{tuple(shape.shape)}"
            )
            continue
        out[path] = np.ascontiguousarray(value).astype(shape.dtype)
    ignored = (*ALWAYS_IGNORED, *ignore_unexpected)
    unexpected = [
        f"{k} (shape {tuple(np.shape(v))})"
        for k, v in sorted(tensors.items())
        if k not in used and not any(re.search(p, k) for p in ignored)
    ]
    if missing or mismatched or unexpected:
        parts = [f"checkpoint does not fit {type(model).__name__}:"]
        if mismatched:
            parts.append(_listing("tensors with the wrong shape", mismatched))
        if missing:
            parts.append(
                _listing("tensors missing from the checkpoint", missing)
                + "\n    (an incomplete checkpoint: download or export config.model.pretrained "
                "again)"
            )
        if unexpected:
            parts.append(
                _listing("tensors in the checkpoint the model does not use", unexpected)
                + "\n    (config.model.pretrained holds another model than its config.json "
                "describes, or config.model.hf_config changed its sizes)"
            )
        raise HFImportError("\n".join(parts))
    if fresh:
        init = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0) if rng is None else rng, sample))
        flat_init = tree.flatten(init)
        out.update({p: np.asarray(flat_init[p]) for p in fresh})
    return tree.unflatten(out)


MODELS: dict[str, type[nn.Module]] = {"bert": Bert, "vit": ViT, "resnet": ResNet}


def load_hf_encoder(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_missing: Sequence[str] = (),
    ignore_unexpected: Sequence[str] = (),
    rng: jax.Array | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, dict]]:
    """(model, variables) from a HF BERT / ViT / ResNet directory (or hub id at ``revision``).

    ``overrides`` go to the model's ``from_hf_config`` (``dtype=jnp.bfloat16``, ``num_labels=10``,
    ``hidden_dropout=0.0``, ...). ``variables`` holds ``params`` (and ``batch_stats`` for ResNet)
    as float32 numpy arrays.
    """
    config, tensors = read_checkpoint(path, revision=revision)
    model_type = config.get("model_type")
    if model_type not in MODELS:
        raise HFImportError(
            f"{path}: model_type {model_type!r} is not an encoder this loader knows "
            f"({', '.join(MODELS)})"
        )
    model = MODELS[model_type].from_hf_config(config, **overrides)
    variables = convert_state_dict(
        model,
        tensors,
        num_channels=config.get("num_channels", 3),
        allow_missing=allow_missing,
        ignore_unexpected=ignore_unexpected,
        rng=rng,
    )
    return model, variables
