"""What the encoder families (BERT, ViT, ResNet, EfficientNet) share: building from config.json with the
head as ``num_labels``, labels for a config written from an ftlab model, and the names their
task models use, and the PyTorch BatchNorm buffers written on export."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

HEADS = {"classifier": "classifier/"}
IGNORE = (r".*\.num_batches_tracked", r".*\.position_ids")  # PyTorch buffers


def builder(cls: type[nn.Module]) -> Callable:
    """``Family.build`` for an encoder: ``head="none"`` is ``num_labels=0`` (the backbone)."""

    def build(hf: dict, head: str, options: dict, overrides: dict) -> nn.Module:
        if head == "lm":
            raise ValueError(f"a {hf.get('model_type')} model has no causal-LM head")
        overrides = {**overrides, **({"num_labels": 0} if head == "none" else {})}
        return cls.from_hf_config(hf, **{**options, **overrides})

    return build


def architectures(task: str, bare: str) -> dict[str, Any]:
    """``Family.architectures`` and ``head_of_arch`` for a task model and its bare backbone."""
    return {
        "architectures": {"classifier": task, "none": bare},
        "head_of_arch": {task: "classifier", bare: "none"},
    }


def common_config(model_type: str, model: nn.Module, task: str, bare: str) -> dict[str, Any]:
    """The fields every encoder's config.json has: type, architecture and labels."""
    n = model.num_labels
    labels = (
        {
            "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
            "label2id": {f"LABEL_{i}": i for i in range(n)},
        }
        if n
        else {}
    )
    return {"model_type": model_type, "architectures": [task if n else bare], **labels}


def batch_norm_buffers(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``num_batches_tracked`` beside each BatchNorm's running mean, as PyTorch saves it."""
    return {
        name.removesuffix("running_mean") + "num_batches_tracked": np.zeros((), np.int64)
        for name in tensors
        if name.endswith(".running_mean")
    }
