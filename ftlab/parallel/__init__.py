"""Device mesh, logical-axis sharding rules and sharded train steps (the memory planner that
compiles them for a target is ``ftlab.plan``, above this package).

- ``mesh``:  ``config.mesh.shape`` (named axes ``data``, ``fsdp``, ``tensor``; one may be -1)
  -> a ``jax.sharding.Mesh``, with divisibility errors that give the numbers;
- ``rules``: the one table mapping the models' logical axis names to mesh axes;
- ``shard``: shardings for a whole ``TrainState`` (parameters, LoRA factors, optimizer state)
  and for batches, and the train/eval steps jitted with them (state donated);

The same code runs on one CPU, on fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and on accelerators.
"""

from ftlab.parallel.mesh import AXES, make_abstract_mesh, make_mesh, resolve_shape
from ftlab.parallel.rules import RULES
from ftlab.parallel.shard import (
    abstract_state,
    batch_sharding,
    check_batch,
    init_state_fn,
    jit_eval_step,
    jit_train_step,
    shard_batch,
    state_shardings,
)

__all__ = [
    "AXES",
    "RULES",
    "abstract_state",
    "batch_sharding",
    "check_batch",
    "init_state_fn",
    "jit_eval_step",
    "jit_train_step",
    "make_abstract_mesh",
    "make_mesh",
    "resolve_shape",
    "shard_batch",
    "state_shardings",
]
