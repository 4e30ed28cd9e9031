"""Optimiser and learning-rate schedule from ``config.optim``, over the trainable tree only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mc
import optax


def schedule(cfg: mc.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then constant, cosine or linear decay to ``lr * final_lr_fraction``."""
    warmup = min(cfg.warmup_steps, total_steps)
    end = cfg.lr * cfg.final_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.final_lr_fraction)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def decay_mask(params):
    """Weight decay on kernels (and LoRA factors) only: never on biases or norm scales."""

    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        return (
            leaf.ndim > 1
            and names[-1] not in ("bias", "scale")
            and not any("norm" in n.lower() for n in names)
        )

    return jax.tree_util.tree_map_with_path(decays, params)


def _decoupled_weight_decay(rate: float, lr: optax.Schedule) -> optax.GradientTransformation:
    """Adds ``-lr(step) * rate * param`` to the update (masked), as adamw does.

    optax's adafactor applies its own decay without the learning rate; this keeps
    ``optim.weight_decay`` meaning the same thing for every optimiser.
    """

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params):
        factor = lr(state.count) * rate
        updates = jax.tree.map(
            lambda u, p, decay: u - factor * p if decay else u,
            updates,
            params,
            decay_mask(params),
        )
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def with_state_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``tx`` whose floating state (adam's moments) is stored in ``dtype`` between steps and
    computed in float32 inside the update (``optim.state_dtype = "bfloat16"`` halves it)."""

    def cast(state, to):
        return jax.tree.map(
            lambda x: x.astype(to) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x,
            state,
        )

    def init(params):
        return cast(tx.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def optimizer(
    cfg: mc.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(cfg, total_steps)
    if cfg.name == "adamw":
        base = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.sgd(lr, momentum=cfg.momentum or None),
        )
    elif cfg.name == "adafactor":
        base = optax.chain(optax.adafactor(lr), _decoupled_weight_decay(cfg.weight_decay, lr))
    else:
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    if cfg.clip_norm > 0:
        base = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), base)
    if cfg.get("state_dtype", "float32") != "float32":
        base = with_state_dtype(base, jnp.dtype(cfg.state_dtype))
    return base, lr
