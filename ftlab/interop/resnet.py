"""ResNet (``model_type`` ``resnet``): ``ftlab.models.resnet.ResNet`` and its one name table.

HF numbers layers within each stage (``encoder.stages.1.layers.0``), ftlab numbers blocks
across the network (``stage_1/block_3``), so the table is spelled out for the configured
depths. BatchNorm running statistics travel in ``batch_stats``; on export each BatchNorm also
gets the int64 ``num_batches_tracked`` PyTorch saves (0: ftlab does not count batches, and
PyTorch reads it only with ``momentum=None``, which HF's ResNet does not use).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ftlab.interop import _encoder
from ftlab.interop.errors import HFExportError
from ftlab.interop.family import Family, register_family
from ftlab.interop.table import CONV, Entry, Table, batch_norm, linear, rows
from ftlab.models.resnet import ResNet

TASK, BARE = "ResNetForImageClassification", "ResNetModel"


def _conv_norm(hf: str, conv: str, norm: str) -> list[Entry]:
    return [
        Entry(f"{hf}.convolution.weight", f"{conv}/kernel", CONV),
        *batch_norm(f"{hf}.normalization", norm),
    ]


def table(config: Mapping[str, Any]) -> Table:
    """The rows for the depths and block type of ``config``."""
    depths = list(config.get("depths") or ResNet.depths)
    convs = 3 if config.get("layer_type", "bottleneck") == "bottleneck" else 2
    out = [*_conv_norm("embedder.embedder", "stem_conv", "stem_norm")]
    block = 0
    for s, depth in enumerate(depths):
        for j in range(depth):
            hf, ours = f"encoder.stages.{s}.layers.{j}", f"stage_{s}/block_{block}"
            out += _conv_norm(f"{hf}.shortcut", f"{ours}/shortcut_conv", f"{ours}/shortcut_norm")
            for k in range(convs):
                out += _conv_norm(f"{hf}.layer.{k}", f"{ours}/conv_{k}", f"{ours}/norm_{k}")
            block += 1
    return Table(rows(out, linear("classifier.1", "classifier", head=True)))


def config_of(model: ResNet) -> dict[str, Any]:
    """config.json for an ftlab ``ResNet``; a field HF cannot express is an error. Its
    ``dropout`` before the classifier has no HF counterpart; it does nothing at inference."""
    if model.norm_eps != 1e-5:
        raise HFExportError(
            f"ResNet norm_eps={model.norm_eps}: Hugging Face's ResNet BatchNorm uses 1e-5"
        )
    return {
        **_encoder.common_config("resnet", model, TASK, BARE),
        **({"num_channels": model.num_channels} if model.num_channels else {}),
        "embedding_size": model.embedding_size,
        "hidden_sizes": list(model.hidden_sizes),
        "depths": list(model.depths),
        "layer_type": model.layer_type,
        "hidden_act": model.hidden_act,
        "downsample_in_first_stage": model.downsample_in_first_stage,
        "downsample_in_bottleneck": model.downsample_in_bottleneck,
    }


def example_inputs(model: ResNet) -> Any:
    return jnp.zeros((1, 32, 32, model.num_channels or 3), jnp.float32)


FAMILY = register_family(
    Family(
        model_type="resnet",
        build=_encoder.builder(ResNet),
        table=table,
        example_inputs=example_inputs,
        prefix="resnet.",
        heads=_encoder.HEADS,
        **_encoder.architectures(TASK, BARE),
        default_head="classifier",
        bare_default="none",
        options=("dtype", "param_dtype"),
        collections=("params", "batch_stats"),
        ignore=_encoder.IGNORE,
        droppable=(r"classifier/.*",),
        fresh=(r"classifier/.*",),
        buffers=_encoder.batch_norm_buffers,
        config_of=config_of,
        model_class=ResNet,
    )
)
