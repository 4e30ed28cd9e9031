"""Memory planner: per-device bytes of a train step, without allocating any weight.

Parameters, gradients, optimizer state and the batch are counted from shapes and shardings
(``jax.eval_shape``); activations and the step's real peak come from XLA's memory analysis of
the compiled step (lowered on ``ShapeDtypeStruct``s). So a config can be checked against a
device's memory before anything is downloaded or initialised.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab.config import ConfigError
from ftlab.train.state import TrainState

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s (or arrays)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def parse_bytes(text: str | int) -> int:
    """``"80GB"``, ``"16GiB"``, ``"512M"`` or a plain number -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"device memory {text!r}: expected a size such as 80GB or 16GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def local_device_memory() -> int | None:
    """The first local device's memory limit, when the backend reports one (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one train step on a mesh.

    ``compiled`` holds XLA's memory analysis (``argument``, ``output``, ``alias``, ``temp``,
    ``code``) when the step was compiled; ``temp`` covers activations, gradients and
    workspace, so ``activations`` is ``temp`` less the gradients (estimated from shapes).
    """

    mesh: dict[str, int]
    parameters: int  # trained + frozen base weights + method-owned leaves (LoRA factors)
    trainable: int
    gradients: int  # one per trainable leaf, sharded like it
    optimizer: int
    model_state: int
    batch: int
    compiled: dict[str, int] | None = None

    @property
    def activations(self) -> int | None:
        if self.compiled is None:
            return None
        return max(self.compiled["temp"] - self.gradients, 0)

    @property
    def total(self) -> int:
        """Peak estimate: the compiled step's live buffers, else the sum of the parts."""
        if self.compiled is not None:
            c = self.compiled
            return c["argument"] + c["output"] - c["alias"] + c["temp"] + c["code"]
        return self.parameters + self.gradients + self.optimizer + self.model_state + self.batch

    def fits(self, device_memory: int) -> bool:
        return self.total <= device_memory

    def table(self, device_memory: int | None = None) -> str:
        mesh = " x ".join(f"{a}={n}" for a, n in self.mesh.items())
        rows = [
            ("parameters", self.parameters),
            ("  of which trainable", self.trainable),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("model state", self.model_state),
            ("batch", self.batch),
            ("activations + workspace", self.activations),
            ("total (peak)" if self.compiled else "total (without activations)", self.total),
        ]
        lines = [f"per-device memory on mesh {mesh}:"]
        lines += [f"  {name:<28}{_fmt(n):>14}" for name, n in rows]
        if device_memory is not None:
            verdict = "fits" if self.fits(device_memory) else "does NOT fit"
            lines.append(
                f"  {verdict} in {_fmt(device_memory)} per device "
                f"({100.0 * self.total / device_memory:.1f}% used)"
            )
        return "\n".join(lines)


def plan_step(
    train_step: Callable,
    state: TrainState,
    batch: Any,
    *,
    compile: bool = True,
) -> MemoryPlan:
    """Plan ``train_step`` on ``state`` and ``batch``: trees of ``ShapeDtypeStruct``s that
    carry their shardings (``shard.with_shardings``). With ``compile`` the step is lowered and
    compiled as the trainer would run it (state donated) for XLA's memory analysis."""
    shardings = jax.tree.map(lambda s: s.sharding, state)
    mesh = jax.tree.leaves(shardings)[0].mesh
    compiled = None
    if compile:
        batch_sharding = jax.tree.map(lambda s: s.sharding, batch)
        lowered = jax.jit(
            train_step,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        ).lower(state, batch)
        stats = lowered.compile().memory_analysis()
        compiled = {
            "argument": int(stats.argument_size_in_bytes),
            "output": int(stats.output_size_in_bytes),
            "alias": int(stats.alias_size_in_bytes),
            "temp": int(stats.temp_size_in_bytes),
            "code": int(stats.generated_code_size_in_bytes),
        }
    trainable = device_bytes(state.trainable)
    return MemoryPlan(
        mesh=dict(mesh.shape),
        parameters=trainable + device_bytes(state.frozen),
        trainable=trainable,
        gradients=trainable,
        optimizer=device_bytes(state.opt_state),
        model_state=device_bytes(state.model_state),
        batch=device_bytes(batch),
        compiled=compiled,
    )


def plan_config(cfg, *, devices: int | None = None, compile: bool | None = None) -> MemoryPlan:
    """Plan the train step of an experiment config (model, method, optimizer, batch, mesh).

    ``config.mesh.shape`` (default: data parallel) is laid over ``devices`` devices (default:
    all present). Planning for a device count this machine does not have uses an abstract
    mesh: parameters, gradients and optimizer state from shapes, no compiled activations.
    Every config error (a mesh or batch that does not divide) comes before any compilation.
    """
    from ftlab.data.batches import train_batch
    from ftlab.parallel import shard
    from ftlab.parallel.mesh import make_abstract_mesh, make_mesh
    from ftlab.train import losses, optim
    from ftlab.train.loop import prepare
    from ftlab.train.step import make_train_step

    data, model, method = prepare(cfg, devices=devices)
    mesh_cfg = cfg.get("mesh")
    shape = mesh_cfg.get("shape") if mesh_cfg is not None else None
    shape = shape.to_dict() if hasattr(shape, "to_dict") else shape
    real = devices is None or devices == jax.device_count()
    if compile and not real:
        raise ValueError(
            f"cannot compile for {devices} devices on a machine with {jax.device_count()}; "
            "plan from shapes (compile=False)"
        )
    mesh = make_mesh(shape) if real else make_abstract_mesh(shape, devices)
    shard.check_batch(cfg.train.batch_size, mesh, cfg.optim.accum_steps)

    variables = jax.eval_shape(model.init, jax.random.key(cfg.seed), data.train.sample_inputs())
    tx, lr = optim.optimizer(cfg.optim, max(cfg.train.num_steps, 1))
    abstract = shard.abstract_state(shard.init_state_fn(method, tx, cfg.seed), variables)
    state = shard.with_shardings(abstract, shard.state_shardings(abstract, variables, mesh))
    host = train_batch(data.train, 0, cfg.train.batch_size, cfg.seed, shuffle=False)
    batch = shard.abstract_batch(host, shard.batch_sharding(mesh))
    loss_fn = losses.per_example_loss(cfg.train.loss, cfg.train.label_smoothing)
    step = make_train_step(model, method, tx, lr, loss_fn, cfg.optim.accum_steps)
    return plan_step(step, state, batch, compile=real if compile is None else compile)


def describe(
    cfg, *, device_memory: int | None = None, devices: int | None = None
) -> tuple[str, bool | None]:
    """What ``ftlab plan`` prints, and whether the step fits (None: no memory size known).

    ``device_memory`` defaults to what the local accelerator reports (when planning for it).
    """
    p = plan_config(cfg, devices=devices)
    if device_memory is None and devices in (None, jax.device_count()):
        device_memory = local_device_memory()
    return p.table(device_memory), None if device_memory is None else p.fits(device_memory)
