"""Hugging Face families from ``config.model`` (``model.name = "hf"``).

- ``model.pretrained``: a local Hugging Face directory (or a hub id, online only) whose
  ``config.json`` describes the model and whose safetensors hold the weights;
- ``model.hf_config``: Hugging Face config fields laid over that ``config.json`` (dropout,
  ``num_labels`` ...), or, without ``pretrained``, the whole config of a freshly initialised
  model (``model_type`` included) -- what a ``runlocal`` config uses to shrink a recipe.

The task picks the head: a causal LM keeps the LM head; classification gets a new classifier
sized to the data's classes (a head in the checkpoint with another shape is dropped).
``build_model`` is the trainer's entry point: the HF families here, every other model from
the registry in ``ftlab.models`` (which reads no files and knows no interop).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc

from ftlab import models
from ftlab.config import ConfigError
from ftlab.interop import files, hub
from ftlab.interop.errors import HFImportError
from ftlab.interop.family import BUILTIN, get_family
from ftlab.interop.pretrained import build, model_variables

DECODERS = ("gpt2", "llama")
SEQ2SEQ = ("t5", "whisper")  # encoder-decoders: an LM head on the decoder
ENCODERS = tuple(t for t in BUILTIN if t not in DECODERS + SEQ2SEQ)


def hf_config(cfg: mc.ConfigDict) -> dict[str, Any]:
    """The checkpoint's ``config.json`` (when ``model.pretrained``) updated by ``model.hf_config``."""
    overrides = cfg.hf_config.to_dict() if isinstance(cfg.hf_config, mc.ConfigDict) else {}
    base: dict[str, Any] = {}
    if cfg.pretrained:
        try:
            base = hub.read_config(hub.resolve(cfg.pretrained))
        except HFImportError as e:
            raise ConfigError(f"config.model.pretrained: {e}") from None
    merged = {**base, **overrides}
    model_type = merged.get("model_type")
    if model_type not in BUILTIN:
        where = "config.model.hf_config.model_type" if not base else "config.model.pretrained"
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not one ftlab builds; "
            f"choose one of {', '.join(BUILTIN)}"
        )
    return merged


def head_for(task: str) -> str:
    return "lm" if task in ("causal_lm", "seq2seq") else "classifier"


def remat_setting(cfg: mc.ConfigDict) -> bool | str:
    """The models' ``remat`` from ``model.remat_policy`` (none | dots | full); the older
    ``model.remat = True`` means ``full`` when no policy is named."""
    policy = cfg.get("remat_policy", "none")
    return "full" if (policy == "none" and cfg.remat) else policy


def build_hf_model(cfg: mc.ConfigDict, task: str, num_outputs: int, dtype: Any) -> nn.Module:
    """The Flax module for ``model.pretrained`` / ``model.hf_config`` and the task's head
    (``model.attention`` and ``model.remat_policy`` passed to the families that take them)."""
    config = hf_config(cfg)
    model_type, head = config["model_type"], head_for(task)
    if head == "lm" and model_type not in (SEQ2SEQ if task == "seq2seq" else DECODERS):
        kind = "sequence-to-sequence" if task == "seq2seq" else "causal-LM"
        raise ConfigError(f"config.model: a {model_type} model has no {kind} head")
    options = {
        "dtype": dtype,
        "param_dtype": jnp.float32,
        "remat": remat_setting(cfg),
        "attention_impl": cfg.get("attention", "auto"),
    }
    extra = {"num_labels": num_outputs} if head == "classifier" else {}
    names: list[str] = []
    if cfg.pretrained:  # the checkpoint's names tell what config.json cannot (BERT's pooler)
        try:
            names = files.tensor_names(files.weight_files(hub.resolve(cfg.pretrained)))
        except HFImportError:
            pass  # the import names the problem when it reads the weights
    try:
        return build(
            get_family(model_type), config, head=head, names=names, options=options, **extra
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config.model.hf_config: cannot build a {model_type} model: {e}") from e


def build_model(
    cfg: mc.ConfigDict, num_outputs: int, dtype: Any, task: str = "classification"
) -> nn.Module:
    """The module named by ``cfg.name``: ``"hf"`` here, every other from ``ftlab.models``."""
    if cfg.name == "hf":
        return build_hf_model(cfg, task, num_outputs, dtype)
    return models.build_model(cfg, num_outputs, dtype, task)


def load_hf_variables(
    cfg: mc.ConfigDict, model: nn.Module, sample: Any, rng: jax.Array
) -> tuple[dict, list[str]]:
    """``model``'s variables with ``model.pretrained``'s weights; a new head stays fresh (``rng``),
    and a checkpoint head for other classes (ImageNet's 1,000) is dropped for it.

    Returns (variables, notes on what was dropped or initialised fresh).
    """
    try:
        config = hf_config(cfg)
        directory = hub.resolve(cfg.pretrained)
        tensors = files.iter_tensors(directory)
        return model_variables(
            model,
            tensors,
            config,
            family=get_family(config["model_type"]),
            inputs=sample,
            rng=rng,
            replace_heads=True,
        )
    except HFImportError as e:
        raise HFImportError(f"config.model.pretrained={cfg.pretrained}: {e}") from None


def export_config(cfg: mc.ConfigDict, task: str, class_names: list[str]) -> dict[str, Any]:
    """The ``config.json`` of a fine-tuned model: the source's, with the task's head and labels."""
    config = hf_config(cfg)
    head = head_for(task)
    config["architectures"] = [get_family(config["model_type"]).architectures[head]]
    if head == "classifier":
        config["id2label"] = {str(i): name for i, name in enumerate(class_names)}
        config["label2id"] = {name: i for i, name in enumerate(class_names)}
        config["num_labels"] = len(class_names)
    return config
