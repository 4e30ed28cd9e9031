"""Export BERT, ViT and ResNet trees as Hugging Face tensors (the inverse of ``hf_import_encoders``).

``export_hf`` (``ftlab.models.hf_export``) hands trees of ``model_type`` ``bert``, ``vit`` and
``resnet`` to ``encoder_tensors``. Names come from the importer's own key functions
(``hf_import_encoders.keys_for``), so the two directions cannot drift apart; values are converted
back to PyTorch layouts (``Dense.kernel`` (in, out) -> ``Linear.weight`` (out, in), ``Conv``
HWIO -> OIHW). A ResNet's BatchNorm ``running_mean``/``running_var`` come from the
``batch_stats`` collection (``model_state``), and each norm gets the int64 ``num_batches_tracked``
buffer PyTorch saves; ftlab does not count batches, so it is 0 (PyTorch reads it only when
``momentum=None``, which HF's ResNet does not use).

The base-model prefix (``bert.``, ``vit.``, ``resnet.``) is written when the tree has a
``classifier`` (a ``*For*Classification`` model) and left out for a bare backbone, as
``save_pretrained`` does. Before anything is returned the tensors are imported again with
``hf_import_encoders.convert_state_dict`` into the model ``hf_config`` describes, and must give
back every leaf bit for bit: a config that does not fit the weights (sizes, label count) or a
leaf without a Hugging Face name is an ``HFExportError``.

``encoder_hf_config(model)`` writes the config dict for an encoder built in ftlab (for example
the trainer's small ResNet), so such a model can be exported without a source config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from ftlab import tree
from ftlab.models.bert import Bert
from ftlab.models.hf_export import HFExportError, config_dict
from ftlab.models.hf_import import HFImportError
from ftlab.models.hf_import_encoders import MODELS, base_name, convert_state_dict, keys_for
from ftlab.models.layers import num_labels
from ftlab.models.resnet import ResNet
from ftlab.models.vit import ViT

ENCODER_TYPES = tuple(MODELS)  # bert, vit, resnet

# (task architecture with a classifier, bare backbone) per model type, as transformers names them.
ARCHITECTURES = {
    "bert": ("BertForSequenceClassification", "BertModel"),
    "vit": ("ViTForImageClassification", "ViTModel"),
    "resnet": ("ResNetForImageClassification", "ResNetModel"),
}


def to_torch(array: np.ndarray, kind: str) -> np.ndarray:
    """The inverse of the importer's conversion: ``linear`` (in, out) -> (out, in), ``conv``
    HWIO -> OIHW, ``plain`` unchanged."""
    if kind == "linear":
        return array.T
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    return array


def _check_architectures(config: Mapping[str, Any], model_type: str, headed: bool) -> None:
    archs = list(config.get("architectures") or ())
    task, bare = ARCHITECTURES[model_type]
    other = sorted(set(archs) - {task, bare})
    if other:
        raise HFExportError(
            f"hf_config architectures {other}: ftlab exports a {model_type} model only as "
            f"{task} or {bare}"
        )
    if headed and bare in archs:
        raise HFExportError(
            f"params have a classifier but hf_config architectures say {bare}; use {task}"
        )
    if not headed and task in archs:
        raise HFExportError(
            f"hf_config architectures say {task} but params have no classifier/kernel"
        )


def _model(config: Mapping[str, Any], model_type: str, params: Mapping[str, Any]) -> nn.Module:
    """The ftlab model ``config`` describes, with the head the tree actually has."""
    head = params.get("classifier")
    labels = int(np.shape(head["kernel"])[-1]) if isinstance(head, Mapping) else 0
    if labels:
        declared = num_labels(config, labels)
        if declared != labels:
            raise HFExportError(
                f"hf_config declares {declared} labels (id2label / num_labels) but "
                f"params/classifier/kernel has {labels} outputs; set id2label (or num_labels) "
                "in the config to the fine-tuned task's labels"
            )
    overrides: dict[str, Any] = {"num_labels": labels}
    if model_type == "bert":
        overrides["add_pooler"] = "pooler" in params
    try:
        return MODELS[model_type].from_hf_config(dict(config), **overrides)
    except (KeyError, TypeError, ValueError) as e:
        raise HFExportError(f"hf_config does not describe a {model_type} model: {e}") from e


def encoder_tensors(
    params: Mapping[str, Any],
    hf_config: Any,
    *,
    model_state: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """``{HF name: array}`` for a BERT / ViT / ResNet tree (float32; int64 BatchNorm counters).

    ``params``: the ``params`` collection; ``model_state``: the other collections
    (``{"batch_stats": ...}``, required for ResNet and refused for the others).
    """
    config = config_dict(hf_config)
    model_type = config.get("model_type")
    if model_type not in ENCODER_TYPES:
        raise HFExportError(f"model_type {model_type!r} is not one of {ENCODER_TYPES}")
    state = dict(model_state or {})
    wanted = {"batch_stats"} if model_type == "resnet" else set()
    if set(state) != wanted:
        need = "model_state={'batch_stats': ...}" if wanted else "no model_state"
        raise HFExportError(
            f"a {model_type} export takes {need}; got collections {sorted(state) or 'none'}"
        )
    if not params:
        raise HFExportError("params is empty")
    params, state = nn.meta.unbox(dict(params)), nn.meta.unbox(state)  # init's boxes
    flat = {
        path: np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        for path, value in tree.flatten({"params": dict(params), **state}).items()
    }
    headed = "classifier" in params
    _check_architectures(config, model_type, headed)
    model = _model(config, model_type, params)

    key = keys_for(model, prefixed=headed)
    tensors: dict[str, np.ndarray] = {}
    for path in sorted(flat):
        try:
            name, kind = key(path)
        except (HFImportError, KeyError, ValueError):
            raise HFExportError(
                f"parameter {path!r} has no Hugging Face name for a {model_type} model"
            ) from None
        if name in tensors:
            raise HFExportError(f"{path!r}: HF tensor {name!r} written twice")
        tensors[name] = np.ascontiguousarray(to_torch(flat[path], kind))
        if name.endswith(".running_mean"):  # one per BatchNorm
            counter = name.removesuffix("running_mean") + "num_batches_tracked"
            tensors[counter] = np.zeros((), np.int64)

    try:
        back = convert_state_dict(model, tensors, num_channels=config.get("num_channels", 3))
    except HFImportError as e:
        raise HFExportError(
            f"the exported tensors do not import back into the model hf_config describes:\n{e}"
        ) from e
    back = tree.flatten(back)
    if back.keys() != flat.keys():
        diff = sorted(back.keys() ^ flat.keys())
        raise HFExportError(f"export does not re-import to the same leaves: {diff[:10]}")
    for path, value in flat.items():
        if back[path].shape != value.shape or not np.array_equal(back[path], value):
            raise HFExportError(f"leaf {path!r} does not survive export -> import unchanged")
    return tensors


def _labels(n: int) -> dict[str, Any]:
    if not n:
        return {}
    return {
        "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
        "label2id": {f"LABEL_{i}": i for i in range(n)},
    }


def encoder_hf_config(model: nn.Module, *, num_channels: int = 3) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict describing an ftlab ``Bert``, ``ViT`` or ``ResNet``
    (``architectures`` the task model when it has a classifier, else the bare backbone).

    A field HF cannot express is an error rather than a silent change (a ResNet whose
    BatchNorm epsilon is not HF's 1e-5). ftlab's ResNet ``dropout`` before the classifier has no
    HF counterpart; it does nothing at inference.
    """
    base = base_name(model)
    task, bare = ARCHITECTURES[base]
    common = {
        "model_type": base,
        "architectures": [task if model.num_labels else bare],
        **_labels(model.num_labels),
    }
    if isinstance(model, Bert):
        return {
            **common,
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
    if isinstance(model, ViT):
        return {
            **common,
            "image_size": model.image_size,
            "patch_size": model.patch_size,
            "num_channels": num_channels,
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
    assert isinstance(model, ResNet)
    if model.norm_eps != 1e-5:
        raise HFExportError(
            f"ResNet norm_eps={model.norm_eps}: Hugging Face's ResNet BatchNorm uses 1e-5"
        )
    return {
        **common,
        "num_channels": num_channels,
        "embedding_size": model.embedding_size,
        "hidden_sizes": list(model.hidden_sizes),
        "depths": list(model.depths),
        "layer_type": model.layer_type,
        "hidden_act": model.hidden_act,
        "downsample_in_first_stage": model.downsample_in_first_stage,
        "downsample_in_bottleneck": model.downsample_in_bottleneck,
    }
