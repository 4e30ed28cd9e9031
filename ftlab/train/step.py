"""Pure train and eval steps: ``(state, batch) -> (state, metrics)``.

They close over the model, the method, the optimiser and the loss, and take nothing
else, so the loop (or the sharding layer) can ``jax.jit`` them with donated state and,
later, in/out shardings, without touching this file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ftlab.config import ConfigError
from ftlab.methods import Method
from ftlab.train import losses
from ftlab.train.rng import dropout_key
from ftlab.train.state import TrainState

Batch = dict[str, jax.Array]


def make_train_step(
    model: nn.Module,
    method: Method,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    per_example_loss: Callable[[jax.Array, Batch], jax.Array],
    accum_steps: int = 1,
    model_kwargs: Mapping[str, Any] | None = None,
    dropout_rng: str = "auto",
    distill: Any = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """One optimizer update; with ``accum_steps > 1`` the batch is split into micro-batches
    whose gradients are summed (same update as the full batch, less activation memory).
    Dropout draws from ``ftlab.train.rng.dropout_key(step key, dropout_rng)``: under ``auto``
    a cheap counter-based hash on CPU (threefry was ~12% of a GPT-2 step there), threefry on
    accelerators.
    ``model_kwargs`` go to the model's call: ``{"return_hidden": True}`` with
    ``losses.chunked_causal_lm`` computes the LM loss a chunk of positions at a time.

    The loss is the ``weights``-weighted mean over the whole batch (weights: 0 for padding
    rows, token counts for language modelling, class weights), so each micro-batch adds its
    weighted sum divided by the full batch's total weight.

    ``distill`` (a ``ftlab.train.distill.Distiller``) adds a frozen teacher: the step is then
    ``train_step(state, batch, teacher_variables)``, the loss is the distillation loss and the
    metrics carry its parts (``ce``, ``distill_kl``) as the same weighted means.
    """
    parts_names = tuple(distill.parts) if distill is not None else ()

    def loss_fn(trainable, frozen, model_state, batch: Batch, rng, total, teacher=None):
        from ftlab.train.distill import capture_hidden

        with capture_hidden(bool(distill is not None and distill.hidden_weight)) as hidden:
            outputs, model_state = method.apply(
                model,
                trainable,
                frozen,
                batch["inputs"],
                train=True,
                rng=rng,
                model_state=model_state,
                update_state=True,
                **dict(model_kwargs or {}),
            )
        if distill is None:
            values, parts = per_example_loss(outputs, batch), {}
        else:
            values, parts = distill.loss(outputs, hidden, teacher, batch, trainable)
        weights = batch.get("weights")
        weights = jnp.ones_like(values) if weights is None else weights
        parts = {k: jnp.sum(v * weights) / total for k, v in parts.items()}
        return jnp.sum(values * weights) / total, (model_state, parts)

    # w.r.t. the trainable subtree only; updated batch statistics ride along as aux
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch, teacher=None) -> tuple[TrainState, dict]:
        rng = dropout_key(state.step_rng(), dropout_rng)
        weights = batch.get("weights")
        size = jax.tree.leaves(batch["labels"])[0].shape[0]
        total = jnp.float32(size) if weights is None else jnp.maximum(jnp.sum(weights), 1.0)
        if accum_steps == 1:
            (loss, (model_state, parts)), grads = grad_fn(
                state.trainable, state.frozen, state.model_state, batch, rng, total, teacher
            )
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)

            def accumulate(carry, inputs):
                loss_sum, grad_sum, model_state, part_sums = carry
                i, mb = inputs
                (loss, (model_state, parts)), grads = grad_fn(
                    state.trainable,
                    state.frozen,
                    model_state,
                    mb,
                    jax.random.fold_in(rng, i),
                    total,
                    teacher,
                )
                return (
                    loss_sum + loss,
                    jax.tree.map(jnp.add, grad_sum, grads),
                    model_state,
                    jax.tree.map(jnp.add, part_sums, parts),
                ), None

            zeros = (
                jnp.zeros((), jnp.float32),
                jax.tree.map(jnp.zeros_like, state.trainable),
                state.model_state,
                {k: jnp.zeros((), jnp.float32) for k in parts_names},
            )
            (loss, grads, model_state, parts), _ = jax.lax.scan(
                accumulate, zeros, (jnp.arange(accum_steps), micro)
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree_utils.tree_norm(grads),
            "lr": lr_schedule(state.step),
            **parts,
        }
        new_state = state.replace(
            step=state.step + 1, trainable=trainable, opt_state=opt_state, model_state=model_state
        )
        return new_state, metrics

    return train_step


def training_loss(
    train_cfg: Any, method: Method, per_example_loss: Callable[[jax.Array, Batch], jax.Array]
) -> tuple[Callable[[Any, Batch], jax.Array], dict[str, Any]]:
    """The train step's ``(per_example_loss, model_kwargs)`` for ``config.train``: with
    ``train.loss_chunk > 0`` (causal LM) the model returns its final hidden states and LM head
    matrix and the loss forms the logits a chunk at a time; else the plain loss."""
    chunk = train_cfg.get("loss_chunk", 0)
    if not chunk:
        return per_example_loss, {}
    adapted = [p for p in method.lora_targets if p.startswith("lm_head/")]
    if adapted:
        raise ConfigError(
            f"config.train.loss_chunk: the chunked loss applies the LM head itself, so LoRA "
            f"on {adapted[0]!r} would be skipped; drop it from method.lora.targets or set "
            "train.loss_chunk = 0"
        )
    loss = losses.chunked_causal_lm(chunk, train_cfg.label_smoothing)
    return loss, {"return_hidden": True}


def make_eval_step(
    model: nn.Module,
    method: Method,
    per_example_loss: Callable[[jax.Array, Batch], jax.Array],
    task: str = "classification",
) -> Callable[[TrainState, Batch], dict]:
    """Per-example outputs and losses; the caller drops padding and computes metrics on the
    whole split (never on one batch).

    A causal LM returns, instead of its logits (batch x length x vocabulary: too large to
    fetch), each example's target-token count, correctly predicted tokens and plain
    (unsmoothed) cross-entropy, from which perplexity and token accuracy follow; so does a
    sequence-to-sequence model (``task="seq2seq"``) on its decoder targets.
    """

    def eval_step(state: TrainState, batch: Batch) -> dict:
        outputs = method.apply(
            model,
            state.trainable,
            state.frozen,
            batch["inputs"],
            train=False,
            model_state=state.model_state,
        )
        loss = per_example_loss(outputs, batch)
        if task not in ("causal_lm", "seq2seq"):  # seq2seq: token metrics of the decoder
            return {"outputs": outputs.astype(jnp.float32), "loss": loss}
        labels = batch["labels"]
        mask = labels >= 0
        hits = (jnp.argmax(outputs, -1) == labels) & mask
        return {
            "loss": loss,
            "nll": losses.causal_lm_loss(outputs, batch),
            "tokens": jnp.sum(mask, -1).astype(jnp.float32),
            "correct": jnp.sum(hits, -1).astype(jnp.float32),
        }

    return eval_step
