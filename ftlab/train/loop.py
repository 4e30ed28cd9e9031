"""The training loop: config in, checkpoints, metrics and a summary out.

Read top to bottom it is the whole run: data -> model -> method -> optimiser ->
state (resumed if the workdir has a checkpoint) -> jitted steps with periodic logging,
evaluation, early stopping and checkpoints -> final evaluation on val and test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
from tqdm.auto import tqdm

from ftlab import checkpoint, tree
from ftlab import workdir as workdir_lib
from ftlab.config import ConfigError, to_dict
from ftlab.data import Dataset, Split, augment, load_dataset, pipeline
from ftlab.data.batches import eval_batches, nest
from ftlab.data.loading import write_rejects
from ftlab.eval import metrics as metrics_lib
from ftlab.eval import text_metrics
from ftlab.interop.build import build_model
from ftlab.methods import Method, build_method
from ftlab.methods.select import by_regexes
from ftlab.parallel import mesh as mesh_lib
from ftlab.parallel import shard
from ftlab.schema import base_config, validate
from ftlab.train import flops as flops_lib
from ftlab.train import losses, optim, run_files
from ftlab.train.state import TrainState
from ftlab.train.step import make_eval_step, make_train_step, training_loss
from ftlab.train.writer import MetricWriter

log = logging.getLogger("ftlab")

TOKEN_TASKS = ("causal_lm", "seq2seq")  # token metrics (perplexity), decoded by generation


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


def compute_dtype(name: str) -> jnp.dtype:
    """``auto``: bfloat16 on accelerators, float32 on CPU (where bf16 is slow and inexact)."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(name)


def use_fast_cpu_rng() -> None:
    """On CPU, generate random numbers with the non-partitionable threefry.

    jax's partitionable threefry (the default) makes XLA:CPU take ~2 s to compile each
    random initialiser here, most of a small run's time. Partitioning only matters
    for sharded generation on accelerators, so accelerators keep the default.
    """
    if jax.default_backend() == "cpu":
        jax.config.update("jax_threefry_partitionable", False)


def init_variables(cfg: mc.ConfigDict, model, sample: np.ndarray) -> tuple[dict, dict]:
    """Fresh ``(params, model_state)``, overlaid with a pretrained run's (except ``init.reinit``).

    ``init.checkpoint`` names a run's ``params`` folder; BatchNorm statistics saved beside it
    (``model_state``) come along when the model has such collections.
    """
    # unbox: models annotate weights with logical axis names (for sharding); steps use plain arrays
    if cfg.model.pretrained:  # a Hugging Face checkpoint; a new head keeps its fresh init
        from ftlab.interop.build import load_hf_variables

        variables, notes = load_hf_variables(cfg.model, model, sample, jax.random.key(cfg.seed))
        variables = jax.tree.map(jnp.asarray, variables)
        for note in notes:
            log.info("%s: %s", cfg.model.pretrained, note)
    else:
        variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(cfg.seed), sample))
    params = variables.pop("params")
    model_state = dict(variables)
    if not cfg.init.checkpoint:
        return params, model_state
    flat = tree.flatten(params)
    fresh = by_regexes(sorted(flat), cfg.init.reinit, "init.reinit")
    params_dir, _ = run_files.resolve_init(cfg.init.checkpoint)
    params = tree.unflatten(_overlay(flat, checkpoint.load_pytree(params_dir), fresh, cfg))
    saved_state = params_dir.parent / "model_state"
    if model_state and saved_state.exists():
        flat_state = tree.flatten(model_state)  # "<collection>/<param path>"
        fresh_modules = {f.rsplit("/", 1)[0] for f in fresh}  # a new head keeps fresh stats too
        kept = {p for p in flat_state if p.split("/", 1)[1].rsplit("/", 1)[0] in fresh_modules}
        saved = checkpoint.load_pytree(saved_state)
        model_state = tree.unflatten(_overlay(flat_state, saved, kept, cfg))
    log.info(
        "initialised from %s (kept fresh: %s)",
        cfg.init.checkpoint,
        ", ".join(sorted(fresh)) or "none",
    )
    return params, model_state


def _overlay(flat: dict, saved, keep_fresh: set[str], cfg: mc.ConfigDict) -> dict:
    """Leaves of ``flat`` replaced by the saved ones of the same path and shape."""
    saved = tree.flatten(saved)
    out = dict(flat)
    for path, value in flat.items():
        if path in keep_fresh:
            continue
        if path not in saved:
            raise ConfigError(
                f"config.init.checkpoint: {cfg.init.checkpoint} has no {path!r}; add it to "
                "init.reinit to keep its fresh initialisation"
            )
        if saved[path].shape != value.shape:
            raise ConfigError(
                f"config.init.checkpoint: {path!r} has shape {saved[path].shape} in the checkpoint, "
                f"{value.shape} in the model; add it to init.reinit (a new head, say)"
            )
        out[path] = jnp.asarray(saved[path], value.dtype)
    return out


