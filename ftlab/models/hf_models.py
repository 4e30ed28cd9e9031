"""Hugging Face families (GPT-2, LLaMA, BERT, ViT, ResNet) from ``config.model``.

``model.name = "hf"`` builds the family named by a config's ``model_type``:

- ``model.pretrained``: a local Hugging Face directory (or a hub id, online only) whose
  ``config.json`` describes the model and whose safetensors hold the weights;
- ``model.hf_config``: Hugging Face config fields laid over that ``config.json`` (dropout,
  ``num_labels`` ...), or, without ``pretrained``, the whole config of a freshly initialised
  model (``model_type`` included) -- what a ``runlocal`` config uses to shrink a recipe.

The task picks the head: a causal LM keeps the LM head; classification gets a new classifier
sized to the data's classes (any head in the checkpoint with another shape is dropped).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from ftlab import tree
from ftlab.config import ConfigError
from ftlab.models import hf_import
from ftlab.models.hf_import import HFImportError

ENCODERS = ("bert", "vit", "resnet")
_HEADS = {"bert": r"classifier\.", "vit": r"classifier\.", "resnet": r"classifier\.1\."}
DECODERS = ("gpt2", "llama")


def hf_config(cfg: mc.ConfigDict) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (when ``model.pretrained``) updated by ``model.hf_config``."""
    overrides = cfg.hf_config.to_dict() if isinstance(cfg.hf_config, mc.ConfigDict) else {}
    base: dict[str, Any] = {}
    if cfg.pretrained:
        try:
            base = hf_import.read_config(hf_import.resolve(cfg.pretrained))
        except HFImportError as e:
            raise ConfigError(f"config.model.pretrained: {e}") from None
    merged = {**base, **overrides}
    model_type = merged.get("model_type")
    if model_type not in ENCODERS + DECODERS:
        where = "config.model.hf_config.model_type" if not base else "config.model.pretrained"
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not one ftlab builds; "
            f"choose one of {', '.join(DECODERS + ENCODERS)}"
        )
    return merged


def head_for(task: str) -> str:
    return "lm" if task == "causal_lm" else "classifier"


def remat_setting(cfg: mc.ConfigDict) -> bool | str:
    """The models' ``remat`` from ``model.remat_policy`` (none | dots | full); the older
    ``model.remat = True`` means ``full`` when no policy is named."""
    policy = cfg.get("remat_policy", "none")
    return "full" if (policy == "none" and cfg.remat) else policy


def build_hf_model(cfg: mc.ConfigDict, task: str, num_outputs: int, dtype: Any) -> nn.Module:
    """The Flax module for ``model.pretrained`` / ``model.hf_config`` and the task's head
    (``model.attention`` and ``model.remat_policy`` passed to the transformer families)."""
    config = hf_config(cfg)
    remat, attention_impl = remat_setting(cfg), cfg.get("attention", "auto")
    model_type = config["model_type"]
    head = head_for(task)
    if head == "lm" and model_type in ENCODERS:
        raise ConfigError(f"config.model: a {model_type} model has no causal-LM head")
    try:
        if model_type in DECODERS:
            family = hf_import.get_family(model_type)
            extra = {"num_labels": num_outputs} if head == "classifier" else {}
            ftlab_config = family.config_from_hf(config, **extra)
            return family.build(
                ftlab_config,
                head=head,
                dtype=dtype,
                param_dtype=jnp.float32,
                remat=remat,
                attention_impl=attention_impl,
            )
        from ftlab.models.hf_import_encoders import MODELS

        extra = {"remat": remat, "attention_impl": attention_impl} if model_type != "resnet" else {}
        return MODELS[model_type].from_hf_config(
            config, num_labels=num_outputs, dtype=dtype, **extra
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config.model.hf_config: cannot build a {model_type} model: {e}") from e


def load_hf_variables(
    cfg: mc.ConfigDict, model: nn.Module, sample: Any, rng: jax.Array
) -> tuple[dict, list[str]]:
    """``model``'s variables with ``model.pretrained``'s weights; a new head stays fresh (``rng``).

    Returns (variables, notes on what was dropped or initialised fresh).
    """
    try:
        return _load_hf_variables(cfg, model, sample, rng)
    except HFImportError as e:
        raise HFImportError(f"config.model.pretrained={cfg.pretrained}: {e}") from None


def _load_hf_variables(
    cfg: mc.ConfigDict, model: nn.Module, sample: Any, rng: jax.Array
) -> tuple[dict, list[str]]:
    config = hf_config(cfg)
    model_type = config["model_type"]
    directory = hf_import.resolve(cfg.pretrained)
    if model_type in DECODERS:
        family = hf_import.get_family(model_type)
        tensors = hf_import.iter_tensors(directory)
        return hf_import.model_variables(family, model, sample, tensors, rng)
    from ftlab.models.hf_import_encoders import convert_state_dict

    tensors = dict(hf_import.iter_tensors(directory))
    expected = tree.flatten(nn.meta.unbox(hf_import.abstract_variables(model, sample)))
    # a checkpoint head for other classes (ImageNet's 1000) is dropped; the new one stays fresh
    new_head = sorted(
        tuple(s.shape) for p, s in expected.items() if p.startswith("params/classifier/")
    )
    old_head = sorted(
        tuple(np.shape(v))[::-1] for k, v in tensors.items() if re.match(_HEADS[model_type], k)
    )
    drop_head = bool(old_head) and old_head != new_head
    if drop_head:
        tensors = {k: v for k, v in tensors.items() if not re.match(_HEADS[model_type], k)}
    variables = convert_state_dict(
        model,
        tensors,
        num_channels=config.get("num_channels", 3),
        allow_missing=(r"^classifier/",),
        ignore_unexpected=(r"^cls\.",),  # BERT's pre-training heads
        rng=rng,
    )
    notes = (
        [f"dropped the checkpoint's head {old_head} for a new one {new_head}"] if drop_head else []
    )
    return variables, notes


_ARCHITECTURES = {
    ("gpt2", "lm"): "GPT2LMHeadModel",
    ("gpt2", "classifier"): "GPT2ForSequenceClassification",
    ("llama", "lm"): "LlamaForCausalLM",
    ("llama", "classifier"): "LlamaForSequenceClassification",
    ("bert", "classifier"): "BertForSequenceClassification",
    ("vit", "classifier"): "ViTForImageClassification",
    ("resnet", "classifier"): "ResNetForImageClassification",
}


def export_config(cfg: mc.ConfigDict, task: str, class_names: list[str]) -> dict[str, Any]:
    """The ``config.json`` of a fine-tuned model: the source's, with the task's head and labels."""
    config = hf_config(cfg)
    head = head_for(task)
    config["architectures"] = [_ARCHITECTURES[(config["model_type"], head)]]
    if head == "classifier":
        config["id2label"] = {str(i): name for i, name in enumerate(class_names)}
        config["label2id"] = {name: i for i, name in enumerate(class_names)}
        config["num_labels"] = len(class_names)
    return config
