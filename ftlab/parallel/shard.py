"""Shardings for a whole ``TrainState`` and its batches, and steps jitted with them.

Every sharding is derived from the logical axis names the model puts on its weights, through
the one table in ``rules``:

- trained and frozen base parameters take their own logical axes;
- LoRA ``a`` (``*kernel[:-1], r``) takes the kernel's input axes and ``b`` (``r, out``) its
  output axis, so the low-rank branch is split exactly like the layer it adapts;
- DoRA magnitudes and IA3 vectors take their kernel's output axis (IA3 on the input side:
  its input axis);
- optimizer state leaves that mirror a trainable leaf (same path suffix, same shape: adam's
  ``mu``/``nu``, momentum, adafactor's unfactored ``v``) follow it; the rest (step counts,
  adafactor's factored row/column statistics) are replicated;
- the step counter, the rng and unannotated leaves (BatchNorm statistics) are replicated.

With these, ``jax.jit`` runs the unchanged, pure train step SPMD over the mesh (pjit
semantics): XLA inserts the all-gathers and reduce-scatters that fsdp and tensor
parallelism need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab.config import ConfigError
from ftlab.methods import Method
from ftlab.parallel import rules as rules_lib
from ftlab.train.state import TrainState

Axes = tuple[str | None, ...] | None  # logical names per dimension; None: no annotation
AnyMesh = Mesh | AbstractMesh  # an abstract mesh gives shardings and shapes, not placement


# -- logical axes -------------------------------------------------------------------------


def _path_str(path) -> str:
    """``"h_0/attn/q_proj/kernel"`` from a jax key path of dict keys."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(boxed: Any) -> dict[str, Axes]:
    """``{path: logical names}`` of a boxed variables tree (``model.init`` under eval_shape)."""
    flat = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    return {
        _path_str(path): tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None
        for path, leaf in flat
    }


def lora_axes(kernel: Axes, factor: str) -> Axes:
    """LoRA ``a`` keeps the kernel's input axes, ``b`` its output axis; the rank is replicated."""
    if kernel is None:
        return None
    return (*kernel[:-1], "lora_rank") if factor == "a" else ("lora_rank", kernel[-1])


def scale_axes(kernel: Axes, side: str) -> Axes:
    """A DoRA magnitude (``m``) or IA3 ``out`` vector takes the kernel's output axis, an IA3
    ``in`` vector its input-channel axis (``ftlab.methods.dora`` / ``ia3``)."""
    if kernel is None:
        return None
    return (kernel[-2],) if side == "in" else (kernel[-1],)


def mesh_spec(axes: Axes, shape: tuple[int, ...], mesh: AnyMesh, rules=rules_lib.RULES) -> P:
    """The ``PartitionSpec`` of one array with logical ``axes`` on ``mesh``.

    A mesh axis is used once per array; a dimension not divisible by its mesh axes drops
    them from the last until it is (at worst: replicated), so any model runs on any mesh.
    """
    if axes is None:
        return P()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        candidates = [] if name is None else list(rules_lib.lookup(name, rules))
        candidates = [a for a in candidates if a not in used and mesh.shape[a] > 1]
        while candidates and size % math.prod(mesh.shape[a] for a in candidates):
            candidates.pop()
        used.update(candidates)
        spec.append(tuple(candidates) if len(candidates) > 1 else (candidates or [None])[0])
    return P(*spec)


# -- the train state ----------------------------------------------------------------------


def init_state_fn(
    method: Method, tx: optax.GradientTransformation, seed: int
) -> Callable[[Any, Any], TrainState]:
    """``(params, model_state) -> TrainState``: split by the method, optimizer state for the
    trainable part only. Jit it with ``out_shardings`` to create the state already sharded."""

    def init(params, model_state):
        trainable, frozen = method.split(params, jax.random.key(seed + 1))
        return TrainState.create(trainable, frozen, tx, seed, model_state)

    return init


def abstract_state(init: Callable[[Any, Any], TrainState], variables: Mapping) -> TrainState:
    """The state's shapes and dtypes from the (boxed or plain) ``model.init`` shapes: no
    weights are allocated."""
    plain = nn.meta.unbox(dict(variables))
    params = plain.pop("params")
    return jax.eval_shape(init, params, plain)


