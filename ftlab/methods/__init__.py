"""Fine-tuning methods as masks and transforms over one parameter tree.

``build_method`` reads ``config.method`` and the model's parameter paths and returns a
``Method`` that splits the parameters into a trainable and a frozen subtree, adds
method-owned leaves (LoRA factors), and recombines them for ``model.apply``. The train
step differentiates only the trainable subtree, so frozen leaves have no gradient and no
optimizer state at all.

Trainable tree layout: ``{"params": <trained base leaves, nested>, "lora": {<kernel path>: {"a", "b"}}}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc

from ftlab import tree
from ftlab.config import ConfigError
from ftlab.methods import lora as lora_lib
from ftlab.methods import select
from ftlab.methods.lora import LoraSpec


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    trained: tuple[str, ...]  # base-parameter paths that are trained
    lora_targets: tuple[str, ...] = ()  # kernel paths that get LoRA factors
    lora: LoraSpec | None = None
    frozen_dtype: str = "float32"  # floating frozen leaves are stored in this dtype

    def _store_frozen(self, value: Any) -> Any:
        if self.frozen_dtype == "float32" or not jnp.issubdtype(value.dtype, jnp.floating):
            return value
        return value.astype(self.frozen_dtype)

    # -- building the trees ---------------------------------------------------------------
    def split(self, params: Mapping, rng: jax.Array) -> tuple[dict, dict]:
        """(trainable, frozen) from full base parameters; LoRA factors are created here.

        Frozen floating leaves are stored in ``frozen_dtype`` (bfloat16 halves their bytes);
        trainable leaves keep the parameters' float32, and so does the optimizer state."""
        flat = tree.flatten(params)
        trained = set(self.trained)
        factors = {}
        for i, path in enumerate(self.lora_targets):
            factors[path] = lora_lib.init_factors(
                jax.random.fold_in(rng, i), flat[path].shape, self.lora.rank
            )
        trainable = {
            "params": tree.unflatten({p: v for p, v in flat.items() if p in trained}),
            "lora": tree.unflatten(
                {f"{p}/{k}": v for p, f in factors.items() for k, v in f.items()}
            ),
        }
        frozen = tree.unflatten(
            {p: self._store_frozen(v) for p, v in flat.items() if p not in trained}
        )
        return trainable, frozen

    def base_params(self, trainable: Mapping, frozen: Mapping) -> dict:
        """The base tree the model sees (without LoRA factors)."""
        return tree.unflatten({**tree.flatten(frozen), **tree.flatten(trainable["params"])})

    def lora_factors(self, trainable: Mapping) -> dict[str, dict]:
        """``{kernel path: {"a", "b"}}`` for every LoRA target (for merging, export, decoding)."""
        flat = tree.flatten(trainable.get("lora", {}))
        return {p: {"a": flat[f"{p}/a"], "b": flat[f"{p}/b"]} for p in self.lora_targets}

    def merged_params(self, trainable: Mapping, frozen: Mapping) -> dict:
        """Base parameters with LoRA folded in: a plain model tree for export and evaluation
        (frozen leaves stored in a smaller dtype come back as float32, the parameters' dtype)."""
        flat = tree.flatten(self.base_params(trainable, frozen))
        if self.frozen_dtype != "float32":
            flat = {
                p: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v
                for p, v in flat.items()
            }
        if self.lora_targets:
            flat = lora_lib.merge(flat, self.lora_factors(trainable), self.lora.scale)
        return tree.unflatten(flat)

    # -- running the model ----------------------------------------------------------------
    def apply(
        self,
        model: nn.Module,
        trainable: Mapping,
        frozen: Mapping,
        inputs: Any,
        *,
        train: bool,
        rng: jax.Array | None = None,
        model_state: Mapping | None = None,
        update_state: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """``model.apply`` on the combined tree; LoRA runs factored inside its layers.

        ``model_state`` holds the model's other collections (BatchNorm ``batch_stats``);
        with ``update_state`` (training) it returns ``(outputs, updated model_state)``.
        ``model_kwargs`` go to the model's call (``return_hidden=True``).
        """
        params = self.base_params(trainable, frozen)
        model_state = dict(model_state or {})
        rngs = {"dropout": jax.random.fold_in(rng, 0)} if (train and rng is not None) else {}
        mutable = list(model_state) if update_state else False

        def call():  # with a mutable list (even empty), flax returns (outputs, updated state)
            return model.apply(
                {"params": params, **model_state},
                inputs,
                train=train,
                rngs=rngs,
                mutable=mutable,
                **model_kwargs,
            )

        if not self.lora_targets:
            return call()
        factors = {p.rsplit("/", 1)[0]: f for p, f in self.lora_factors(trainable).items()}
        lora_rng = jax.random.fold_in(rng, 1) if (train and rng is not None) else None
        with nn.intercept_methods(lora_lib.interceptor(factors, self.lora, lora_rng)):
            return call()

    # -- reporting ------------------------------------------------------------------------
    def summary(self, trainable: Mapping, frozen: Mapping) -> str:
        n_train = tree.count(trainable)
        n_total = tree.count(frozen) + tree.count(trainable["params"])
        parts = [
            (
                f"method {self.name}: trainable {n_train:,} / {n_total:,} parameters "
                f"({100.0 * n_train / max(n_total, 1):.2f}%)"
            )
        ]
        if self.trained:
            parts.append("trained: " + ", ".join(sorted(self.trained)))
        if self.lora_targets:
            parts.append(
                f"lora r={self.lora.rank} alpha={self.lora.alpha:g} scale={self.lora.scale:g} on: "
                + ", ".join(self.lora_targets)
            )
        return " | ".join(parts)


def frozen_dtype(name: str, backend: str | None = None) -> str:
    """``method.frozen_dtype``: ``auto`` is bfloat16 on GPU/TPU and float32 on CPU (``backend``,
    default this process's: a planner for another target passes the target's)."""
    if name == "auto":
        backend = backend or jax.default_backend()
        return "bfloat16" if backend in ("gpu", "cuda", "rocm", "tpu") else "float32"
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"config.method.frozen_dtype: {name!r}; choose auto, float32, bfloat16")
    return name


