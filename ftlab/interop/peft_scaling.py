"""DoRA and IA3 adapters in Hugging Face PEFT's format, read into and written from ftlab's
``method.lora.dora`` and ``method.name = "ia3"`` trees (``ftlab.methods.dora`` / ``ia3``).

**DoRA** is a PEFT LoRA adapter with ``use_dora: true`` and, per adapted module ``M``, one more
tensor ``base_model.model.M.lora_magnitude_vector`` of shape (out,) (PEFT's in-memory parameter
``...lora_magnitude_vector.default.weight``). The LoRA factors are read and written by
``ftlab.interop.peft`` (fused modules, rank padding and ftlab's placement metadata included);
this module adds the magnitudes, sliced per ftlab kernel the way the factors' ``B`` rows are
(GPT-2's fused ``c_attn`` holds ``q``/``k``/``v``). A kernel of a fused module that ftlab does
not adapt gets its column norms as magnitude on export (``W' = W`` there, up to rounding).

**IA3** (``peft_type: IA3``): per adapted module one ``base_model.model.M.ia3_l``: shape
(out, 1) scaling the module's output (bias included), or (1, in) scaling its input for the
modules listed in ``feedforward_modules`` (PEFT's rule: ``name.endswith(entry)``). A fused
module's output vector is the concatenation of its kernels' vectors (ones for a kernel ftlab
does not scale); an input-side vector is shared by all of a fused module's kernels.
``target_modules`` and ``feedforward_modules`` are written as the shortest name suffixes that
PEFT's matching rules resolve to exactly the adapted (feedforward) modules.

Fully trained leaves (``method.trainable``: a new head) go to ``modules_to_save`` as in
``ftlab.interop.peft``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ftlab import tree
from ftlab.interop import files
from ftlab.interop import peft as peft_lib
from ftlab.interop.errors import HFExportError, HFImportError, PeftAdapterError
from ftlab.interop.family import Family, get_family
from ftlab.interop.pretrained import config_dict, export_head
from ftlab.methods import Method
from ftlab.methods import quantize as quant_lib

PREFIX = peft_lib.PEFT_PREFIX
_MAGNITUDE = re.compile(
    rf"{re.escape(PREFIX)}(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?"
)
_IA3 = re.compile(rf"{re.escape(PREFIX)}(.+)\.ia3_l(?:\.default)?")


@dataclasses.dataclass
class ScaledAdapter:
    """An imported DoRA or IA3 adapter as an ftlab ``Method`` with its trainable leaves
    (``{"lora", "dora"}`` or ``{"ia3"}``, nested), the fully saved leaves ``{path: array}``
    (``modules_to_save``), the adapter config and notes."""

    method: Method
    leaves: dict[str, Any]
    modules: dict[str, np.ndarray]
    config: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)

    def split(self, params: Mapping) -> tuple[Method, dict, dict]:
        """(method, trainable, frozen) over base ``params``, ready for ``Method.apply``."""
        flat = tree.flatten(params)
        trainable = {"params": tree.unflatten(dict(self.modules)), **self.leaves}
        frozen = tree.unflatten({p: v for p, v in flat.items() if p not in self.modules})
        return self.method, trainable, frozen


# -- helpers --------------------------------------------------------------------------------


def _family(hf_config: Any, family: Family | str | None) -> tuple[dict, Family]:
    try:
        config = config_dict(hf_config)
        if family is None:
            if not config.get("model_type"):
                raise PeftAdapterError("hf_config has no model_type; pass family=")
            family = get_family(config["model_type"])
        elif isinstance(family, str):
            family = get_family(family)
    except (HFImportError, HFExportError) as e:
        raise PeftAdapterError(str(e)) from None
    return config, family


def _read(directory: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    path = directory / peft_lib.ADAPTER_CONFIG
    if not path.is_file():
        raise PeftAdapterError(
            f"{str(directory)!r} has no {peft_lib.ADAPTER_CONFIG} (is it a PEFT adapter directory?)"
        )
    config = json.loads(path.read_text())
    weights = directory / peft_lib.ADAPTER_WEIGHTS
    if not weights.is_file():
        raise PeftAdapterError(f"{str(directory)!r} has no {peft_lib.ADAPTER_WEIGHTS}")
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        names = list(f.keys())
        tensors = {n: f.get_tensor(n) for n in names}
    return config, tensors, metadata


def _f32(x: Any) -> np.ndarray:
    if quant_lib.is_quantized(x):
        x = quant_lib.dequantize(x)
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _base_tree(trainable: Mapping, frozen: Mapping) -> dict:
    """The base parameters (frozen + trained, uncombined: shapes and the frozen values)."""
    return tree.unflatten({**tree.flatten(frozen), **tree.flatten(trainable.get("params", {}))})


def _import_saved(
    family: Family, hf: Mapping, name: str, array: np.ndarray, shapes: Mapping
) -> dict[str, np.ndarray]:
    """The ftlab leaves of a ``modules_to_save`` tensor (PEFT name), checked against ``shapes``."""
    short = name[len(PREFIX) :]
    module, leaf = short.rsplit(".", 1) if "." in short else (short, "")
    hf_name = f"{family.checkpoint_module(module, family.prefix)}.{leaf}" if leaf else short
    try:
        leaves = family.table(hf).to_ftlab(
            family.short_name(hf_name), np.asarray(array, np.float32)
        )
    except ValueError:
        leaves = None
    if not leaves:
        raise PeftAdapterError(
            f"adapter tensor {name!r} (a modules_to_save weight) has no ftlab leaf in a "
            f"{family.model_type} model"
        )
    for path, value in leaves.items():
        if shapes.get(path) != tuple(value.shape):
            raise PeftAdapterError(
                f"adapter tensor {name!r} -> {path!r}: shape {tuple(value.shape)}, the model "
                f"has {shapes.get(path)}"
            )
    return {p: np.ascontiguousarray(v, dtype=np.float32) for p, v in leaves.items()}


def _export_saved(
    family: Family, hf: Mapping, leaves: Mapping[str, Any], layout: peft_lib.Layout
) -> dict[str, np.ndarray]:
    """PEFT ``modules_to_save`` tensors of fully trained leaves (in-memory module names)."""
    flat = {p: _f32(v) for p, v in leaves.items()}
    try:
        tensors = family.table(hf).to_hf(flat, prefix=layout.prefix)
    except KeyError as e:
        raise PeftAdapterError(
            f"parameter {e.args[0]!r} has no Hugging Face name for a {family.model_type} model"
        ) from None
    out = {}
    for name, array in tensors.items():
        module, leaf = name.rsplit(".", 1)
        out[f"{PREFIX}{family.memory_module(module, layout.prefix)}.{leaf}"] = np.ascontiguousarray(
            array
        )
    return out


def _write(directory: Path, config: Mapping, tensors: Mapping, metadata: Mapping) -> Path:
    if directory.exists() and not directory.is_dir():
        raise PeftAdapterError(f"adapter target {str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        raise PeftAdapterError(
            f"adapter target {str(directory)!r} is a non-empty directory; refusing to overwrite it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / peft_lib.ADAPTER_CONFIG, "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    meta = {k: v for k, v in metadata.items() if k != "format"}
    files.write_safetensors(directory / peft_lib.ADAPTER_WEIGHTS, dict(tensors), **meta)
    return directory


def _feedforward_names(feedforward: set[str], targets: set[str], layout: peft_lib.Layout) -> list:
    """``feedforward_modules`` entries: suffixes as for ``target_modules`` ("mlp.c_proj"),
    checked under PEFT's ``endswith`` rule over the targets (else the full names)."""
    names = peft_lib.short_names(feedforward, layout.modules, components=True)
    if {t for t in targets if any(t.endswith(n) for n in names)} != feedforward:
        names = sorted(feedforward)
    return names