def _place(batch: dict, sharding) -> dict:
    """An evaluation batch (the same on every host) as global arrays split over the mesh."""
    if sharding is None:
        return batch
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, sharding, lambda index: x[index]), batch
    )


def _fetch(tree_: dict) -> dict:
    """Device arrays as numpy on this host, gathered from every host when there are several."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree_, tiled=True)
    return jax.device_get(tree_)


def evaluate(
    eval_step,
    state: TrainState,
    split: Split,
    data: Dataset,
    batch_size: int,
    sharding=None,
    *,
    keep_outputs: bool = False,
) -> dict:
    """Loss and task metrics over the whole split (the loss weighted as in training).

    ``keep_outputs`` adds the model's per-example outputs (``"outputs"``: logits or values,
    as numpy) for analysis; they are not metrics and are never logged.
    """
    parts: dict[str, list] = {}
    for batch in eval_batches(split, batch_size):
        out = _fetch(eval_step(state, _place(batch, sharding)))
        keep = batch["weights"] > 0
        for key, value in {**out, "weights": batch["weights"]}.items():
            parts.setdefault(key, []).append(np.asarray(value)[keep])
    got = {key: np.concatenate(value) for key, value in parts.items()}
    loss, weights = got["loss"], got["weights"]
    result = {"loss": float(np.sum(loss * weights) / np.sum(weights))}
    if data.task in TOKEN_TASKS:  # per-example mean token losses, weighted by token counts
        result["perplexity"] = text_metrics.perplexity(got["nll"], got["tokens"])
        result["token_accuracy"] = float(got["correct"].sum() / max(got["tokens"].sum(), 1.0))
        return result
    outputs = got["outputs"]
    if data.task == "classification":
        preds = outputs.argmax(-1)
        result.update(metrics_lib.classification_metrics(split.labels, preds, data.num_outputs))
        if "group" in split.text:  # per-subgroup scores (config.data.columns: group=...)
            result.update(
                metrics_lib.group_metrics(
                    split.labels, preds, split.text["group"], data.num_outputs
                )
            )
    else:
        result.update(
            metrics_lib.regression_metrics(
                data.original_units(split.labels), data.original_units(outputs)
            )
        )
    if keep_outputs:
        result["outputs"] = outputs
    return result


def _config_changes(path: Path, cfg: mc.ConfigDict) -> list[str]:
    """Dotted keys whose values differ between ``cfg`` and the config saved at ``path``.

    A key the saved config lacks (added to ftlab since that run) counts only when ``cfg``
    sets it away from its default, so runs saved by an older ftlab still resume.
    """
    flat_old = tree.flatten(json.loads(path.read_text()))
    flat_new = tree.flatten(to_dict(cfg))
    defaults = tree.flatten(to_dict(base_config()))
    return sorted(
        k.replace("/", ".")
        for k in flat_old.keys() | flat_new.keys()
        if flat_old.get(k, defaults.get(k)) != flat_new.get(k)
    )


def _save_config(path: Path, cfg: mc.ConfigDict) -> None:
    """Write config.json; a workdir that already holds a different run is an error, so
    resuming never mixes two configs and nothing saved is overwritten."""
    if path.exists():
        changed = _config_changes(path, cfg)
        if changed:
            raise ConfigError(
                f"{path.parent} already holds a run with a different config (changed: "
                f"{', '.join(changed)}); use a new --workdir, or the same config to resume"
            )
        return
    if jax.process_index() == 0:
        path.write_text(json.dumps(to_dict(cfg), indent=2))


class _EarlyStopping:
    """Patience counted in evaluations; its state travels in the checkpoint's meta."""

    def __init__(self, cfg: mc.ConfigDict, meta: dict):
        self.cfg = cfg
        self.best = meta.get("best_value")
        self.best_step = meta.get("best_step")
        self.bad = meta.get("bad_evals", 0)
        self.stopped = meta.get("stopped", False)

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.mode == "max":
            return value > self.best + self.cfg.min_delta
        return value < self.best - self.cfg.min_delta

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.improved(value):
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        self.stopped = 0 < self.cfg.patience <= self.bad
        return False

    def meta(self) -> dict:
        return {
            "best_value": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad,
            "stopped": self.stopped,
        }


class Interrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C (SIGINT) or SIGTERM (how TPU VMs and spot machines preempt)
    after saving a checkpoint; ``signum`` says which (the CLI exits with 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "interrupted"):
        super().__init__(message)
        self.signum = int(signum)


class _Interrupt:
    """A first Ctrl-C or SIGTERM asks the loop to checkpoint and stop after the current step
    (every process of a multi-host run at the same step: see ``agreed``); a second one
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).addFilter(_quiet_interruptions)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise Interrupted(signum, f"{signal.Signals(signum).name} again: aborted")
        self.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: saving a checkpoint after this step (again to abort)", name)

    def agreed(self, step: int, every: int) -> int | None:
        """The signal to stop on at ``step``, the same on every process. One process runs
        every step's check locally; several share their flags every ``every`` steps (an
        all-gather, so all stop and save the same step; a SIGTERM reaches every worker)."""
        if jax.process_count() == 1:
            return self.signum
        if step % every:
            return None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(flags)) or None

    def __exit__(self, *exc):
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).removeFilter(_quiet_interruptions)
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)


_QUIET_LOGGERS = ("absl", "concurrent.futures")


def _quiet_interruptions(record: logging.LogRecord) -> bool:
    """Orbax's background threads log a traceback for every part of a save that failed (a
    full disk: dozens) and for a wait that a second Ctrl-C interrupted; the loop reports
    each in one line (``CheckpointSaveError``, the CLI's exit message). A write error or an
    interruption is dropped here; any other error is kept, as one line without traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None:
        return True
    if isinstance(exc, (KeyboardInterrupt, OSError)) or "Event loop is closed" in str(exc):
        return False
    record.exc_info, record.exc_text = None, None
    record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
    record.args = ()
    return True


@contextlib.contextmanager
def _abort_on_error(ckpts: checkpoint.Checkpoints, bar: tqdm):
    """Leaving the loop by an exception (an interruption, a failed save, a non-finite loss):
    end the progress bar's line, let a pending save finish and release Orbax's threads
    quietly, so that exiting prints no traceback from them."""
    try:
        yield
    except BaseException:
        bar.close()
        _ignore_closed_event_loops()
        ckpts.abort()
        raise


def _winding_down(record: logging.LogRecord) -> bool:
    """``_quiet_interruptions`` as a filter of its own, installed for the rest of the process:
    ``_Interrupt.__exit__`` removes its filter by identity and must not remove this one."""
    return _quiet_interruptions(record)


def _ignore_closed_event_loops() -> None:
    """Orbax's aborted background writes report "Event loop is closed" from threads as they
    wind down, after the loop has left (logged, or through ``sys.unraisablehook``); the
    failure itself was reported already. For the rest of the process, they are dropped."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).addFilter(_winding_down)
    previous = sys.unraisablehook
    if getattr(previous, "_ftlab_quiet", False):
        return

    def hook(unraisable) -> None:
        if "Event loop is closed" not in str(unraisable.exc_value):
            previous(unraisable)

    hook._ftlab_quiet = True
    sys.unraisablehook = hook


def _train_batches(
    cfg: mc.ConfigDict, data: Dataset, step: int, meta: dict, sharding
) -> pipeline.DataIterator:
    """This host's training batches from ``step`` on, augmented and placed on the mesh by
    background threads; a checkpoint's saved position is checked against the data and the
    batch size (the order is a pure function of the seed and step)."""

    def host(batch: dict, k: int) -> dict:  # augmentation is a pure function of (seed, k)
        return augment.augment_train_batch(cfg.data, data, nest(batch), k, cfg.seed)

    kw = {
        "global_batch_size": cfg.train.batch_size,
        "seed": cfg.seed,
        "last_batch": cfg.data.last_batch,
        "shuffle": cfg.data.shuffle,
        "prefetch": cfg.data.prefetch,
        "host_transform": host,
        "transform": functools.partial(pipeline.global_batch, sharding=sharding),
    }
    arrays = data.train.arrays(with_text=augment.text_options(cfg.data).active)
    batches = (
        pipeline.DataIterator.from_state(arrays, meta["data"], **kw)
        if "data" in meta
        else pipeline.DataIterator(arrays, start_step=step, **kw)
    )
    if batches.step != step:
        batches.close()
        raise ConfigError(
            f"the checkpoint at step {step} saved the data position of step {batches.step}"
        )
    return batches


def prepare(
    cfg: mc.ConfigDict, devices: int | None = None, data: Dataset | None = None
) -> tuple[Dataset, nn.Module, Method]:
    """Validate the config and resolve data, model and method without compiling anything.

    The method is resolved on parameter shapes alone (``jax.eval_shape``), so every config
    error (a bad value, a regex that matches nothing, a LoRA rank too large, a batch larger
    than the data, a mesh or batch that does not divide ``devices``, default all) comes before
    any compilation or any file is written.
    """
    validate(cfg)
    if data is None:
        data = load_dataset(cfg.data, tokenizer=cfg.model.pretrained)
    per_epoch = pipeline.steps_per_epoch(len(data.train), cfg.train.batch_size, cfg.data.last_batch)
    total_steps = cfg.train.num_steps or cfg.train.num_epochs * per_epoch
    if cfg.optim.warmup_steps > total_steps:
        raise ConfigError(
            f"config.optim.warmup_steps: {cfg.optim.warmup_steps} warm-up steps is longer than "
            f"the run's {total_steps} steps (the learning rate would never reach its peak nor "
            "decay); lower optim.warmup_steps or train longer (train.num_steps / num_epochs)"
        )
    task_metrics = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
    if data.task == "regression":
        task_metrics = ("mse", "mae")
    if data.task in TOKEN_TASKS:
        task_metrics = ("perplexity", "token_accuracy")
    computed = [f"val/{name}" for name in ("loss", *task_metrics)]
    if cfg.early_stopping.metric not in computed:
        raise ConfigError(
            f"config.early_stopping.metric: {cfg.early_stopping.metric!r} is not computed for "
            f"{data.task}; choose one of {', '.join(computed)}"
        )
    mesh_shape = mesh_lib.resolve_shape(cfg.mesh.shape.to_dict(), devices or jax.device_count())
    shard.check_batch(cfg.train.batch_size, mesh_shape, cfg.optim.accum_steps)
    shard.check_batch(cfg.train.eval_batch_size, mesh_shape, key="config.train.eval_batch_size")
    if jax.process_count() > 1 and cfg.eval.generate_examples > 0:
        raise ConfigError(
            "config.eval.generate_examples: decoding runs on one process; set it to 0 for "
            "multi-host runs and decode the exported model afterwards"
        )
    model = build_model(
        cfg.model, data.num_outputs, compute_dtype(cfg.train.compute_dtype), data.task
    )
    _check_vocab(cfg, data, model)
    shapes = jax.eval_shape(model.init, jax.random.key(cfg.seed), data.train.sample_inputs())
    params = nn.meta.unbox(shapes["params"])
    return data, model, build_method(cfg.method, params, tokenizer=data.tokenizer)


def _check_vocab(cfg: mc.ConfigDict, data: Dataset, model: nn.Module) -> None:
    """A tokenizer with more tokens than the model's embedding has rows would index past it
    (a NaN loss at the first step): an error before compiling."""
    if data.tokenizer is None:
        return
    config = getattr(model, "config", model)
    rows = getattr(config, "vocab_size", None)
    tokens = len(data.tokenizer)
    if rows is not None and tokens > int(rows):
        source = cfg.data.tokenizer or cfg.model.pretrained
        raise ConfigError(
            f"config.data.tokenizer: the tokenizer ({source}) has {tokens} tokens but the "
            f"model's embedding has {rows} rows (vocab_size); set "
            f"config.model.hf_config.vocab_size to at least {tokens}, or choose the model's "
            "own tokenizer in config.data.tokenizer"
        )


def check_writable(workdir) -> None:
    """A workdir that cannot be written is an error before any loading or compiling: a file is
    created and removed in it (or in its nearest existing parent)."""
    from etils import epath

    path = epath.Path(workdir)
    probe_dir = path
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    probe = probe_dir / f".ftlab-write-test-{jax.process_index()}-{time.time_ns()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"--workdir {workdir}: cannot write in {probe_dir} ({e.strerror or e}); choose a "
            "writable --workdir"
        ) from None


@dataclasses.dataclass
class Run:
    """Everything a run computes with, built from its config: data, model, method, the mesh,
    the sharded initial state and the jitted steps. ``train`` drives it; ``ftlab eval``,
    ``predict`` and ``export`` rebuild it to restore a saved checkpoint into ``state``."""

    cfg: mc.ConfigDict
    data: Dataset
    model: nn.Module
    method: Method
    mesh: jax.sharding.Mesh
    state: TrainState
    state_sharding: Any
    batch_sharding: Any
    train_step: Callable
    eval_step: Callable
    lr_schedule: Callable
    total_steps: int

    def evaluate(self, state: TrainState, split: Split, keep_outputs: bool = False) -> dict:
        """Loss and task metrics of ``state`` over a whole split (see ``evaluate``)."""
        return evaluate(
            self.eval_step,
            state,
            split,
            self.data,
            self.cfg.train.eval_batch_size,
            self.batch_sharding,
            keep_outputs=keep_outputs,
        )


def build(
    cfg: mc.ConfigDict,
    data: Dataset | None = None,
    *,
    teacher: bool = True,
    distill_proj: tuple[int, int] | None = None,
) -> Run:
    """Data, model, method, optimiser and the sharded initial state of ``cfg``'s run.

    ``data`` reuses splits already loaded for the same ``config.data`` (a sweep loads each
    distinct data config once). ``teacher=False`` (evaluation, prediction, export of a
    distilled run) never reads the distillation teacher: the state is the student's (with
    the hidden-state projection of shape ``distill_proj`` when given, so the checkpoints of a
    run that trained one restore) and ``train_step`` refuses to run.
    """
    use_fast_cpu_rng()
    data, model, method = prepare(cfg, data=data)
    per_epoch = pipeline.steps_per_epoch(len(data.train), cfg.train.batch_size, cfg.data.last_batch)
    total_steps = cfg.train.num_steps or cfg.train.num_epochs * per_epoch
    sample = data.train.sample_inputs()
    params, model_state = init_variables(cfg, model, sample)
    tx, lr_schedule = optim.optimizer(cfg.optim, total_steps)

    # One mesh over every device of every host; the state is created already sharded and
    # the steps are jitted with in/out shardings and a donated state (SPMD, pjit semantics).
    mesh = mesh_lib.make_mesh(cfg.mesh.shape.to_dict())
    init = shard.init_state_fn(method, tx, cfg.seed)
    boxed = jax.eval_shape(model.init, jax.random.key(cfg.seed), sample)
    loss_fn = losses.per_example_loss(cfg.train.loss, cfg.train.label_smoothing)
    teacher_ = None  # distillation: a frozen teacher, checked and loaded before compiling
    if cfg.distill.teacher and teacher:
        from ftlab.train import distill

        dtype, frozen = compute_dtype(cfg.train.compute_dtype), method.frozen_dtype
        teacher_ = distill.load(cfg, data, model, sample, mesh, loss_fn, dtype, tx, frozen)
        init, state_sh = teacher_.wrap_init(init, boxed, mesh)  # + the hidden projection
    elif cfg.distill.teacher and cfg.distill.hidden_weight and distill_proj is not None:
        from ftlab.train import distill

        # the student's state with its trained projection (to restore it), no teacher
        no_teacher = distill.without_teacher(cfg, data.task, loss_fn, distill_proj, tx)
        init, state_sh = no_teacher.wrap_init(init, boxed, mesh)
    else:
        state_sh = shard.state_shardings(shard.abstract_state(init, boxed), boxed, mesh)
    batch_sh = shard.batch_sharding(mesh)
    state = jax.jit(init, out_shardings=state_sh)(params, model_state)
    del params, model_state  # donated into the state: never read them again
    train_loss, model_kwargs = training_loss(cfg.train, method, loss_fn)  # chunked CE or not
    step_fn = make_train_step(
        model,
        method,
        tx,
        lr_schedule,
        train_loss,
        cfg.optim.accum_steps,
        model_kwargs,
        distill=teacher_,
    )
    if cfg.distill.teacher and not teacher:
        from ftlab.train import distill

        train_step = distill.no_train_step
    elif teacher_ is None:
        train_step = shard.jit_train_step(step_fn, state_sh, batch_sh)
    else:  # the teacher's variables: a frozen, sharded input of the step, bound here
        train_step = teacher_.jit_train_step(step_fn, state_sh, batch_sh)
    eval_step = shard.jit_eval_step(
        make_eval_step(model, method, loss_fn, data.task), state_sh, batch_sh
    )
    return Run(
        cfg,
        data,
        model,
        method,
        mesh,
        state,
        state_sh,
        batch_sh,
        train_step,
        eval_step,
        lr_schedule,
        total_steps,
    )


def train(
    cfg: mc.ConfigDict,
    workdir: str | Path,
    *,
    on_step: Callable[[int], None] | None = None,
    data: Dataset | None = None,
) -> dict:
    """Run (or resume) the experiment described by ``cfg`` in ``workdir``; returns the summary.

    A finished run (its summary written, the same config) is not touched again: its summary
    is returned as it is.
    A URL workdir (``gs://bucket/run``) is staged locally (``ftlab.workdir``): checkpoints and
    params go to it directly, the run's other files are copied to it at each checkpoint and
    at the end.
    """
    with workdir_lib.opened(workdir) as wd:  # a scheme etils cannot open: a ConfigError
        finished = finished_summary(wd.local, cfg)
        if finished is not None:
            log.info("%s: finished already (summary.json); nothing to do", wd.url or wd.local)
            return finished
        check_writable(wd.url or wd.local)
        with run_files.RunLog() as run_log:
            return _train(cfg, wd, run_log, on_step=on_step, data=data)


def finished_summary(workdir: Path, cfg: mc.ConfigDict) -> dict | None:
    """The summary of a finished run of this same config in ``workdir``, else None."""
    summary, config = workdir / "summary.json", workdir / "config.json"
    if not (summary.exists() and config.exists()):
        return None
    if _config_changes(config, cfg):
        return None  # _save_config names the changed keys when training starts
    return json.loads(summary.read_text())


def _train(
    cfg: mc.ConfigDict,
    wd: workdir_lib.Workdir,
    run_log: run_files.RunLog,
    *,
    on_step: Callable[[int], None] | None,
    data: Dataset | None,
) -> dict:
    start_time = time.time()
    workdir, store = wd.local, wd.store  # store: checkpoints and params (a remote, directly)
    run = build(cfg, data)
    data, model, method, state = run.data, run.model, run.method, run.state
    train_step, eval_step, batch_sh = run.train_step, run.eval_step, run.batch_sharding
    total_steps = run.total_steps
    log.info("mesh %s over %d devices", dict(run.mesh.shape), run.mesh.size)
    log.info("%s", method.summary(state.trainable, state.frozen))
    # fake CPU devices can deadlock on a long queue of steps with collectives: wait each step
    sync_every_step = jax.default_backend() == "cpu" and jax.device_count() > 1

    # Checkpoints: resume from the latest one if there is one.
    workdir.mkdir(parents=True, exist_ok=True)
    _save_config(workdir / "config.json", cfg)
    run_log.attach(workdir)
    if data.rejected:
        write_rejects(workdir / cfg.data.clean.rejects_file, data.rejected)
        log.warning(
            "data: %d malformed rows skipped, listed in %s",
            len(data.rejected),
            workdir / cfg.data.clean.rejects_file,
        )
    es_cfg = cfg.early_stopping
    ckpts = checkpoint.Checkpoints(
        store / "checkpoints",
        save_every=cfg.checkpoint.every_steps,
        keep=cfg.checkpoint.keep,
        async_save=cfg.checkpoint.async_save,
        best_metric=es_cfg.metric,
        best_mode=es_cfg.mode,
    )
    meta: dict = {}
    if ckpts.latest_step() is not None:
        state, meta = ckpts.restore(state)
        log.info("resumed from %s at step %d", store / "checkpoints", int(state.step))
    stopper = _EarlyStopping(es_cfg, meta)
    batches = _train_batches(cfg, data, int(state.step), meta, batch_sh)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_from=int(state.step))
    before = _before_training(run, state, workdir, writer)

    step = int(state.step)
    pending: list[tuple[int, dict]] = []
    window_start, window_steps = time.time(), 0
    tokens = run_files.tokens_per_example(data)
    speed = run_files.Speed(cfg.train.batch_size, tokens)
    mfu_rate = flops_lib.mfu_per_example_rate(model, method, state, tokens)  # once: constant
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="/".join(workdir.parts[-2:]) if workdir.name.startswith("seed_") else workdir.name,
        unit="step",
        dynamic_ncols=True,
    )

    def flush() -> None:
        """Fetch the queued step metrics, stop on a non-finite value, log their mean."""
        nonlocal pending, window_start, window_steps
        if not pending:
            return
        ckpts.check_for_errors()  # a failed background save stops the run at once
        fetched = _fetch([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                ckpts.wait()
                raise NonFiniteLossError(
                    f"non-finite {'loss' if not math.isfinite(m['loss']) else 'gradient'} at step {s} "
                    f"(loss={m['loss']}, grad_norm={m['grad_norm']}); stopped. The last good checkpoint "
                    f"is step {ckpts.latest_step()} in {store / 'checkpoints'}; lower optim.lr or "
                    "check the data"
                )
        rate = window_steps * cfg.train.batch_size / max(time.time() - window_start, 1e-9)
        record = {
            "train/loss": float(np.mean([m["loss"] for m in fetched])),
            "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
            "train/lr": float(fetched[-1]["lr"]),
            "train/examples_per_sec": rate,
        }
        for key in sorted(fetched[-1].keys() - {"loss", "grad_norm", "lr"}):  # distill: ce, kl
            record[f"train/{key}"] = float(np.mean([m[key] for m in fetched]))
        if tokens:
            record["train/tokens_per_sec"] = rate * tokens
        in_use = run_files.device_memory("bytes_in_use")
        if in_use is not None:
            record["train/device_memory_bytes"] = float(in_use)
        if mfu_rate is not None:  # None: peak unknown (CPU)
            record["train/mfu"] = mfu_rate * rate
        writer.write(pending[-1][0], record)
        bar.set_postfix(
            loss=f"{record['train/loss']:.4f}",
            lr=f"{record['train/lr']:.2e}",
            ex_s=f"{rate:.0f}",
        )
        pending, window_start, window_steps = [], time.time(), 0

    def save(force: bool = False) -> None:
        flush()  # never checkpoint a state that came from a non-finite step
        if force and step in ckpts.all_steps():
            return
        meta = {**stopper.meta(), "step": step, "data": batches.state()}
        if ckpts.save(step, state, meta, force=force):
            wd.sync()  # a remote workdir gets the metrics and logs up to this checkpoint

    with _Interrupt() as interrupt, batches, _abort_on_error(ckpts, bar):
        while step < total_steps and not stopper.stopped:
            state, step_metrics = train_step(state, next(batches))
            if sync_every_step:
                jax.block_until_ready(step_metrics)
            speed.stepped(step_metrics)
            step += 1
            window_steps += 1
            pending.append((step, step_metrics))
            bar.update(1)
            if step % cfg.train.log_every == 0:
                flush()
            if step % cfg.train.eval_every == 0 or step == total_steps:
                speed.pause(state)
                flush()
                val = evaluate(
                    eval_step, state, data.val, data, cfg.train.eval_batch_size, batch_sh
                )
                scalars = metrics_lib.scalars(val, "val")
                writer.write(step, scalars)
                if stopper.update(step, scalars[es_cfg.metric]):
                    ckpts.save_best(step, state, stopper.meta(), scalars)
                if stopper.stopped:
                    log.info(
                        "early stopping at step %d: best %s %.4f at step %d",
                        step,
                        es_cfg.metric,
                        stopper.best,
                        stopper.best_step,
                    )
            if step % cfg.checkpoint.every_steps == 0:
                speed.pause(state)
                save()
            speed.resume()
            if on_step is not None:
                on_step(step)
            signum = interrupt.agreed(step, cfg.train.log_every)
            if signum is not None:
                save(force=True)
                ckpts.wait()
                bar.close()
                log.warning(
                    "checkpoint saved at step %d; run the same command again to resume",
                    step,
                )
                raise Interrupted(signum, f"checkpoint saved at step {step}")
    speed.pause(state)
    save(force=True)
    bar.close()
    ckpts.wait()

    # Final evaluation with the best weights (model selection on val only), then test.
    best_step = step
    if es_cfg.restore_best and ckpts.best_step() is not None:
        state, _, best_step = ckpts.restore_best(state)
        log.info(
            "restored the best weights (step %d, %s %.4f)",
            best_step,
            es_cfg.metric,
            stopper.best,
        )
    val = run.evaluate(state, data.val, keep_outputs=not len(data.test))
    test = run.evaluate(state, data.test, keep_outputs=True) if len(data.test) else {}
    outputs = (test or val).pop("outputs", None)
    if data.task in TOKEN_TASKS and cfg.eval.generate_examples > 0:
        from ftlab.eval.generation_eval import evaluate_generation

        held_out = test if len(data.test) else val  # model selection never sees these scores
        held_out.update(
            evaluate_generation(
                model,
                method,
                state.trainable,
                state.frozen,
                data.test if len(data.test) else data.val,
                data.tokenizer,
                cfg.data.template,
                cfg.eval,
                workdir / "generations.jsonl" if jax.process_index() == 0 else None,
            )
        )
    ckpts.close()
    writer.write(
        step,
        {**metrics_lib.scalars(val, "final_val"), **metrics_lib.scalars(test, "test")},
    )
    writer.close()

    # the student's own count; a distillation projection (trainable["distill"]) apart
    n_proj = tree.count(state.trainable["distill"]) if "distill" in state.trainable else 0
    n_trainable = tree.count(state.trainable) - n_proj
    summary = {
        "task": data.task,
        "class_names": list(data.class_names),
        "steps": step,
        "best_step": best_step,
        "stopped_early": stopper.stopped,
        "method": cfg.method.name,
        "method_summary": method.summary(state.trainable, state.frozen),
        "trainable_params": n_trainable,
        **({"distill_projection_params": n_proj} if n_proj else {}),
        "total_params": tree.count(state.frozen) + tree.count(state.trainable["params"]),
        "wall_time_s": time.time() - start_time,
        **speed.summary(),
        "peak_memory_bytes": run_files.device_memory("peak_bytes_in_use"),
        "before": before,
        "val": val,
        "test": test,
        "lineage": run_files.resolve_init(cfg.init.checkpoint)[1] if cfg.init.checkpoint else [],
    }
    _save_final(cfg, wd, data, method, state)  # every process: collective saves
    if jax.process_index() == 0:
        run_files.write_outputs(cfg, workdir, summary, data, outputs)
    log.info("done: %s", metrics_lib.scalars(test or val))
    return summary


def _before_training(
    run: Run, state: TrainState, workdir: Path, writer: MetricWriter
) -> dict | None:
    """The starting model (pretrained weights, step 0) on val and test, once per run
    (``eval.before_training``); kept in ``before.json`` so a resumed run reports it too."""
    path = workdir / "before.json"
    if path.exists():
        return json.loads(path.read_text())
    if not run.cfg.eval.before_training or int(state.step) != 0:
        return None
    before = {"val": run.evaluate(state, run.data.val)}
    if len(run.data.test):
        before["test"] = run.evaluate(state, run.data.test)
    scalars = {
        **metrics_lib.scalars(before["val"], "before_val"),
        **metrics_lib.scalars(before.get("test", {}), "before_test"),
    }
    writer.write(0, scalars)
    log.info("before training: %s", scalars)
    if jax.process_index() == 0:
        path.write_text(json.dumps(tree.jsonable(before), indent=2))
    return before


def export(
    cfg: mc.ConfigDict,
    data: Dataset,
    method: Method,
    state: TrainState,
    *,
    hf_dir: Path | None = None,
    peft_dir: Path | None = None,
) -> None:
    """The merged model as a Hugging Face directory (with the tokenizer) in ``hf_dir`` and the
    LoRA adapter in PEFT's format in ``peft_dir`` (either may be None), for transformers / peft
    users. Every process calls it (the gathers are collective); process 0 writes. A target that
    is a non-empty directory is refused (``HFExportError`` / ``PeftAdapterError``)."""
    if hf_dir is None and peft_dir is None:
        return
    from ftlab.interop import hub
    from ftlab.interop.build import export_config

    config = export_config(cfg.model, data.task, data.class_names)
    source = cfg.data.tokenizer or cfg.model.pretrained
    source = str(hub.resolve(source)) if source else None
    writes = jax.process_index() == 0  # every process gathers; one writes
    if hf_dir is not None:
        from ftlab.interop.pretrained import export_hf

        merged = _fetch(jax.jit(method.merged_params)(state.trainable, state.frozen))
        model_state = _fetch(state.model_state) or None
        if writes:
            export_hf(hf_dir, merged, config, model_state=model_state, source=source)
            log.info("exported a Hugging Face model to %s", hf_dir)
            if method.prompt_tokens:  # prompt tuning merges into no weight
                log.warning(
                    "the Hugging Face model in %s is the base model: a soft prompt merges into "
                    "no weight (export the PEFT adapter for it)",
                    hf_dir,
                )
    if peft_dir is not None:
        from ftlab.interop.peft import export_method_adapter

        trainable, frozen = _fetch(state.trainable), _fetch(state.frozen)
        if writes:
            export_method_adapter(
                peft_dir,
                method,
                trainable,
                frozen,
                config,
                base_model_name_or_path=cfg.model.pretrained or None,
            )
        log.info("exported the LoRA adapter (PEFT format) to %s", peft_dir)


def _export(
    cfg: mc.ConfigDict, workdir: Path, data: Dataset, method: Method, state: TrainState
) -> None:
    """``config.export``: into ``workdir/hf`` and ``workdir/peft_adapter`` (those not there yet)."""
    hf_dir, peft_dir = workdir / "hf", workdir / "peft_adapter"
    export(
        cfg,
        data,
        method,
        state,
        hf_dir=hf_dir if cfg.export.hf and not hf_dir.exists() else None,
        peft_dir=peft_dir if cfg.export.peft and not peft_dir.exists() else None,
    )


def _save_final(
    cfg: mc.ConfigDict, wd: workdir_lib.Workdir, data: Dataset, method: Method, state: TrainState
) -> None:
    """The final parameters (LoRA merged) for later stages, and the configured exports. Every
    process calls it: Orbax saves and the gathers of sharded arrays are collective. Params go
    to ``wd.store`` (a remote workdir itself), the exports to ``wd.local``."""
    params_dir = wd.store / "params"
    if not params_dir.exists():
        checkpoint.save_pytree(
            params_dir, jax.jit(method.merged_params)(state.trainable, state.frozen)
        )
    if state.model_state and not (wd.store / "model_state").exists():
        checkpoint.save_pytree(wd.store / "model_state", state.model_state)
    _export(cfg, wd.local, data, method, state)
