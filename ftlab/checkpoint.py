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

Integrity: once a step is committed (at the next save, ``wait`` or ``close``), process 0
writes ``<step>/ftlab_sha256.json``, the size and sha256 of every file of the step. Restoring
the latest step verifies it first: a step whose files no longer match (truncated, deleted,
a flipped byte) is set aside, renamed ``<step>.corrupt-<time>`` (never deleted), with a
warning naming it, and the newest intact step is restored instead; when none is left,
``CheckpointCorruptError``. A save that fails (a full disk, no permission) raises
``CheckpointSaveError`` naming the directory; the steps already committed stay.

Directories may be local paths or any ``etils.epath`` location (``gs://bucket/run``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"
MANIFEST = "ftlab_sha256.json"


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (a full disk, no permission); earlier steps are kept."""


class CheckpointCorruptError(ValueError):
    """No intact checkpoint is left to resume from (the corrupt ones were set aside)."""


def _files(directory: epath.Path) -> list[epath.Path]:
    out = []
    for p in directory.iterdir():
        out.extend(_files(p) if p.is_dir() else [p])
    return out


def _sha256(path: epath.Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _digests(step_dir: epath.Path) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` of every file under ``step_dir`` but the manifest."""
    files = [p for p in _files(step_dir) if p.name != MANIFEST]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL
        sums = list(pool.map(_sha256, files))
    root = os.fspath(step_dir).rstrip("/") + "/"
    return {os.fspath(p)[len(root) :]: list(v) for p, v in zip(files, sums)}


def write_manifest(step_dir: epath.Path) -> None:
    """The size and sha256 of every file of a committed step, in ``step_dir/MANIFEST``."""
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": _digests(step_dir)}, indent=0, sort_keys=True))
    tmp.rename(step_dir / MANIFEST)


def verify_manifest(step_dir: epath.Path) -> str | None:
    """None when the step matches its manifest (or has none: saved before it was written);
    otherwise what differs, in a few words."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return None
    try:
        want = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {MANIFEST} ({e})"
    try:
        got = _digests(step_dir)
    except OSError as e:
        return f"unreadable files ({e})"
    for name, (size, digest) in sorted(want.items()):
        if name not in got:
            return f"{name} is missing"
        if got[name][0] != size:
            return f"{name} has {got[name][0]} bytes, {size} when saved"
        if got[name][1] != digest:
            return f"{name} does not match its checksum"
    return None


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
        self._in_flight: dict[int, int] = {}  # id(manager) -> step of its pending save
        self._unsealed: set[tuple[int, int]] = set()  # (id(manager), step) saved, no manifest

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
        if not (force or self._last.should_save(int(step))):
            return False
        args = self._args(state, meta)
        self._finish(self._last)  # the previous save committed (or its failure raised), sealed
        try:
            saved = bool(self._last.save(int(step), args=args, force=force))
        except Exception as e:
            raise self._save_error(self._last, int(step), e) from e
        if saved:
            self._in_flight[id(self._last)] = int(step)
            self._unsealed.add((id(self._last), int(step)))
            if not self.async_save:
                self._finish(self._last)
        return saved

    # ------------------------------------------------------------------ integrity
    def _save_error(self, mngr: ocp.CheckpointManager, step: int | None, e: Exception):
        where = mngr.directory if step is None else mngr.directory / str(step)
        try:
            mngr.reload()  # forget the step that failed
        except Exception:  # noqa: BLE001 (the listing below is a courtesy)
            logger.debug("could not reload %s", mngr.directory)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CheckpointSaveError(
            f"saving the checkpoint {where} failed ({type(e).__name__}: {reason[:300]}); "
            f"the steps saved before it are kept: {sorted(mngr.all_steps())}"
        )

    def _finish(self, mngr: ocp.CheckpointManager) -> None:
        """Wait for ``mngr``'s pending save (a failed one raises ``CheckpointSaveError``), then
        write the manifest of every committed step that lacks one."""
        try:
            mngr.wait_until_finished()
            mngr.check_for_errors()
        except Exception as e:
            raise self._save_error(mngr, self._in_flight.pop(id(mngr), None), e) from e
        self._in_flight.pop(id(mngr), None)
        if jax.process_index() != 0:
            return
        kept = set(mngr.all_steps())
        for key in sorted(self._unsealed):  # only steps this process saved: never bless
            if key[0] != id(mngr):  # a step found on disk without a manifest
                continue
            self._unsealed.discard(key)
            if key[1] in kept:
                try:
                    write_manifest(mngr.directory / str(key[1]))
                except OSError as e:
                    raise self._save_error(mngr, key[1], e) from e

    def check_for_errors(self) -> None:
        """Raise ``CheckpointSaveError`` now if a background save has already failed."""
        for mngr in (self._last, self._best):
            if mngr is None:
                continue
            try:
                mngr.check_for_errors()
            except Exception as e:
                raise self._save_error(mngr, self._in_flight.pop(id(mngr), None), e) from e

    def _set_aside(self, mngr: ocp.CheckpointManager, step: int, why: str) -> None:
        step_dir = mngr.directory / str(step)
        aside = mngr.directory / f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        if jax.process_index() == 0:
            step_dir.rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ftlab_set_aside_{step}")
        mngr.reload()
        logger.warning("checkpoint %s is corrupt (%s): set aside as %s", step_dir, why, aside)

    def _intact(self, mngr: ocp.CheckpointManager, step: int) -> bool:
        why = verify_manifest(mngr.directory / str(step))
        if why is None:
            return True
        self._set_aside(mngr, step, why)
        return False

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
        args = self._args(state, meta)
        self._finish(self._best)
        try:
            saved = bool(self._best.save(step, args=args, metrics=metrics, force=True))
        except Exception as e:
            raise self._save_error(self._best, step, e) from e
        if saved:
            self._in_flight[id(self._best)] = step
            self._unsealed.add((id(self._best), step))
            self._best_value = value
            if not self.async_save:
                self._finish(self._best)
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
        self._finish(self._last)
        if step is not None:
            if int(step) in self._last.all_steps() and not self._intact(self._last, int(step)):
                raise CheckpointCorruptError(
                    f"checkpoint step {step} in {self._last.directory} is corrupt (set aside)"
                )
            return self._restore(self._last, target, int(step))
        if self._last.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {self._last.directory}")
        while (step := self._last.latest_step()) is not None:
            if self._intact(self._last, step):
                return self._restore(self._last, target, step)
        raise CheckpointCorruptError(
            f"no intact checkpoint left in {self._last.directory}: every step failed its "
            "checksums and was set aside (renamed *.corrupt-*, nothing deleted); restore one "
            "by hand, or use a new --workdir to start over"
        )

    def restore_best(self, target: Any) -> tuple[Any, dict, int]:
        """Restore the best checkpoint. Returns ``(state, meta, step)``."""
        if self._best is None:
            raise ValueError("restore_best needs Checkpoints(..., best_metric=...) to be set")
        self._finish(self._best)
        step = self._best.best_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint in {self._best.directory}")
        if not self._intact(self._best, step):
            raise CheckpointCorruptError(
                f"the best checkpoint (step {step}) in {self._best.directory} is corrupt and was "
                "set aside; evaluate --checkpoint last instead"
            )
        state, meta = self._restore(self._best, target, step)
        return state, meta, step

    # ------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Block until pending async saves are committed (and write their manifests); a save
        that failed raises ``CheckpointSaveError``."""
        self._finish(self._last)
        if self._best is not None:
            self._finish(self._best)

    def close(self) -> None:
        """Wait for pending saves and release resources."""
        try:
            self.wait()
        finally:
            self._last.close()
            if self._best is not None:
                self._best.close()

    def abort(self) -> None:
        """Release resources after an interruption, quietly: a pending save completes if it
        can; a failure is logged in one line, never raised (the process is exiting)."""
        try:
            self.close()
        except BaseException as e:  # noqa: BLE001 (a further Ctrl-C, or the save's own error)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            logger.debug("checkpoints closed after an error: %s", first)  # reported already

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
