"""EfficientNet (``model_type`` ``efficientnet``): ``ftlab.models.efficientnet.EfficientNet`` and
its one name table.

HF numbers blocks across the network (``encoder.blocks.7``) as ftlab does (``block_7``), so
the rows are templates that hold for every configuration; a block without expansion simply has
no ``expand_*`` tensors. BatchNorm running statistics travel in ``batch_stats``; on export each
BatchNorm also gets the int64 ``num_batches_tracked`` PyTorch saves (0: ftlab does not count
batches, and PyTorch reads it only with ``momentum=None``, which HF's EfficientNet does not use).

A ``scan_layers=True`` model's trees (each stage's later blocks stacked as
``blocks_<first>_to_<last>``, in ``params`` and ``batch_stats``) convert as the decoders' do
with ``stack_layers``: import the per-block model, then ``stack_blocks(tree, model)`` per
collection. ``export_hf`` takes the scanned trees as they are: ``unstack_blocks``
(``ftlab.models.efficientnet``, the family's ``unscan``) gives back the per-block trees this
table names, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ftlab.interop import _encoder
from ftlab.interop.family import Family, register_family
from ftlab.interop.table import CONV, Entry, Table, batch_norm, linear, rows
from ftlab.models.efficientnet import EfficientNet, unstack_blocks

TASK, BARE = "EfficientNetForImageClassification", "EfficientNetModel"
BLOCK = "encoder.blocks.{i}"

TABLE = Table(
    rows(
        Entry("embeddings.convolution.weight", "stem_conv/kernel", CONV),
        batch_norm("embeddings.batchnorm", "stem_norm"),
        Entry(f"{BLOCK}.expansion.expand_conv.weight", "block_{i}/expand_conv/kernel", CONV),
        batch_norm(f"{BLOCK}.expansion.expand_bn", "block_{i}/expand_norm"),
        Entry(
            f"{BLOCK}.depthwise_conv.depthwise_conv.weight", "block_{i}/depthwise_conv/kernel", CONV
        ),
        batch_norm(f"{BLOCK}.depthwise_conv.depthwise_norm", "block_{i}/depthwise_norm"),
        Entry(
            f"{BLOCK}.squeeze_excite.{{se:reduce|expand}}.weight", "block_{i}/se_{se}/kernel", CONV
        ),
        Entry(f"{BLOCK}.squeeze_excite.{{se:reduce|expand}}.bias", "block_{i}/se_{se}/bias"),
        Entry(f"{BLOCK}.projection.project_conv.weight", "block_{i}/project_conv/kernel", CONV),
        batch_norm(f"{BLOCK}.projection.project_bn", "block_{i}/project_norm"),
        Entry("encoder.top_conv.weight", "top_conv/kernel", CONV),
        batch_norm("encoder.top_bn", "top_norm"),
        linear("classifier", "classifier", head=True),
    )
)


def table(config: Mapping[str, Any]) -> Table:
    """The rows (the same for every configuration)."""
    return TABLE


def config_of(model: EfficientNet) -> dict[str, Any]:
    """config.json for an ftlab ``EfficientNet`` (``hidden_dim`` written as the top conv's
    width). ``drop_connect_mode`` and ``remat`` have no HF counterpart; neither changes
    inference."""
    fields = {
        name: list(value) if isinstance(value, tuple) else value
        for name in EfficientNet.HF_FIELDS
        if (value := getattr(model, name)) is not None
    }
    return {
        **_encoder.common_config("efficientnet", model, TASK, BARE),
        **fields,
        "hidden_dim": model.top_dim,
    }


def example_inputs(model: EfficientNet) -> Any:
    return jnp.zeros((1, 64, 64, model.num_channels or 3), jnp.float32)


FAMILY = register_family(
    Family(
        model_type="efficientnet",
        build=_encoder.builder(EfficientNet),
        table=table,
        example_inputs=example_inputs,
        prefix="efficientnet.",
        heads=_encoder.HEADS,
        **_encoder.architectures(TASK, BARE),
        default_head="classifier",
        bare_default="none",
        options=("dtype", "param_dtype", "remat"),
        collections=("params", "batch_stats"),
        ignore=_encoder.IGNORE,
        droppable=(r"classifier/.*",),
        fresh=(r"classifier/.*",),
        buffers=_encoder.batch_norm_buffers,
        config_of=config_of,
        model_class=EfficientNet,
        unscan=unstack_blocks,
    )
)
