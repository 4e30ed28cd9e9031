"""The training state: one pytree that a step maps to the next one."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done so far
    trainable: Any  # {"params": trained base leaves, "lora": LoRA factors}
    frozen: Any  # every other base leaf, never differentiated
    opt_state: optax.OptState  # only for the trainable leaves
    rng: jax.Array  # raw uint32 key data (checkpoint friendly); step keys are folded from it
    model_state: Any = flax.struct.field(default_factory=dict)  # e.g. BatchNorm batch_stats

    @classmethod
    def create(
        cls,
        trainable: Any,
        frozen: Any,
        tx: optax.GradientTransformation,
        seed: int,
        model_state: Any = None,
    ):
        return cls(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=tx.init(trainable),
            rng=jax.random.key_data(jax.random.key(seed)),
            model_state=dict(model_state or {}),
        )

    def step_rng(self) -> jax.Array:
        """A key unique to this step: the same on an uninterrupted and a resumed run."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