def build_method(cfg: mc.ConfigDict, params: Mapping, backend: str | None = None) -> Method:
    """Resolve ``config.method`` against the model's parameter paths (errors name the key);
    ``backend`` resolves ``frozen_dtype = "auto"`` (default: this process's backend)."""
    flat = tree.flatten(params)
    paths = sorted(flat)
    trained = select.by_regexes(paths, cfg.trainable, "method.trainable")
    lora_targets: list[str] = []
    spec = None
    if cfg.name == "full":
        trained = set(paths)
    elif cfg.name == "partial":
        p = cfg.partial
        if p.last_k > 0:
            trained |= select.last_k_blocks(paths, p.last_k, p.block_pattern)
        else:
            blocks = select.by_regexes(paths, p.blocks, "method.partial.blocks")
            trained |= blocks
    elif cfg.name == "bitfit":
        trained |= select.biases(paths)
    elif cfg.name == "lora":
        spec = LoraSpec(
            cfg.lora.rank,
            float(cfg.lora.alpha),
            float(cfg.lora.dropout),
            cfg.lora.rslora,
        )
        kernels = [p for p in paths if p.rsplit("/", 1)[-1] == "kernel"]
        for pattern in cfg.lora.targets:
            hits = select.matching(kernels, pattern)
            if not hits:
                raise ConfigError(
                    f"config.method.lora.targets: regex {pattern!r} matches no kernel; "
                    f"kernels are: {', '.join(kernels[:8])}{', ...' if len(kernels) > 8 else ''}"
                )
            lora_targets += [h for h in hits if h not in lora_targets]
        for path in lora_targets:
            lora_lib.check_target(path, tuple(flat[path].shape), spec.rank)
            if path in trained:
                raise ConfigError(
                    f"config.method: {path!r} is both fully trained (method.trainable) and a LoRA target"
                )
    elif cfg.name != "frozen":
        raise ConfigError(f"config.method.name: unknown method {cfg.name!r}")
    return Method(
        cfg.name,
        tuple(sorted(trained)),
        tuple(lora_targets),
        spec,
        frozen_dtype(cfg.get("frozen_dtype", "float32"), backend),
    )
