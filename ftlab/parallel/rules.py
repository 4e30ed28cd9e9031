"""The one table mapping logical axis names to mesh axes.

Models name each weight dimension (``nn.with_logical_partitioning``); this table decides
where each name goes, so the parallelism of every model changes here and nowhere else:

- ``fsdp`` shards the model width (``embed``): every weight is split across the fsdp
  devices and gathered just in time (ZeRO-3 style), and so are its gradients and
  optimizer state;
- ``tensor`` shards the wide inner dimensions (heads, MLP, vocabulary: Megatron style);
- ``batch`` is split over ``data`` and ``fsdp`` (fsdp devices also see different examples);
- anything small or ragged (positions, classes, the LoRA rank) is replicated.

A dimension whose size is not divisible by its mesh axes falls back to fewer axes (in the
end: replicated), e.g. GPT-2's 50257-token vocabulary over ``tensor=2``.
"""

from __future__ import annotations

MeshAxes = str | tuple[str, ...] | None

RULES: tuple[tuple[str, MeshAxes], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    # transformer weights
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("pooler", "tensor"),
    ("positions", None),
    ("position", None),
    ("token_type", None),
    ("classes", None),
    # convolutions (ResNet, ViT patches)
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    # method-owned leaves
    ("lora_rank", None),
)


def lookup(name: str, rules=RULES) -> tuple[str, ...]:
    """The mesh axes of logical axis ``name`` (empty: replicated); unknown names are errors."""
    table = dict(rules)
    if name not in table:
        raise KeyError(
            f"logical axis {name!r} has no sharding rule; add it to ftlab/parallel/rules.py "
            f"(known: {', '.join(sorted(table))})"
        )
    axes = table[name]
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)
