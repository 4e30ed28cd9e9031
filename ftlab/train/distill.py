"""Knowledge distillation: a frozen teacher's softened outputs as a second training target.

With ``config.distill.teacher`` set, the per-example training loss is

    alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    [+ hidden_weight * MSE(student_hidden @ P, teacher_hidden)]

(Hinton et al. 2015; the ``T^2`` keeps the soft term's gradients on the scale of the hard
one's as ``T`` changes). For classification the KL is per example; for a causal LM it is per
target token, averaged over the positions the cross-entropy trains on (labels >= 0: no prompt,
no padding), so both terms weigh examples by their token counts exactly as the CE does.
Regression has no distribution to match and is refused (``ConfigError``).

The teacher is an earlier ftlab run (its best parameters, found as ``init.checkpoint`` finds
them: a run directory or its ``params`` folder; its ``config.json`` says how to build it) or
a Hugging Face model directory (loaded by the same code as ``model.pretrained``). It runs
forward only, under ``stop_gradient``, in evaluation mode; its variables are a separate,
frozen argument of the jitted train step, sharded by the same logical-axis rules as the
student, never part of the ``TrainState`` (no gradient, no optimizer state, not
checkpointed: it is reloaded from its files, the same bytes each time, so resume is exact).

The optional hidden-state term compares the last hidden state (the input of the output head:
a module named ``head``, ``classifier`` or ``lm_head``, or a tied embedding's ``attend``),
captured by a flax method interceptor so no model changes, through a learned linear
projection from the student's width to the teacher's. The projection is a trainable leaf of
its own (``trainable["distill"]``): optimised and checkpointed with the student, never
exported (``Method.merged_params`` reads only ``params`` and ``lora``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab import checkpoint, tree
from ftlab.config import ConfigError
from ftlab.train import run_files

log = logging.getLogger("ftlab")

PARTS = ("ce", "distill_kl")  # metrics beside the loss: train/ce, train/distill_kl
HEAD_NAMES = ("head", "classifier", "lm_head")


# -- the loss -----------------------------------------------------------------------------


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float):
    """``KL(softmax(teacher/T) || softmax(student/T))`` over the last axis, in float32."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def _per_example(values: jax.Array, batch: Mapping, task: str) -> jax.Array:
    """Per-position values (causal LM) as a mean over each example's target positions."""
    if task != "causal_lm":
        return values
    mask = (batch["labels"] >= 0).astype(jnp.float32)
    return jnp.sum(values * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def distill_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    batch: Mapping,
    ce: jax.Array,
    *,
    task: str,
    alpha: float,
    temperature: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example ``alpha * ce + (1 - alpha) * T^2 * KL`` and its parts (``ce``, ``distill_kl``:
    the plain KL at temperature T, before weighting). ``ce``: the per-example label loss."""
    kl = _per_example(kl_divergence(student_logits, teacher_logits, temperature), batch, task)
    if alpha == 1.0:  # the soft term weighs nothing: exactly the plain loss
        return ce, {"ce": ce, "distill_kl": kl}
    total = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return total, {"ce": ce, "distill_kl": kl}


def hidden_mse(
    student_hidden: jax.Array, teacher_hidden: jax.Array, kernel: jax.Array, batch, task: str
) -> jax.Array:
    """Per-example mean squared error of ``student_hidden @ kernel`` against the teacher's
    hidden state (mean over features; for a causal LM over the target positions)."""
    projected = jnp.dot(student_hidden.astype(jnp.float32), kernel)
    per = jnp.mean((projected - teacher_hidden.astype(jnp.float32)) ** 2, axis=-1)
    if task != "causal_lm":
        per = per.reshape(per.shape[0], -1).mean(-1)
    return _per_example(per, batch, task)


@contextlib.contextmanager
def capture_hidden(enabled: bool = True):
    """Record the input of the model's output head (its last hidden state) while a model
    runs inside the block; yields a list whose last entry is it."""
    got: list = []
    if not enabled:
        yield got
        return

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and module.name in HEAD_NAMES) or (
            context.method_name == "attend" and isinstance(module, nn.Embed)
        ):
            got.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield got


# -- the teacher --------------------------------------------------------------------------


@dataclasses.dataclass
class Distiller:
    """The teacher (model, variables and their shardings) and the loss settings; ``build``
    passes it to ``make_train_step`` and jits the step with the teacher as an argument."""

    model: nn.Module
    variables: dict  # {"params": ..., other collections}: frozen, on the mesh
    shardings: Any
    source: str
    task: str
    alpha: float
    temperature: float
    hidden_weight: float
    per_example_loss: Callable  # the student's label loss (CE, with label smoothing)
    proj_shape: tuple[int, int] | None = None  # (student width, teacher width)
    seed: int = 0
    tx: Any = None  # the run's optimizer: its state covers the projection too

    @property
    def parts(self) -> tuple[str, ...]:
        return (*PARTS, "distill_hidden") if self.hidden_weight else PARTS

    def teacher_outputs(self, teacher: Mapping, inputs) -> tuple[jax.Array, Any]:
        """Teacher logits (and hidden state when the hidden term is on), without gradients."""
        with capture_hidden(bool(self.hidden_weight)) as hidden:
            logits = self.model.apply(dict(teacher), inputs, train=False)
        return jax.lax.stop_gradient((logits, hidden[-1] if hidden else None))

    def loss(
        self, outputs: jax.Array, student_hidden: list, teacher: Mapping, batch, trainable
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Per-example total loss and its parts for one (micro-)batch."""
        t_logits, t_hidden = self.teacher_outputs(teacher, batch["inputs"])
        ce = self.per_example_loss(outputs, batch)
        total, parts = distill_loss(
            outputs,
            t_logits,
            batch,
            ce,
            task=self.task,
            alpha=self.alpha,
            temperature=self.temperature,
        )
        if self.hidden_weight:
            kernel = trainable["distill"]["proj"]["kernel"]
            h = hidden_mse(student_hidden[-1], t_hidden, kernel, batch, self.task)
            total = total + self.hidden_weight * h
            parts["distill_hidden"] = h
        return total, parts

    # -- the train state and the jitted step ----------------------------------------------

    def wrap_init(self, init: Callable, boxed: Mapping, mesh) -> tuple[Callable, Any]:
        """``(init, state shardings)``: the student's, plus the hidden-state projection as a
        replicated trainable leaf ``trainable["distill"]["proj"]["kernel"]`` when it is on."""
        from ftlab.parallel import shard

        if not self.hidden_weight:
            return init, shard.state_shardings(shard.abstract_state(init, boxed), boxed, mesh)

        def with_proj(params, model_state):
            state = init(params, model_state)
            trainable = {**state.trainable, "distill": {"proj": {"kernel": self._proj_init()}}}
            # optimizer state for the student's leaves and the projection (the state's own tx)
            return state.replace(trainable=trainable, opt_state=self.tx.init(trainable))

        abstract = shard.abstract_state(with_proj, boxed)
        student = {k: v for k, v in abstract.trainable.items() if k != "distill"}
        sh = shard.state_shardings(abstract.replace(trainable=student), boxed, mesh)
        replicated = NamedSharding(mesh, P())
        trainable_sh = {**sh.trainable, "distill": {"proj": {"kernel": replicated}}}
        opt_sh = shard.opt_state_shardings(
            abstract.opt_state, abstract.trainable, trainable_sh, mesh
        )
        return with_proj, sh.replace(trainable=trainable_sh, opt_state=opt_sh)

    def _proj_init(self) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(self.seed), 0xD157)
        return nn.initializers.lecun_normal()(key, self.proj_shape, jnp.float32)

    def jit_train_step(self, train_step: Callable, state_sh, batch_sh) -> _WithTeacher:
        """``train_step(state, batch, teacher)`` jitted over the mesh (state donated, the
        teacher a frozen, sharded input), bound to the teacher: called as ``(state, batch)``."""
        replicated = NamedSharding(batch_sh.mesh, P())
        jitted = jax.jit(
            train_step,
            in_shardings=(state_sh, batch_sh, self.shardings),
            out_shardings=(state_sh, replicated),
            donate_argnums=0,
        )
        return _WithTeacher(jitted, self.variables)


