"""Where a run executes: the platform, and JAX's multi-controller runtime for several hosts.

The same config runs on a laptop CPU, one GPU, a Colab TPU, a Cloud TPU VM pod or several
GPU hosts; only ``config.platform`` / the environment differ:

- ``platform``: ``auto`` (what jax finds: TPU, else GPU, else CPU) or ``cpu`` / ``gpu`` /
  ``tpu`` to insist on one;
- ``distributed``: ``auto`` calls ``jax.distributed.initialize()`` when the process was launched
  as one of several: ``JAX_COORDINATOR_ADDRESS`` set (with ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` for GPU or CPU hosts), or a multi-worker Cloud TPU VM (jax detects the
  pod itself); ``on`` always initialises (cluster auto-detection: TPU, SLURM, MPI); ``off``
  never.

Both must happen before the first jax computation, so the CLI calls ``setup`` first.
"""

from __future__ import annotations

import logging
import os

import jax

from ftlab.config import ConfigError

log = logging.getLogger("ftlab")

PLATFORMS = ("auto", "cpu", "gpu", "tpu")
DISTRIBUTED = ("auto", "on", "off")


def _launched_as_several() -> bool:
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a TPU VM pod slice


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment {name}={value!r}: not an integer") from None


def setup(platform: str = "auto", distributed: str = "auto") -> None:
    """Pick the platform and join the other processes of a multi-host run (once)."""
    if platform not in PLATFORMS:
        raise ConfigError(f"config.platform: {platform!r}; choose one of {', '.join(PLATFORMS)}")
    if distributed not in DISTRIBUTED:
        raise ConfigError(
            f"config.distributed: {distributed!r}; choose one of {', '.join(DISTRIBUTED)}"
        )
    if platform != "auto":
        jax.config.update("jax_platforms", platform if platform != "gpu" else "cuda")
    if distributed == "off" or (distributed == "auto" and not _launched_as_several()):
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=_int_env("JAX_NUM_PROCESSES"),
        process_id=_int_env("JAX_PROCESS_ID"),
    )
    log.info(
        "process %d of %d (%d local / %d global devices)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