def state_shardings(
    abstract: TrainState, variables: Mapping, mesh: AnyMesh, rules=rules_lib.RULES
) -> TrainState:
    """A ``TrainState`` of ``NamedSharding``s for ``abstract`` (see ``abstract_state``).

    ``variables`` is the boxed output of ``jax.eval_shape(model.init, ...)``: its logical
    axis names decide the parameters' shardings (unannotated leaves are replicated).
    """
    axes = logical_axes(dict(variables))
    replicated = NamedSharding(mesh, P())

    def named(leaf_axes: Axes, leaf) -> NamedSharding:
        return NamedSharding(mesh, mesh_spec(leaf_axes, leaf.shape, mesh, rules))

    def trainable_leaf(path, leaf) -> NamedSharding:
        top, rest = _path_str(path).split("/", 1)
        if top == "params":
            return named(axes.get(f"params/{rest}"), leaf)
        if top == "lora":
            kernel, factor = rest.rsplit("/", 1)
            return named(lora_axes(axes.get(f"params/{kernel}"), factor), leaf)
        if top in ("dora", "ia3"):  # a vector per output unit ("in": per input channel)
            kernel, side = rest.rsplit("/", 1)
            return named(scale_axes(axes.get(f"params/{kernel}"), side), leaf)
        if top == "prompt":  # a soft prompt (v, embed): small, replicated
            return named(None, leaf)
        raise ValueError(f"unexpected trainable leaf {top}/{rest}")

    def frozen_leaf(path, leaf) -> NamedSharding:
        leaf_axes = axes.get(f"params/{_path_str(path)}")
        if leaf_axes is None and isinstance(path[-1], jax.tree_util.GetAttrKey):
            # a quantised kernel's packed codes / scales (ftlab.methods.quantize): its axes
            kernel = axes.get(f"params/{_path_str(path[:-1])}")
            leaf_axes = kernel if kernel is not None and len(kernel) == len(leaf.shape) else None
        return named(leaf_axes, leaf)

    trainable = jax.tree_util.tree_map_with_path(trainable_leaf, abstract.trainable)
    frozen = jax.tree_util.tree_map_with_path(frozen_leaf, abstract.frozen)
    model_state = jax.tree_util.tree_map_with_path(
        lambda path, leaf: named(axes.get(_path_str(path)), leaf), abstract.model_state
    )
    return abstract.replace(
        step=replicated,
        rng=replicated,
        trainable=trainable,
        frozen=frozen,
        opt_state=opt_state_shardings(abstract.opt_state, abstract.trainable, trainable, mesh),
        model_state=model_state,
    )


def opt_state_shardings(opt_state: Any, trainable: Any, shardings: Any, mesh: AnyMesh) -> Any:
    """Optimizer-state leaves that mirror a trainable leaf get its sharding, others replicate.

    A leaf mirrors a parameter when the trailing dict keys of its path are the parameter's
    path and the shapes agree; this holds for any optax chain, masked or not.
    """
    by_path = {
        _path_str(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(trainable)[0],
            jax.tree_util.tree_leaves(shardings),
        )
    }
    replicated = NamedSharding(mesh, P())

    def leaf_sharding(path, leaf) -> NamedSharding:
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(str(k.key))
        shape, sharding = by_path.get("/".join(reversed(keys)), (None, replicated))
        return sharding if shape == tuple(leaf.shape) else replicated

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct``s carrying their shardings: a restore target, or lowering input."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
    )


# -- batches ------------------------------------------------------------------------------


def batch_sharding(mesh: AnyMesh, rules=rules_lib.RULES) -> NamedSharding:
    """Leading (example) dimension split over the ``batch`` rule's mesh axes."""
    axes = rules_lib.lookup("batch", rules)
    return NamedSharding(mesh, P(axes if len(axes) > 1 else (axes or (None,))[0]))


def _shards(mesh: AnyMesh | Mapping[str, int], rules) -> tuple[int, str]:
    """How many ways the batch is split, and the sizes that make it (for messages)."""
    shape = dict(getattr(mesh, "shape", mesh))
    axes = rules_lib.lookup("batch", rules)
    sizes = " x ".join(f"{a}={shape.get(a, 1)}" for a in axes)
    return math.prod(shape.get(a, 1) for a in axes), sizes


def check_batch(
    batch_size: int,
    mesh: AnyMesh | Mapping[str, int],
    accum_steps: int = 1,
    key: str = "config.train.batch_size",
    rules=rules_lib.RULES,
) -> None:
    """Raise ``ConfigError`` (with the numbers) when a (micro-)batch does not split evenly
    over the mesh's batch shards; call it before compiling anything."""
    shards, sizes = _shards(mesh, rules)
    if batch_size % accum_steps:
        raise ConfigError(
            f"{key}: {batch_size} is not divisible by config.optim.accum_steps={accum_steps}"
        )
    micro = batch_size // accum_steps
    if micro % shards:
        what = (
            f"{batch_size}"
            if accum_steps == 1
            else f"{batch_size} / {accum_steps} micro-batches = {micro}"
        )
        raise ConfigError(
            f"{key}: {what} examples do not split over the {shards} batch shards of the mesh "
            f"({sizes}); use a multiple of {shards * accum_steps}"
        )


def abstract_batch(batch: Any, sharding: NamedSharding) -> Any:
    """``ShapeDtypeStruct``s of a host batch with the batch sharding (for lowering/planning)."""

    def leaf(x):
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

    return jax.tree.map(leaf, batch)


def shard_batch(batch: Any, sharding: NamedSharding, key: str = "batch") -> Any:
    """Place a host batch (numpy leaves) on the mesh, split along the examples.

    Single process: the batch is the global batch. Several processes: each passes its own
    slice and the global batch is their concatenation (``make_array_from_process_local_data``).
    """
    shards, sizes = _shards(sharding.mesh, rules_lib.RULES)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        n = np.shape(leaf)[0] * jax.process_count() if np.ndim(leaf) else None
        if n is None or n % shards:
            raise ConfigError(
                f"{key}/{_path_str(path)}: leading dimension {n} does not split over the "
                f"{shards} batch shards of the mesh ({sizes})"
            )
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# -- jitted steps -------------------------------------------------------------------------


def jit_train_step(
    train_step: Callable, state_shardings: TrainState, batch_sharding: NamedSharding
) -> Callable:
    """``train_step`` jitted SPMD over the mesh: state in and out with its shardings (donated,
    so parameters and optimizer state are updated in place), metrics replicated."""
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def jit_eval_step(
    eval_step: Callable, state_shardings: TrainState, batch_sharding: NamedSharding
) -> Callable:
    """``eval_step`` jitted over the mesh; per-example outputs stay split like the batch."""
    return jax.jit(
        eval_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=batch_sharding,
    )