def _modules_to_save(
    saved: Mapping[str, np.ndarray], task_type: str | None, targets: set[str]
) -> list[str] | None:
    """Full module names of the saved tensors (PEFT's ``endswith`` rule matches each itself);
    for SEQ_CLS PEFT adds ``classifier`` and ``score`` itself."""
    names = sorted({n[len(PREFIX) :].rsplit(".", 1)[0] for n in saved})
    clash = sorted(set(names) & targets)
    if clash:
        raise PeftAdapterError(
            f"Hugging Face module(s) {clash} would be both adapted and saved whole "
            "(PEFT allows one or the other)"
        )
    if task_type == "SEQ_CLS":
        names = ["classifier", "score"] + [m for m in names if m not in ("classifier", "score")]
    return names or None


# -- DoRA -----------------------------------------------------------------------------------


def load_dora_adapter(
    directory: str | os.PathLike,
    params: Mapping,
    hf_config: Any,
    *,
    family: Family | str | None = None,
) -> ScaledAdapter:
    """Read a PEFT DoRA adapter (``use_dora: true``) for the model of ``params`` (base tree)
    and ``hf_config``: LoRA factors by ``ftlab.interop.peft.load_peft_adapter``, magnitudes
    sliced per kernel. Returns a ``ScaledAdapter`` whose method has ``dora_targets``."""
    directory = Path(directory).expanduser()
    config, tensors, metadata = _read(directory)
    where = str(directory / peft_lib.ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA" or not config.get("use_dora"):
        raise PeftAdapterError(
            f"{where}: not a DoRA adapter (peft_type {config.get('peft_type')!r}, "
            f"use_dora {config.get('use_dora')!r})"
        )
    notes = []
    if config.get("lora_dropout"):  # training only: the adapter's function is the same
        notes.append(
            f"lora_dropout {config['lora_dropout']} dropped: ftlab's DoRA is one combined "
            "kernel, without dropout on the low-rank branch (same outputs at inference)"
        )
    magnitudes: dict[str, np.ndarray] = {}
    rest: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        m = _MAGNITUDE.fullmatch(name)
        if m:
            magnitudes[m.group(1)] = np.asarray(array, np.float32).reshape(-1)
        else:
            rest[name] = array
    if not magnitudes:
        raise PeftAdapterError(f"{directory}: use_dora is set but no lora_magnitude_vector tensor")
    with tempfile.TemporaryDirectory(prefix="ftlab_dora_") as tmp:
        plain = {**config, "use_dora": False, "lora_dropout": 0.0}
        _write(Path(tmp) / "a", plain, rest, metadata)
        try:
            lora = peft_lib.load_peft_adapter(Path(tmp) / "a", params, hf_config, family=family)
        except PeftAdapterError as e:
            raise PeftAdapterError(str(e).replace(str(Path(tmp) / "a"), str(directory))) from None
    hf, fam = _family(hf_config, family)
    layout = peft_lib.hf_layout(params, hf, family=fam)
    by_module = layout.by_module()
    adapted = {layout.slots[p].module for p in lora.factors}
    for module, vec in magnitudes.items():
        if module not in adapted:
            raise PeftAdapterError(
                f"adapter tensor {PREFIX}{module}.lora_magnitude_vector: module {module!r} has "
                "no lora_A/lora_B factors ftlab could place"
            )
        total = by_module[module][0].out_total
        if vec.shape != (total,):
            raise PeftAdapterError(
                f"adapter tensor {PREFIX}{module}.lora_magnitude_vector has shape {vec.shape}; "
                f"the module has {total} outputs"
            )
    missing = sorted(adapted - set(magnitudes))
    if missing:
        raise PeftAdapterError(f"use_dora adapter has no lora_magnitude_vector for {missing}")
    mags = {}
    for path in lora.factors:
        slot = layout.slots[path]
        mags[path] = np.ascontiguousarray(magnitudes[slot.module][slot.start : slot.stop])
    targets = tuple(sorted(lora.factors))
    method = Method("lora", tuple(sorted(lora.modules)), (), lora.spec, dora_targets=targets)
    leaves = {
        "lora": tree.unflatten(
            {f"{p}/{k}": v for p, f in lora.factors.items() for k, v in f.items()}
        ),
        "dora": tree.unflatten({f"{p}/m": v for p, v in mags.items()}),
    }
    return ScaledAdapter(method, leaves, dict(lora.modules), config, notes + list(lora.notes))


def dora_adapter(
    method: Method,
    trainable: Mapping,
    frozen: Mapping,
    hf_config: Any,
    *,
    save_trained: bool = True,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    family: Family | str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """(adapter config, tensors, metadata) of a DoRA method's PEFT adapter."""
    if not method.dora_targets:
        raise PeftAdapterError(f"method {method.name!r} has no DoRA targets to export")
    base = _base_tree(trainable, frozen)
    saved = tree.flatten(trainable.get("params", {})) if save_trained else {}
    factors = {
        p: {k: _f32(v) for k, v in f.items()} for p, f in method.dora_factors(trainable).items()
    }
    config, tensors, metadata = peft_lib.peft_adapter(
        factors,
        method.lora,
        base,
        hf_config,
        modules_to_save=saved or None,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        family=family,
    )
    hf, fam = _family(hf_config, family)
    layout = peft_lib.hf_layout(base, hf, family=fam)
    by_module = layout.by_module()
    mags = {p: _f32(v) for p, v in method.dora_magnitudes(trainable).items()}
    flat_base = tree.flatten(base)
    for module in sorted({layout.slots[p].module for p in mags}):
        slots = by_module[module]
        vec = np.zeros((slots[0].out_total,), np.float32)
        for slot in slots:
            if slot.path in mags:
                vec[slot.start : slot.stop] = mags[slot.path]
            else:  # not adapted by ftlab: its own column norms leave it unchanged
                vec[slot.start : slot.stop] = np.linalg.norm(_f32(flat_base[slot.path]), axis=0)
        tensors[f"{PREFIX}{module}.lora_magnitude_vector"] = vec
    config["use_dora"] = True
    return config, tensors, metadata


# -- IA3 ------------------------------------------------------------------------------------


def _feedforward(module: str, entries: Any) -> bool:
    """PEFT's ``IA3Model._check_target_module_feedforward``."""
    if not entries:
        return False
    if isinstance(entries, str):
        return re.fullmatch(entries, module) is not None
    return any(module.endswith(e) for e in entries)


def load_ia3_adapter(
    directory: str | os.PathLike,
    params: Mapping,
    hf_config: Any,
    *,
    family: Family | str | None = None,
) -> ScaledAdapter:
    """Read a PEFT IA3 adapter for the model of ``params`` (base tree) and ``hf_config``;
    each ``ia3_l`` becomes the ``out`` vectors of its module's kernels (a fused module's
    vector split by their rows) or, for a feedforward module, their shared ``in`` vector."""
    directory = Path(directory).expanduser()
    config, tensors, _ = _read(directory)
    where = str(directory / peft_lib.ADAPTER_CONFIG)
    if config.get("peft_type") != "IA3":
        raise PeftAdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not 'IA3'")
    hf, fam = _family(hf_config, family)
    layout = peft_lib.hf_layout(params, hf, family=fam)
    by_module = layout.by_module()
    shapes = {p: tuple(np.shape(v)) for p, v in tree.flatten(params).items()}
    ff = config.get("feedforward_modules")
    scales: dict[str, tuple[str, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    for name, array in sorted(tensors.items()):
        if not name.startswith(PREFIX):
            raise PeftAdapterError(f"adapter tensor {name!r} does not start with {PREFIX!r}")
        m = _IA3.fullmatch(name)
        if not m:
            if ".ia3_" in name:
                raise PeftAdapterError(f"adapter tensor {name!r} is not an IA3 vector ftlab knows")
            saved.update(_import_saved(fam, hf, name, array, shapes))
            continue
        module = m.group(1)
        if module not in by_module:
            raise PeftAdapterError(
                f"adapter tensor {name!r}: ftlab cannot map module {module!r} to a kernel of "
                f"this {fam.model_type} model"
            )
        slots = by_module[module]
        array = np.asarray(array, np.float32)
        fan_in = shapes[slots[0].path][0]
        side = "in" if _feedforward(module, ff) else "out"
        want = (1, fan_in) if side == "in" else (slots[0].out_total, 1)
        if array.shape != want:
            raise PeftAdapterError(
                f"adapter tensor {name!r} has shape {array.shape}; as a "
                f"{'feedforward' if side == 'in' else 'non-feedforward'} module it needs {want}"
            )
        vec = array.reshape(-1)
        for slot in slots:
            part = vec if side == "in" else vec[slot.start : slot.stop]
            scales[slot.path] = (side, np.ascontiguousarray(part))
    if not scales:
        raise PeftAdapterError(f"{directory}: the adapter holds no ia3_l tensors")
    clash = sorted(set(saved) & set(scales))
    if clash:
        raise PeftAdapterError(f"leaves {clash} are both IA3-scaled and saved whole")
    targets = tuple(sorted(scales))
    inputs = tuple(p for p in targets if scales[p][0] == "in")
    method = Method("ia3", tuple(sorted(saved)), ia3_targets=targets, ia3_input=inputs)
    leaves = {"ia3": tree.unflatten({f"{p}/{s}": v for p, (s, v) in scales.items()})}
    return ScaledAdapter(method, leaves, saved, config)


def ia3_adapter(
    method: Method,
    trainable: Mapping,
    frozen: Mapping,
    hf_config: Any,
    *,
    save_trained: bool = True,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    family: Family | str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """(adapter config, tensors, metadata) of an IA3 method's PEFT adapter."""
    if not method.ia3_targets:
        raise PeftAdapterError(f"method {method.name!r} has no IA3 targets to export")
    hf, fam = _family(hf_config, family)
    base = _base_tree(trainable, frozen)
    layout = peft_lib.hf_layout(base, hf, family=fam)
    by_module = layout.by_module()
    scales = {p: (s, _f32(v)) for p, (s, v) in method.ia3_scales(trainable).items()}
    modules: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for path, entry in scales.items():
        slot = layout.slots.get(path)
        if slot is None:
            raise PeftAdapterError(
                f"IA3 target {path!r} is not a kernel PEFT can adapt in this model (no single "
                "Hugging Face module holds it)"
            )
        modules.setdefault(slot.module, {})[path] = entry
    tensors: dict[str, np.ndarray] = {}
    feedforward = []
    for module, entries in sorted(modules.items()):
        slots = by_module[module]
        sides = {s for s, _ in entries.values()}
        if len(sides) > 1:
            raise PeftAdapterError(
                f"Hugging Face module {module!r} holds kernels scaled on the input and the output "
                "side; PEFT has one IA3 vector per module"
            )
        if sides == {"out"}:
            vec = np.ones((slots[0].out_total,), np.float32)
            for slot in slots:
                if slot.path in entries:
                    vec[slot.start : slot.stop] = entries[slot.path][1]
            tensors[f"{PREFIX}{module}.ia3_l"] = np.ascontiguousarray(vec[:, None])
        else:
            vecs = [entries[s.path][1] if s.path in entries else None for s in slots]
            if any(v is None or not np.array_equal(v, vecs[0]) for v in vecs):
                raise PeftAdapterError(
                    f"Hugging Face module {module!r} is one fused input for kernels "
                    f"{[s.path for s in slots]}: PEFT scales its input once, so each needs the "
                    "same IA3 input vector"
                )
            tensors[f"{PREFIX}{module}.ia3_l"] = np.ascontiguousarray(vecs[0][None, :])
            feedforward.append(module)
    saved_leaves = tree.flatten(trainable.get("params", {})) if save_trained else {}
    saved = _export_saved(fam, hf, saved_leaves, layout) if saved_leaves else {}
    shapes = {p: tuple(np.shape(v)) for p, v in tree.flatten(base).items()}
    if task_type is None:
        try:
            task_type = fam.peft_task.get(export_head(fam, hf, shapes))
        except HFExportError as e:
            raise PeftAdapterError(str(e)) from None
    config = {
        "peft_type": "IA3",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "target_modules": peft_lib.short_names(set(modules), layout.modules, components=True),
        "feedforward_modules": _feedforward_names(set(feedforward), set(modules), layout),
        "fan_in_fan_out": any(layout.slots[p].conv1d for p in scales),
        "init_ia3_weights": True,
        "modules_to_save": _modules_to_save(saved, task_type, set(modules)),
        "inference_mode": True,
        "exclude_modules": None,
        "revision": None,
    }
    return config, {**tensors, **saved}, {"format": "pt"}


# -- both -----------------------------------------------------------------------------------


def load_scaled_adapter(
    directory: str | os.PathLike, params: Mapping, hf_config: Any, **kwargs: Any
) -> ScaledAdapter:
    """``load_dora_adapter`` or ``load_ia3_adapter``, by the adapter config."""
    config, _, _ = _read(Path(directory).expanduser())
    if config.get("peft_type") == "IA3":
        return load_ia3_adapter(directory, params, hf_config, **kwargs)
    return load_dora_adapter(directory, params, hf_config, **kwargs)


def export_scaled_adapter(
    directory: str | os.PathLike,
    method: Method,
    trainable: Mapping,
    frozen: Mapping,
    hf_config: Any,
    **kwargs: Any,
) -> Path:
    """Write a DoRA or IA3 method's PEFT adapter directory (``PeftModel.from_pretrained``
    loads it); ``directory`` must not exist or be empty; nothing is written before every
    check passed. Keywords as ``dora_adapter`` / ``ia3_adapter``."""
    make = dora_adapter if method.dora_targets else ia3_adapter
    config, tensors, metadata = make(method, trainable, frozen, hf_config, **kwargs)
    return _write(Path(directory).expanduser(), config, tensors, metadata)