class _WithTeacher:
    """A jitted ``(state, batch, teacher)`` step called as ``(state, batch)``."""

    def __init__(self, jitted: Callable, teacher: Any):
        self.jitted, self.teacher = jitted, teacher

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.teacher)

    def lower(self, state, batch):
        return self.jitted.lower(state, batch, self.teacher)


def no_train_step(state, batch):
    """The train step of a distilled run rebuilt without its teacher (evaluation only)."""
    raise RuntimeError(
        "this distilled run was rebuilt without its teacher (for evaluation): it cannot train"
    )


def without_teacher(
    cfg: mc.ConfigDict, task: str, per_example_loss: Callable, proj_shape, tx
) -> Distiller:
    """A ``Distiller`` with no teacher, only to lay out a distilled run's state (the
    hidden-state projection of ``proj_shape``) for restoring its checkpoints."""
    d = cfg.distill
    return Distiller(
        model=None,
        variables=None,
        shardings=None,
        source="",
        task=task,
        alpha=float(d.alpha),
        temperature=float(d.temperature),
        hidden_weight=float(d.hidden_weight),
        per_example_loss=per_example_loss,
        proj_shape=None if proj_shape is None else tuple(int(n) for n in proj_shape),
        seed=cfg.seed,
        tx=tx,
    )


