"""Training batches at scale: per-epoch shuffles, per-host shares, prefetch, resumable position.

The order is defined on the *global* batch, independent of the number of hosts: epoch ``e`` is
``default_rng([seed, e]).permutation(n)`` (the order ``batches.train_batch`` uses, so a run with
``last_batch="drop"`` on one host sees exactly the batches it saw before), global batch ``s`` of
the epoch is rows ``s*B .. (s+1)*B`` of it, and host ``p`` of ``P`` takes the contiguous slice
``p*B/P .. (p+1)*B/P``. So the hosts together cover each global batch, a resume on a different
number of hosts continues the same sequence, and the iterator position (epoch, step in epoch) is
a tiny host-independent JSON dict for the checkpoint meta.

The last partial batch of an epoch follows ``last_batch``:

- ``"drop"``: the ``n % B`` examples left over are skipped this epoch (a fresh shuffle next epoch
  skips others); every other example is seen exactly once.
- ``"pad"``: the last batch is filled up with copies of the epoch's first examples carrying
  ``weights`` 0 (copies, not zeros, so the padded rows are valid inputs); every example has
  weight 1 exactly once per epoch. Batches then always hold a ``weights`` key.
- ``"wrap"``: the same filler rows with weight 1, so ``B - n % B`` examples count twice that epoch.

grain runs the pipeline: a ``MapDataset`` over the global batch number whose elements are whole
host batches, read ahead by grain's thread pool, plus an optional second grain thread that turns
them into global ``jax.Array`` s (device transfer ahead of the step). grain's ``IndexSampler`` /
``ShardOptions`` / ``DataLoader`` are not used: they shard the *dataset* per host before
shuffling (the global batch would depend on the host count), batch across epoch boundaries and
know no padding with weights.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
from grain import experimental as grain_experimental
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftlab.config import ConfigError

LAST_BATCH = ("drop", "pad", "wrap")
STATE_VERSION = 1
_NO_END = sys.maxsize // 2  # the batch stream is endless: epochs follow each other

# What each field of the saved state is called in the experiment config, for error messages.
_STATE_KEYS = {
    "num_examples": "the training split's size (config.data)",
    "global_batch_size": "config.train.batch_size",
    "last_batch": "config.data.last_batch",
    "shuffle": "config.data.shuffle",
    "seed": "config.seed",
}


# --------------------------------------------------------------------------- sampler


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch (read-only; cached because every step of an epoch needs
    it and a permutation of millions of indices is not free)."""
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    else:
        order = np.arange(num_examples)
    order.setflags(write=False)
    return order


