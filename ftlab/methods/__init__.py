"""Fine-tuning methods as masks and transforms over one parameter tree.

``build_method`` reads ``config.method`` and the model's parameter paths and returns a
``Method`` that splits the parameters into a trainable and a frozen subtree, adds
method-owned leaves (LoRA factors), and recombines them for ``model.apply``. The train
step differentiates only the trainable subtree, so frozen leaves have no gradient and no
optimizer state at all.

Trainable tree layout: ``{"params": <trained base leaves, nested>, "lora": {<kernel path>: {"a", "b"}}}``.

DoRA (``method.lora.dora``) and IA3 (``method.name = "ia3"``) are combine steps
(``ftlab.methods.dora`` / ``ia3``): their kernels (``Method.dora_targets`` /
``Method.ia3_targets``) are replaced in ``base_params`` by the combined kernel the model sees
(``m * V / ||V||``; ``W * l``), so every consumer of ``base_params`` (apply, merge, export,
generation) gets them. Extra trainable leaves: ``"dora": {<kernel path>: {"m"}}`` beside the
factors in ``"lora"``, and ``"ia3": {<kernel path>: {"out" | "in"}}``.

QLoRA (``method.name = "qlora"``, or any method with ``method.quantize = "int8" | "nf4"``):
the frozen kernels listed in ``Method.quantized`` are stored in the frozen tree as
``ftlab.methods.quantize.QuantizedArray`` leaves (packed codes + float32 scales, at the
kernel's own path) and dequantised inside each layer's call; LoRA factors and any
``method.trainable`` leaves train on top in float32.

Prompt tuning (``method.name = "prompt"``, ``ftlab.methods.prompt``): one extra trainable leaf
``"prompt": {"embeddings": (v, embed)}`` (``Method.prompt_tokens`` = v), passed by ``apply``
to the model as ``prompt_embeds`` (a decoder prepends it to the token embeddings and slices it
off the outputs; T5 prepends it to the encoder's input embeddings). It merges into no weight:
``merged_params`` (the exported plain model) is the base.
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
from ftlab.methods import dora as dora_lib
from ftlab.methods import ia3 as ia3_lib
from ftlab.methods import lora as lora_lib
from ftlab.methods import prompt as prompt_lib
from ftlab.methods import quantize as quant_lib
from ftlab.methods import select
from ftlab.methods.lora import LoraSpec


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    trained: tuple[str, ...]  # base-parameter paths that are trained
    lora_targets: tuple[str, ...] = ()  # kernel paths that get LoRA factors
    lora: LoraSpec | None = None
    frozen_dtype: str = "float32"  # floating frozen leaves are stored in this dtype
    quantize: str = "none"  # frozen kernels in ``quantized`` are stored as: none | int8 | nf4
    quantized: tuple[str, ...] = ()  # frozen kernel paths stored quantised
    quantize_block: int = quant_lib.BLOCK  # NF4 block size along the fan-in axis
    quantize_double: bool = False  # NF4's block absmax quantised too (QLoRA's double quant)
    dora_targets: tuple[str, ...] = ()  # kernels adapted by DoRA (LoRA factors + magnitude)
    ia3_targets: tuple[str, ...] = ()  # kernels scaled by IA3 vectors
    ia3_input: tuple[str, ...] = ()  # of those, the ones scaled on the input side
    prompt_tokens: int = 0  # prompt tuning: virtual tokens of the soft prompt (0: none)
    prompt_init: str = "random"  # its init: random | vocab | text (ftlab.methods.prompt)
    prompt_source: str = ""  # the token embedding path (width; rows copied by vocab / text)
    prompt_init_ids: tuple[int, ...] = ()  # text init: the token ids copied
    prompt_init_text: str = ""  # text init: the text (PEFT's prompt_tuning_init_text)

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
        for i, path in enumerate((*self.lora_targets, *self.dora_targets)):
            factors[path] = lora_lib.init_factors(
                jax.random.fold_in(rng, i), flat[path].shape, self.lora.rank
            )
        trainable = {
            "params": tree.unflatten({p: v for p, v in flat.items() if p in trained}),
            "lora": tree.unflatten(
                {f"{p}/{k}": v for p, f in factors.items() for k, v in f.items()}
            ),
        }
        quantized = set(self.quantized)
        frozen = tree.unflatten(
            {
                p: (
                    quant_lib.quantize(v, self.quantize, self.quantize_block, self.quantize_double)
                    if p in quantized
                    else self._store_frozen(v)
                )
                for p, v in flat.items()
                if p not in trained
            }
        )
        if self.dora_targets or self.ia3_targets:
            trainable.update(self._init_scaling(flat, tree.flatten(frozen)))
        if self.prompt_tokens:
            prompt = prompt_lib.init_embeddings(
                flat[self.prompt_source],
                self.prompt_tokens,
                self.prompt_init,
                jax.random.fold_in(rng, 1 << 20),
                self.prompt_init_ids,
            )
            trainable["prompt"] = {"embeddings": prompt}
        return trainable, frozen

    def _init_scaling(self, flat: Mapping, flat_frozen: Mapping) -> dict:
        """DoRA magnitudes (column norms of the kernels as stored frozen, so step 0 is the
        base model) and IA3 vectors (ones)."""
        out = {}
        if self.dora_targets:
            out["dora"] = tree.unflatten(
                {f"{p}/m": dora_lib.init_magnitude(flat_frozen[p]) for p in self.dora_targets}
            )
        if self.ia3_targets:
            sides = {p: "in" if p in self.ia3_input else "out" for p in self.ia3_targets}
            out["ia3"] = tree.unflatten(
                {f"{p}/{s}": ia3_lib.init_scale(flat[p].shape, s) for p, s in sides.items()}
            )
        return out

    def base_params(self, trainable: Mapping, frozen: Mapping) -> dict:
        """The base tree the model sees (without LoRA factors, which run inside the layers;
        DoRA and IA3 kernels already combined, in float32)."""
        flat = {**tree.flatten(frozen), **tree.flatten(trainable["params"])}
        if self.dora_targets:
            flat = dora_lib.combine_flat(
                flat, self.dora_factors(trainable), self.dora_magnitudes(trainable), self.lora.scale
            )
        if self.ia3_targets:
            flat = ia3_lib.combine_flat(flat, self.ia3_scales(trainable))
        return tree.unflatten(flat)

    def dora_factors(self, trainable: Mapping) -> dict[str, dict]:
        """``{kernel path: {"a", "b"}}`` for every DoRA target."""
        flat = tree.flatten(trainable.get("lora", {}))
        return {p: {"a": flat[f"{p}/a"], "b": flat[f"{p}/b"]} for p in self.dora_targets}

    def dora_magnitudes(self, trainable: Mapping) -> dict[str, jax.Array]:
        """``{kernel path: m}`` (one per output unit) for every DoRA target."""
        flat = tree.flatten(trainable.get("dora", {}))
        return {p: flat[f"{p}/m"] for p in self.dora_targets}

    def ia3_scales(self, trainable: Mapping) -> dict[str, tuple[str, jax.Array]]:
        """``{kernel path: (side, l)}`` (side ``"out"`` or ``"in"``) for every IA3 target."""
        flat = tree.flatten(trainable.get("ia3", {}))
        sides = {p: "in" if p in self.ia3_input else "out" for p in self.ia3_targets}
        return {p: (s, flat[f"{p}/{s}"]) for p, s in sides.items()}

    def lora_factors(self, trainable: Mapping) -> dict[str, dict]:
        """``{kernel path: {"a", "b"}}`` for every LoRA target (for merging, export, decoding)."""
        flat = tree.flatten(trainable.get("lora", {}))
        return {p: {"a": flat[f"{p}/a"], "b": flat[f"{p}/b"]} for p in self.lora_targets}

    def prompt_embeddings(self, trainable: Mapping) -> jax.Array | None:
        """The soft prompt (v, embed) of prompt tuning, else None."""
        return prompt_lib.embeddings(trainable) if self.prompt_tokens else None

    def merged_params(self, trainable: Mapping, frozen: Mapping) -> dict:
        """Base parameters with LoRA folded in: a plain model tree for export and evaluation
        (frozen leaves stored in a smaller dtype come back as float32, the parameters' dtype).
        A soft prompt (prompt tuning) folds into no weight: it is not in this tree."""
        flat = quant_lib.dequantize_flat(tree.flatten(self.base_params(trainable, frozen)))
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
        ``model_kwargs`` go to the model's call (``return_hidden=True``); prompt tuning adds
        ``prompt_embeds`` (the soft prompt).
        """
        params = self.base_params(trainable, frozen)
        if self.prompt_tokens:
            model_kwargs["prompt_embeds"] = self.prompt_embeddings(trainable)
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

        if not self.lora_targets and not self.quantized:
            return call()
        factors = {p.rsplit("/", 1)[0]: f for p, f in self.lora_factors(trainable).items()}
        lora_rng = jax.random.fold_in(rng, 1) if (train and rng is not None) else None
        with nn.intercept_methods(lora_lib.interceptor(factors, self.lora, lora_rng)):
            return call()

    # -- reporting ------------------------------------------------------------------------
    def summary(self, trainable: Mapping, frozen: Mapping) -> str:
        """One line: the model's trainable share (the student's, for distillation: a learned
        hidden-state projection, ``trainable["distill"]``, is named apart), the methods."""
        extra = tree.count(trainable["distill"]) if "distill" in trainable else 0
        n_train = tree.count(trainable) - extra
        n_total = tree.count(frozen) + tree.count(trainable["params"])
        parts = [
            (
                f"method {self.name}: trainable {n_train:,} / {n_total:,} parameters "
                f"({100.0 * n_train / max(n_total, 1):.2f}%)"
                + (f" + distill projection {extra:,}" if extra else "")
            )
        ]
        if self.trained:
            parts.append("trained: " + ", ".join(sorted(self.trained)))
        if self.lora_targets:
            parts.append(
                f"lora r={self.lora.rank} alpha={self.lora.alpha:g} scale={self.lora.scale:g} on: "
                + ", ".join(self.lora_targets)
            )
        if self.dora_targets:
            parts.append(
                f"dora r={self.lora.rank} alpha={self.lora.alpha:g} scale={self.lora.scale:g} on: "
                + ", ".join(self.dora_targets)
            )
        if self.ia3_targets:
            parts.append(
                "ia3 on: "
                + ", ".join(
                    f"{p} ({'in' if p in self.ia3_input else 'out'})" for p in self.ia3_targets
                )
            )
        if self.prompt_tokens:
            dim = int(self.prompt_embeddings(trainable).shape[-1])
            parts.append(
                f"prompt: {self.prompt_tokens} virtual tokens x {dim} (init {self.prompt_init})"
            )
        if self.quantized:
            kinds = (
                "int8 per output channel"
                if self.quantize == "int8"
                else f"nf4, blocks of {self.quantize_block}"
                + (" (absmax double-quantised)" if self.quantize_double else "")
            )
            parts.append(f"frozen kernels {kinds}: {len(self.quantized)} kernels")
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


def build_method(
    cfg: mc.ConfigDict, params: Mapping, backend: str | None = None, tokenizer: Any = None
) -> Method:
    """Resolve ``config.method`` against the model's parameter paths (errors name the key);
    ``backend`` resolves ``frozen_dtype = "auto"`` (default: this process's backend);
    ``tokenizer`` (the run's) tokenises prompt tuning's ``init_text``."""
    flat = tree.flatten(params)
    paths = sorted(flat)
    trained = select.by_regexes(paths, cfg.trainable, "method.trainable")
    lora_targets: list[str] = []
    ia3_targets: tuple[str, ...] = ()
    ia3_input: tuple[str, ...] = ()
    prompt: dict[str, Any] = {}
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
    elif cfg.name in ("lora", "qlora"):
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
    elif cfg.name == "ia3":
        ia3 = cfg.get("ia3") or {}
        ia3_targets, ia3_input = ia3_lib.select_targets(
            tuple(ia3.get("targets", ())), tuple(ia3.get("feedforward", ())), flat, trained
        )
    elif cfg.name == "prompt":
        prompt = _prompt_fields(cfg.get("prompt") or {}, paths, tokenizer)
    elif cfg.name != "frozen":
        raise ConfigError(f"config.method.name: unknown method {cfg.name!r}")
    dora = bool(spec is not None and cfg.lora.get("dora", False))
    if dora and spec.dropout > 0:
        raise ConfigError(
            "config.method.lora.dropout: DoRA (method.lora.dora) is implemented as a combined "
            "kernel, which has no dropout on the low-rank branch; set it to 0"
        )
    qtype = quantize_type(cfg.name, cfg.get("quantize", "auto"))
    quantized: list[str] = []
    if qtype != "none":
        # regexes of kernels left unquantised (lm_head by default, as transformers' 4-bit
        # loading); one matching nothing is no error (the default on a model without lm_head)
        skip = {p for rx in cfg.get("quantize_skip", ()) for p in select.matching(paths, rx)}
        # DoRA / IA3 kernels are combined in base_params from the raw kernel: kept unquantised
        combined = {*(lora_targets if dora else ()), *ia3_targets}
        quantized = [
            p
            for p in quant_lib.kernel_paths(flat)
            if p not in trained and p not in skip and p not in combined
        ]
        if not quantized:
            raise ConfigError(
                f"config.method.quantize: {qtype!r} but no frozen kernel is left to quantise "
                "(every kernel is trained or matched by method.quantize_skip)"
            )
    block = int(cfg.get("quantize_block", quant_lib.BLOCK))
    if block < 1:
        raise ConfigError(f"config.method.quantize_block: must be >= 1, got {block}")
    double = cfg.get("quantize_double", False)
    if not isinstance(double, bool):
        raise ConfigError(f"config.method.quantize_double: must be True or False, got {double!r}")
    if double and qtype != "nf4":
        raise ConfigError(
            f"config.method.quantize_double: double quantisation compresses NF4's block absmax; "
            f"method.quantize is {qtype!r} (set it to 'nf4', or quantize_double to False)"
        )
    return Method(
        cfg.name,
        tuple(sorted(trained)),
        () if dora else tuple(lora_targets),
        spec,
        frozen_dtype(cfg.get("frozen_dtype", "float32"), backend),
        qtype,
        tuple(quantized),
        block,
        double,
        dora_targets=tuple(lora_targets) if dora else (),
        ia3_targets=ia3_targets,
        ia3_input=ia3_input,
        **prompt,
    )


def _prompt_fields(p: Mapping, paths: list[str], tokenizer: Any) -> dict[str, Any]:
    """``Method`` fields of ``config.method.prompt`` (prompt tuning); errors name the key."""
    source = prompt_lib.embedding_path(paths)
    num = p.get("num_virtual_tokens", 0)
    if isinstance(num, bool) or not isinstance(num, int) or num <= 0:
        raise ConfigError(
            f"config.method.prompt.num_virtual_tokens: must be an integer > 0, got {num!r}"
        )
    init = p.get("init", "random")
    if init not in prompt_lib.INITS:
        raise ConfigError(
            f"config.method.prompt.init: {init!r}; choose {', '.join(prompt_lib.INITS)}"
        )
    ids: tuple[int, ...] = ()
    if init == "text":
        ids = prompt_lib.tokenize_init_text(p.get("init_text", ""), tokenizer, num)
    return {
        "prompt_tokens": num,
        "prompt_init": init,
        "prompt_source": source,
        "prompt_init_ids": ids,
        "prompt_init_text": p.get("init_text", "") if init == "text" else "",
    }


def quantize_type(method_name: str, name: str) -> str:
    """``method.quantize``: ``auto`` is nf4 for ``qlora`` and none for every other method."""
    if name == "auto":
        return "nf4" if method_name == "qlora" else "none"
    if name not in ("none", *quant_lib.QTYPES):
        raise ConfigError(
            f"config.method.quantize: {name!r}; choose auto, none, {', '.join(quant_lib.QTYPES)}"
        )
    if method_name == "qlora" and name == "none":
        raise ConfigError(
            "config.method.quantize: 'none' with method 'qlora' (whose base is quantised); "
            "use method.name = 'lora' for an unquantised base"
        )
    return name