def _build_model(cfg: mc.ConfigDict, num_outputs: int, dtype, task: str) -> nn.Module:
    from ftlab.interop.build import build_model  # HF families, and the registry's others

    return build_model(cfg, num_outputs, dtype, task)


def _load_hf_variables(cfg: mc.ConfigDict, model: nn.Module, sample, rng) -> tuple[dict, list]:
    from ftlab.interop.build import load_hf_variables

    return load_hf_variables(cfg, model, sample, rng)


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file() or (path / "params").is_dir():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _teacher_model(
    cfg: mc.ConfigDict, data, sample, dtype, model_cfg: mc.ConfigDict | None = None
) -> tuple[nn.Module, Callable[[], dict], str]:
    """``(model, load variables, description)`` for ``cfg.distill.teacher``; ``model_cfg``
    (the planner's: a teacher not trained yet, or a hub model's shapes) builds the model
    without reading the teacher's directory."""
    spec = cfg.distill.teacher
    path = Path(spec).expanduser()
    if model_cfg is not None:
        model = _build_model(model_cfg, data.num_outputs, dtype, data.task)

        def no_weights() -> dict:
            raise ConfigError(f"config.distill.teacher: {spec}: only its shapes are known")

        return model, no_weights, f"teacher {spec}"
    if _is_hf_dir(path):
        model_cfg = mc.ConfigDict(cfg.model.to_dict())
        model_cfg.name, model_cfg.pretrained = "hf", str(path)
        model_cfg.hf_config = mc.ConfigDict()
        model = _build_model(model_cfg, data.num_outputs, dtype, data.task)

        def load_hf() -> dict:
            variables, notes = _load_hf_variables(
                model_cfg, model, sample, jax.random.key(cfg.seed)
            )
            fresh = [note for note in notes if "fresh" in note]
            if fresh:  # a new head (other classes, or none): the teacher would be untrained
                raise ConfigError(
                    f"config.distill.teacher: the Hugging Face model {path} lacks trained weights "
                    f"for this task ({'; '.join(fresh)}); its head must fit the student's "
                    f"{data.num_outputs} outputs: distil from an ftlab run that fine-tuned it"
                )
            return jax.tree.map(jnp.asarray, variables)

        return model, load_hf, f"Hugging Face model {path}"
    if not path.is_dir():
        raise ConfigError(
            f"config.distill.teacher: {spec} is neither an ftlab run directory (holding "
            "params/) nor a Hugging Face model directory (holding config.json)"
        )
    try:
        params_dir, _ = run_files.resolve_init(str(path))
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.init.checkpoint", "config.distill.teacher"))
    run_dir = params_dir.parent
    if not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"config.distill.teacher: {run_dir} has no config.json, so the teacher's model "
            "cannot be built; name an ftlab run directory"
        )
    saved = json.loads((run_dir / "config.json").read_text())
    model_cfg = mc.ConfigDict(saved["model"])
    outputs = data.num_outputs
    summary = run_dir / "summary.json"
    if data.task == "classification" and summary.is_file():
        names = json.loads(summary.read_text()).get("class_names") or []
        outputs = len(names) or outputs
    model = _build_model(model_cfg, outputs, dtype, data.task)

    def load_run() -> dict:
        variables = {"params": checkpoint.load_pytree(params_dir)}
        if (run_dir / "model_state").is_dir():
            variables.update(checkpoint.load_pytree(run_dir / "model_state"))
        return variables

    return model, load_run, f"run {run_dir}"


def _outputs(model: nn.Module, variables: Any, sample, hidden: bool) -> tuple[Any, Any]:
    """Shapes of ``model``'s outputs and (``hidden``) its last hidden state."""

    def run(v):
        with capture_hidden(hidden) as got:
            out = model.apply(v, sample, train=False)
        return out, (got[-1] if got else None)

    return jax.eval_shape(run, variables)