def steps_per_epoch(num_examples: int, global_batch_size: int, last_batch: str = "drop") -> int:
    """Global batches per epoch under the ``last_batch`` policy."""
    if last_batch == "drop":
        if global_batch_size > num_examples:
            raise ConfigError(
                f"config.train.batch_size: {global_batch_size} is larger than the training split "
                f"({num_examples} examples) with config.data.last_batch='drop'; lower it or use "
                "'pad'"
            )
        return num_examples // global_batch_size
    return -(-num_examples // global_batch_size)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Which examples host ``process_index`` of ``process_count`` reads for a global batch.

    A pure function of its fields and ``(epoch, step)``: nothing to save but the position.
    """

    num_examples: int
    global_batch_size: int
    seed: int
    last_batch: str = "drop"
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        if self.last_batch not in LAST_BATCH:
            raise ConfigError(
                f"config.data.last_batch: {self.last_batch!r} is not one of {LAST_BATCH}"
            )
        if self.num_examples < 1:
            raise ConfigError("config.data: the training split is empty")
        if self.global_batch_size < 1:
            raise ConfigError(
                f"config.train.batch_size: must be >= 1, got {self.global_batch_size}"
            )
        if self.seed < 0:
            raise ConfigError(f"config.seed: must be >= 0 to seed the shuffle, got {self.seed}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"process_index {self.process_index} is not in [0, {self.process_count})"
            )
        if self.global_batch_size % self.process_count:
            raise ConfigError(
                f"config.train.batch_size: {self.global_batch_size} does not split evenly over "
                f"{self.process_count} hosts"
            )
        steps_per_epoch(self.num_examples, self.global_batch_size, self.last_batch)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_examples, self.global_batch_size, self.last_batch)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

    def position(self, global_step: int) -> tuple[int, int]:
        """``(epoch, step in epoch)`` of the ``global_step``-th batch (counted from 0)."""
        return divmod(int(global_step), self.steps_per_epoch)

    def global_indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Example indices and weights (0 = padding) of the whole global batch."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is outside the epoch's {self.steps_per_epoch} batches")
        order = epoch_order(self.num_examples, self.seed, int(epoch), self.shuffle)
        size = self.global_batch_size
        index = order[step * size : (step + 1) * size]
        weights = np.ones(size, np.float32)
        short = size - len(index)
        if short:  # the last batch of a "pad" or "wrap" epoch; np.resize cycles if size > n
            index = np.concatenate([index, np.resize(order, short)])
            if self.last_batch == "pad":
                weights[size - short :] = 0.0
        return index, weights

    def indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This host's contiguous slice of :meth:`global_indices`."""
        index, weights = self.global_indices(epoch, step)
        local = slice(
            self.process_index * self.local_batch_size,
            (self.process_index + 1) * self.local_batch_size,
        )
        return index[local], weights[local]


# --------------------------------------------------------------------------- iterator


def _check_arrays(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not arrays:
        raise ValueError("DataIterator needs at least one per-example array")
    out = {key: np.asarray(value) for key, value in arrays.items()}  # memmaps stay lazy
    sizes = {key: (value.shape[0] if value.ndim else None) for key, value in out.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"per-example arrays must share their first dimension; got {sizes}")
    return out


class DataIterator:
    """Endless host-local training batches (dicts of arrays) with a checkpointable position.

    ``state()`` is the position of the *next* batch to be returned, whatever has been read
    ahead, so saving it after step ``k`` and restoring gives batch ``k`` next.
    ``host_transform(batch, global_step)`` (augmentation: a pure function of the step) runs in
    the reading threads; ``transform`` (e.g. ``functools.partial(global_batch, sharding=s)``)
    runs in a background thread so the device transfer overlaps the step too. Close it (or
    use ``with``) to stop the threads.
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        *,
        global_batch_size: int,
        seed: int,
        last_batch: str = "drop",
        shuffle: bool = True,
        prefetch: int = 2,
        num_threads: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        start_step: int = 0,
        transform: Callable[[dict[str, np.ndarray]], Any] | None = None,
        transform_prefetch: int = 1,
        host_transform: Callable[[dict[str, np.ndarray], int], Any] | None = None,
    ):
        self.arrays = _check_arrays(arrays)
        self.sampler = Sampler(
            num_examples=len(next(iter(self.arrays.values()))),
            global_batch_size=int(global_batch_size),
            seed=int(seed),
            last_batch=last_batch,
            shuffle=bool(shuffle),
            process_index=jax.process_index() if process_index is None else int(process_index),
            process_count=jax.process_count() if process_count is None else int(process_count),
        )
        if prefetch < 0:
            raise ConfigError(f"config.data.prefetch: must be >= 0, got {prefetch}")
        if transform_prefetch < 0:
            raise ConfigError(
                f"config.data.device_prefetch: must be >= 0, got {transform_prefetch}"
            )
        self.prefetch = int(prefetch)
        self.num_threads = min(self.prefetch, 2) if num_threads is None else int(num_threads)
        self.transform = transform
        self.transform_prefetch = int(transform_prefetch)
        self.host_transform = host_transform
        # Weights ride along when padding can occur or the data brings its own per-example ones.
        self._weights = last_batch == "pad" or "weights" in self.arrays
        self._it: grain.DatasetIterator | None = None
        self._seek(int(start_step))

    # ------------------------------------------------------------------ batches
    def batch_at(self, global_step: int) -> dict[str, np.ndarray]:
        """The host batch for the ``global_step``-th batch, computed directly (no prefetch)."""
        index, weights = self.sampler.indices(*self.sampler.position(global_step))
        batch = {key: value[index] for key, value in self.arrays.items()}
        if self._weights:
            own = self.arrays["weights"][index] if "weights" in self.arrays else 1.0
            batch["weights"] = (weights * own).astype(np.float32)
        return batch

    def _host_batch(self, global_step: int) -> Any:
        batch = self.batch_at(global_step)
        if self.host_transform is None:
            return batch
        return self.host_transform(batch, global_step)

    def _seek(self, start: int) -> None:
        if start < 0:
            raise ValueError(f"start_step must be >= 0, got {start}")
        self._close_grain()
        ds = (
            grain.MapDataset.range(start, _NO_END)
            .map(self._host_batch)
            .to_iter_dataset(
                grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
            )
        )
        if self.transform is not None:
            ds = grain_experimental.ThreadPrefetchIterDataset(
                ds.map(self.transform), prefetch_buffer_size=self.transform_prefetch
            )
        self._it = iter(ds)
        self._step = start

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            raise ValueError("the DataIterator is closed")
        batch = next(self._it)
        self._step += 1
        return batch

    # ------------------------------------------------------------------ position
    @property
    def step(self) -> int:
        """Global batches returned so far (equals the train state's step when resumed right)."""
        return self._step

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def state(self) -> dict[str, Any]:
        """JSON-able position of the next batch, identical on every host (checkpoint meta)."""
        epoch, position = self.sampler.position(self._step)
        s = self.sampler
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "position": position,
            "seed": s.seed,
            "num_examples": s.num_examples,
            "global_batch_size": s.global_batch_size,
            "last_batch": s.last_batch,
            "shuffle": s.shuffle,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved :meth:`state`; a state from another setup is a ConfigError."""
        self._seek(self._validate(state))

    @classmethod
    def from_state(
        cls, arrays: Mapping[str, Any], state: Mapping[str, Any], **kwargs: Any
    ) -> DataIterator:
        """An iterator over ``arrays`` positioned at ``state``; the settings the state records
        (batch size, seed, policy, shuffle) come from it unless given, and must then agree."""
        missing = [
            k for k in ("seed", "global_batch_size", "last_batch", "shuffle") if k not in state
        ]
        if missing:
            raise ConfigError(f"data iterator state lacks {missing}; it is not from DataIterator")
        settings = {
            key: state[key] for key in ("seed", "global_batch_size", "last_batch", "shuffle")
        }
        it = cls(arrays, **{**settings, **kwargs})
        try:
            it.restore(state)
        except BaseException:
            it.close()
            raise
        return it

    def _validate(self, state: Mapping[str, Any]) -> int:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"data iterator state has version {state.get('version')!r}, this code reads "
                f"version {STATE_VERSION}"
            )
        now = self.state()
        changed = [
            f"{_STATE_KEYS[key]}: {state.get(key)!r} in the checkpoint, {now[key]!r} now"
            for key in _STATE_KEYS
            if state.get(key) != now[key]
        ]
        if changed:
            raise ConfigError(
                "cannot resume the data iterator, the setup changed since the checkpoint: "
                + "; ".join(changed)
                + ". Resume with the original settings and data, or start a fresh workdir."
            )
        epoch, position = state.get("epoch"), state.get("position")
        if not (
            isinstance(epoch, int)
            and isinstance(position, int)
            and epoch >= 0
            and 0 <= position < self.steps_per_epoch
        ):
            raise ConfigError(
                f"data iterator state: epoch {epoch!r} / position {position!r} is not a position "
                f"in an epoch of {self.steps_per_epoch} batches"
            )
        return epoch * self.steps_per_epoch + position

    # ------------------------------------------------------------------ lifecycle
    def _close_grain(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None  # dropped now, not at interpreter exit, where grain's __del__ fails

    def close(self) -> None:
        """Stop the prefetch threads; idempotent."""
        self._close_grain()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- global arrays


def batch_sharding(mesh: Mesh, axes: str | tuple[str, ...] = ("data",)) -> NamedSharding:
    """Leading (batch) dimension split over ``axes`` of ``mesh``, other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(axes))


@functools.lru_cache(maxsize=64)
def _process_rows(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """The global rows held by this process's devices (must be one contiguous range)."""
    rows = sorted(
        {
            index[0].indices(shape[0])[:2]
            for index in sharding.addressable_devices_indices_map(shape).values()
        }
    )
    start, stop = rows[0][0], rows[0][1]
    for a, b in rows[1:]:
        if a > stop:
            return -1, -1
        stop = max(stop, b)
    return start, stop


def global_batch(local_batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Assemble each host's share into global ``jax.Array`` s split over ``sharding``.

    Host ``p`` of ``P`` must hold global rows ``p*L .. (p+1)*L`` (what :class:`Sampler` gives
    it); a mesh whose device order puts another host's rows on this host's devices is refused
    rather than silently reordering (or, if rows are replicated across hosts, mixing) the batch.
    """
    p, count = jax.process_index(), jax.process_count()

    def one(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("global_batch: every leaf needs a leading batch dimension")
        rows = len(x)
        shape = (rows * count, *x.shape[1:])
        if _process_rows(sharding, shape) != (p * rows, (p + 1) * rows):
            raise ValueError(
                f"global_batch: process {p} holds rows {p * rows}..{(p + 1) * rows} of the global "
                f"batch, but its devices hold rows {_process_rows(sharding, shape)} under "
                f"{sharding}; build the mesh with jax.make_mesh (process-major device order) and "
                "split the batch over all hosts"
            )
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local_batch)
