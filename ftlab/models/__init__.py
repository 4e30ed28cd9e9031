"""Model registry: config name -> Flax module. Models know nothing of methods, data or interop.

Hugging Face families (``model.name = "hf"``) are built from their ``config.json`` by
``ftlab.interop.build.build_model``, which hands every other name to this registry.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections as mc

from ftlab.models.cnn import MLP, SmallCNN


def build_model(
    cfg: mc.ConfigDict, num_outputs: int, dtype: jnp.dtype, task: str = "classification"
):
    """The module named by ``cfg.name``, computing in ``dtype`` (parameters stay float32)."""
    if cfg.name == "hf":  # GPT-2, LLaMA, BERT, ViT, ResNet as Hugging Face configures them
        raise ValueError(
            "model.name='hf' is built from its config.json by ftlab.interop.build.build_model"
        )
    if cfg.name == "cnn":
        return SmallCNN(
            num_outputs,
            tuple(cfg.features),
            tuple(cfg.hidden),
            dropout=cfg.dropout,
            dtype=dtype,
        )
    if cfg.name == "resnet":  # small ResNet (basic blocks, BatchNorm) for image experiments
        from ftlab.models.resnet import ResNet

        return ResNet(
            depths=tuple(cfg.depths),
            hidden_sizes=tuple(cfg.features),
            embedding_size=cfg.features[0],
            layer_type="basic",
            dropout=cfg.dropout,
            num_labels=num_outputs,
            dtype=dtype,
        )
    if cfg.name == "mlp":
        return MLP(num_outputs, tuple(cfg.hidden), dropout=cfg.dropout, dtype=dtype)
    raise ValueError(f"unknown model {cfg.name!r}")
