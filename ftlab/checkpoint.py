"""Checkpointing for the trainer: a thin wrapper over Orbax ``CheckpointManager``.

Layout under ``directory``::

    directory/last/<step>/{state,meta}   the last ``keep`` periodic checkpoints
    directory/best/<step>/{state,meta}   the single best checkpoint by ``best_metric``

``state`` is any pytree of arrays (e.g. a ``flax.struct.dataclass`` train state
with an optax ``opt_state``); it is written with ``StandardSave`` (tensorstore /
OCDBT, no pickle). ``meta`` is a JSON-serialisable dict written with
``JsonSave`` next to it in the same step directory.

Restoring needs a ``target`` pytree (concrete arrays or ``jax.ShapeDtypeStruct``)
that gives the structure, dtypes and shardings. Orbax stores namedtuples as
dicts and ``optax.EmptyState()`` / ``None`` as empty nodes, so restoring
*without* a target would return plain dicts/lists/None instead of the optax
state; with a target the original containers come back.

Multi-host: every process must call the same methods with the same arguments
(including the metrics passed to ``save_best``); Orbax does the coordination.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"


def _as_path(path: str | os.PathLike) -> epath.Path:
    """Absolute ``epath.Path`` (local relative paths are made absolute)."""
    s = os.fspath(path)
    if "://" not in s:
        s = os.path.abspath(s)
    return epath.Path(s)


def _abstract(target: Any) -> Any:
    """ShapeDtypeStruct tree (keeping shardings) from concrete or abstract target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, target)


def _check_json(meta: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    meta = dict(meta)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable: {e}") from e
    return meta


class Checkpoints:
    """Periodic ("last") and best-by-metric ("best") checkpoints of a train state."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int = 3,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: str = "max",
    ):
        if int(save_every) < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = _as_path(directory)
        self.save_every = int(save_every)
        self.keep = int(keep)
        self.async_save = bool(async_save)
        self.best_metric = best_metric
        self.best_mode = best_mode

        policies = ocp.checkpoint_managers
        self._last = ocp.CheckpointManager(
            self.directory / "last",
            item_names=(_STATE, _META),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.keep,
                enable_async_checkpointing=self.async_save,
                # Orbax's default policy also saves the very first step it is
                # asked about (InitialSavePolicy); we want multiples only.
                save_decision_policy=policies.AnySavePolicy(
                    [
                        policies.FixedIntervalPolicy(self.save_every),
                        policies.PreemptionCheckpointingPolicy(),
                    ]
                ),
            ),
        )

        self._best: ocp.CheckpointManager | None = None
        self._best_value: float | None = None
        if best_metric is not None:
            self._best = ocp.CheckpointManager(
                self.directory / "best",
                item_names=(_STATE, _META),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=self._metric_of,
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                    enable_async_checkpointing=self.async_save,
                ),
            )
            step = self._best.best_step()
            if step is not None:
                self._best_value = self._metric_of(self._best.metrics(step))

    # ------------------------------------------------------------------ saving
    def _metric_of(self, metrics: Mapping[str, Any] | None) -> float:
        """Metric used by Orbax's best_fn; a checkpoint lacking it ranks worst."""
        worst = -math.inf if self.best_mode == "max" else math.inf
        if not metrics or self.best_metric not in metrics:
            return worst
        value = float(metrics[self.best_metric])
        return worst if math.isnan(value) else value

    def _args(self, state: Any, meta: Mapping[str, Any]) -> ocp.args.Composite:
        return ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state),
                _META: ocp.args.JsonSave(_check_json(meta)),
            }
        )

    def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False) -> bool:
        """Save into "last" when ``step % save_every == 0`` (or ``force``).

        Returns whether a save was started (async when ``async_save``). A step at
        or below the latest saved one is skipped (False) unless ``force``; forcing
        a step that already exists raises Orbax's ``StepAlreadyExistsError``.
        """
        return bool(self._last.save(int(step), args=self._args(state, meta), force=force))

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self._best_value is None:
            return True
        if self.best_mode == "max":
            return value > self._best_value
        return value < self._best_value

    def save_best(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any],
        metrics: Mapping[str, float],
    ) -> bool:
        """Save into "best" if ``metrics[best_metric]`` beats the stored best.

        Returns whether a save was started. Ties and NaN do not count as better.
        """
        if self._best is None:
            raise ValueError("save_best needs Checkpoints(..., best_metric=...) to be set")
        if self.best_metric not in metrics:
            raise ValueError(
                f"best metric {self.best_metric!r} not in metrics; "
                f"available keys: {sorted(metrics)}"
            )
        metrics = {k: float(v) for k, v in metrics.items()}
        value = metrics[self.best_metric]
        if not self._is_better(value):
            return False
        step = int(step)
        if step in self._best.all_steps():
            # e.g. re-evaluating the same step after a resume; never overwrite.
            logger.warning("best checkpoint for step %d already exists; not overwriting", step)
            return False
        saved = bool(
            self._best.save(step, args=self._args(state, meta), metrics=metrics, force=True)
        )
        if saved:
            self._best_value = value
        return saved

    # ------------------------------------------------------------------ querying
    def latest_step(self) -> int | None:
        return self._last.latest_step()

    def all_steps(self) -> list[int]:
        """Steps currently kept in "last"."""
        return sorted(self._last.all_steps())

    def best_step(self) -> int | None:
        return None if self._best is None else self._best.best_step()

    def best_value(self) -> float | None:
        return self._best_value

    # ------------------------------------------------------------------ restoring
    @staticmethod
    def _restore(mngr: ocp.CheckpointManager, target: Any, step: int) -> tuple[Any, dict]:
        if step not in mngr.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {mngr.directory}; "
                f"available steps: {sorted(mngr.all_steps())}"
            )
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(_abstract(target)),
                    _META: ocp.args.JsonRestore(),
                }
            ),
        )
        return out[_STATE], dict(out[_META] or {})

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore "last" (latest if ``step`` is None) into ``target``'s structure,
        dtypes and shardings. Returns ``(state, meta)``."""
        self._last.wait_until_finished()
        if step is None:
            step = self._last.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self._last.directory}")
        return self._restore(self._last, target, int(step))

    def restore_best(self, target: Any) -> tuple[Any, dict, int]:
        """Restore the best checkpoint. Returns ``(state, meta, step)``."""
        if self._best is None:
            raise ValueError("restore_best needs Checkpoints(..., best_metric=...) to be set")
        self._best.wait_until_finished()
        step = self._best.best_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint in {self._best.directory}")
        state, meta = self._restore(self._best, target, step)
        return state, meta, step

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._last.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release resources."""
        self.wait()
        self._last.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_pytree(path: str | os.PathLike, tree: Any) -> None:
    """Synchronously save a pytree of arrays to ``path`` (which must not exist)."""
    path = _as_path(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(path, tree)  # raises ValueError if path already exists
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def load_pytree(path: str | os.PathLike, target: Any = None) -> Any:
    """Load a pytree saved by :func:`save_pytree`.

    With ``target`` (concrete arrays or ``jax.ShapeDtypeStruct`` tree) the
    result has its structure, dtypes and shardings; without one, Orbax returns
    nested dicts/lists of arrays.
    """
    path = _as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckptr = ocp.StandardCheckpointer()
    try:
        if target is None:  # whatever mesh saved it: restore onto this process's first device
            here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            tree = ckptr.metadata(path).item_metadata.tree
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                tree,
                is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
            )
            return ckptr.restore(path, target)
        return ckptr.restore(path, _abstract(target))
    finally:
        ckptr.close()