def load(
    cfg: mc.ConfigDict,
    data,
    model: nn.Module,
    sample,
    mesh,
    per_example_loss: Callable,
    dtype,
    tx=None,
    frozen_dtype: str = "float32",
    *,
    weights: bool = True,
    model_cfg: mc.ConfigDict | None = None,
) -> Distiller:
    """The teacher of ``cfg.distill``, checked against the student before anything compiles:
    the task must have class or token distributions, the output sizes (classes, vocabulary)
    must agree, and its saved parameters must fit its model. Variables are placed on ``mesh``
    sharded by the models' logical axes (floating leaves in ``frozen_dtype``).

    Without ``weights`` (the planner) nothing is read but the teacher's config: its variables
    are ``ShapeDtypeStruct``s carrying the dtypes and shardings the loaded ones would have
    (``model_cfg``: its model config, when its directory does not exist yet)."""
    from ftlab.parallel import shard

    d = cfg.distill
    if data.task not in ("classification", "causal_lm"):
        raise ConfigError(
            f"config.distill.teacher: distillation needs class or token distributions; the "
            f"task is {data.task} (for a regression teacher, train on its predictions as "
            "labels instead)"
        )
    t_model, load_variables, source = _teacher_model(cfg, data, sample, dtype, model_cfg)
    what = "vocabulary size" if data.task == "causal_lm" else "classes"

    def mismatch(teacher: int, student: int) -> None:
        if teacher != student:
            raise ConfigError(
                f"config.distill.teacher: the teacher ({source}) has {teacher} outputs "
                f"({what}) but the student has {student}; distillation needs the same {what}"
            )

    vocab = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (t_model, model)]
    if None not in vocab:  # decoders: known from their configs, before running anything
        mismatch(int(vocab[0]), int(vocab[1]))
    key = jax.random.key(cfg.seed)
    hidden = bool(d.hidden_weight)
    s_boxed = jax.eval_shape(model.init, key, sample)
    s_out, s_hidden = _outputs(model, nn.meta.unbox(s_boxed), sample, hidden)
    try:
        t_boxed = jax.eval_shape(t_model.init, key, sample)
        t_out, t_hidden = _outputs(t_model, nn.meta.unbox(t_boxed), sample, hidden)
    except (TypeError, ValueError, KeyError) as e:  # a teacher that cannot read the inputs
        raise ConfigError(
            f"config.distill.teacher: the teacher ({source}) cannot run on this data's inputs "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    mismatch(int(t_out.shape[-1]), int(s_out.shape[-1]))
    if hidden and (t_hidden is None or s_hidden is None):
        raise ConfigError(
            "config.distill.hidden_weight: no last hidden state found (the input of a module "
            f"named {', '.join(HEAD_NAMES)} or of a tied embedding's attend); set it to 0"
        )
    expected = tree.flatten(nn.meta.unbox(t_boxed))

    def stored_dtype(path: str):
        dt = jnp.dtype(expected[path].dtype)
        if frozen_dtype != "float32" and jnp.issubdtype(dt, jnp.floating):
            return jnp.dtype(frozen_dtype)
        return dt

    axes = shard.logical_axes(dict(t_boxed))
    flat_sh = {
        p: NamedSharding(mesh, shard.mesh_spec(axes.get(p), tuple(x.shape), mesh))
        for p, x in expected.items()
    }
    shardings = tree.unflatten(flat_sh)
    if not weights:  # shapes only: what the loaded teacher would be on the mesh
        variables = tree.unflatten(
            {
                p: jax.ShapeDtypeStruct(tuple(x.shape), stored_dtype(p), sharding=flat_sh[p])
                for p, x in expected.items()
            }
        )
    else:
        got = tree.flatten(load_variables())
        for path, leaf in expected.items():
            if path not in got:
                raise ConfigError(f"config.distill.teacher: {source} has no {path!r}")
            if tuple(got[path].shape) != tuple(leaf.shape):
                raise ConfigError(
                    f"config.distill.teacher: {path!r} has shape {tuple(got[path].shape)} in "
                    f"{source}, {tuple(leaf.shape)} in the teacher's model"
                )
        variables = tree.unflatten(
            {p: jnp.asarray(got[p], expected[p].dtype).astype(stored_dtype(p)) for p in expected}
        )
        variables = jax.device_put(variables, shardings)
        log.info(
            "distilling from %s: alpha %g, temperature %g%s (%s teacher parameters)",
            source,
            d.alpha,
            d.temperature,
            f", hidden weight {d.hidden_weight:g}" if hidden else "",
            f"{tree.count(variables['params']):,}",
        )
    proj = None
    if hidden:
        proj = (int(s_hidden.shape[-1]), int(t_hidden.shape[-1]))
    return Distiller(
        model=t_model,
        variables=variables,
        shardings=shardings,
        source=source,
        task=data.task,
        alpha=float(d.alpha),
        temperature=float(d.temperature),
        hidden_weight=float(d.hidden_weight),
        per_example_loss=per_example_loss,
        proj_shape=proj,
        seed=cfg.seed,
        tx=tx,
    )


__all__ = [
    "Distiller",
    "capture_hidden",
    "distill_loss",
    "hidden_mse",
    "kl_divergence",
    "load",
]
