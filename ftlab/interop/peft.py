"""LoRA adapters in Hugging Face PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``), written from and read into ftlab's LoRA factors.

PEFT stores, per adapted HF module ``M``, ``base_model.model.M.lora_A.weight`` (r, in) and
``base_model.model.M.lora_B.weight`` (out, r), and adds ``scaling * B @ A`` to the module's
weight, with ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). For GPT-2's
``Conv1D`` modules PEFT stores the same two factors and only transposes the product when merging
(``fan_in_fan_out``). ftlab's factors are ``a`` (in, r) and ``b`` (r, out) with the same
product, so ``a = A.T`` and ``b = B.T`` for every layout.

Where ftlab has several kernels for one HF module (GPT-2's separate ``q_proj``/``k_proj``/
``v_proj`` are one fused ``c_attn``), the module's adapter stacks the kernels' distinct ``a``
factors into ``A`` and places each ``b`` in its block of rows of ``B`` (zero rows for an
untargeted kernel, e.g. ``k``), so the fused delta is exactly the per-kernel deltas side by side.
Every module gets the same PEFT rank (the largest; smaller ones are padded with zero rank
columns) and ``lora_alpha`` is chosen so that PEFT's scaling equals ftlab's. How ftlab's
factors sit in the PEFT tensors is also recorded in the safetensors metadata, so that an
ftlab export reads back to exactly the factors it came from; an adapter without it (trained in
PyTorch) gives every kernel of a fused module the module's full-rank ``A`` and its block of
``B``, which is the same function.

Which ftlab kernel is which HF module, and in which layout, is read from the family's name
table (``ftlab.interop.<family>``) by *probing* its export direction with marker arrays, so there
is no second name table here and every family with linear layers (GPT-2, LLaMA, BERT, ViT) gets
adapters. Fully trained
leaves (a new classification head ``score``) are saved whole under PEFT's
``modules_to_save`` names (``base_model.model.score.weight``); without them a PEFT user would
silently get the untrained head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ftlab import tree
from ftlab.interop import files
from ftlab.interop.errors import HFExportError, HFImportError, PeftAdapterError
from ftlab.interop.family import Family, get_family
from ftlab.interop.pretrained import config_dict, export_head
from ftlab.methods import Method
from ftlab.methods.lora import LoraSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # LoraModel wraps the transformers model as ``.model``
METADATA_KEY = "ftlab_lora"  # safetensors metadata: ftlab's rank/alpha and factor placement

# LoRA variants whose forward pass is not ``W x + s B A x``: refused on import.
_UNSUPPORTED_FLAGS = (
    "use_dora",
    "use_bdlora",
    "use_qalora",
    "lora_bias",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "kasa_config",
    "monteclora_config",
    "mica",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
)


# -- where each ftlab kernel sits in the HF modules ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    """One ftlab kernel inside an HF module: output rows ``start:stop`` of the module's
    ``out_total``; ``conv1d`` when HF stores the weight (in, out) (PEFT ``fan_in_fan_out``)."""

    path: str
    module: str
    start: int
    stop: int
    out_total: int
    conv1d: bool


@dataclasses.dataclass(frozen=True)
class Layout:
    """The kernel -> HF module map of one model, and every HF module name it has."""

    slots: dict[str, Slot]  # ftlab kernel path -> slot
    modules: frozenset[str]  # HF module names and their parents (what PEFT matches against)
    prefix: str  # the base-model prefix in front of the names ("transformer.", "model.", "")

    def by_module(self) -> dict[str, list[Slot]]:
        out: dict[str, list[Slot]] = {}
        for slot in self.slots.values():
            out.setdefault(slot.module, []).append(slot)
        return {m: sorted(s, key=lambda x: x.start) for m, s in out.items()}


def _resolve(hf_config: Any, family: Family | str | None) -> tuple[dict, Family]:
    config = config_dict(hf_config)
    try:
        if family is None:
            if not config.get("model_type"):
                raise PeftAdapterError("hf_config has no model_type; pass family=")
            family = get_family(config["model_type"])
        elif isinstance(family, str):
            family = get_family(family)
    except HFImportError as e:
        raise PeftAdapterError(str(e)) from None
    return config, family


def export_head_or_none(family: Family, config: Mapping, shapes: Mapping) -> str:
    try:
        return export_head(family, config, shapes)
    except HFExportError as e:
        raise PeftAdapterError(str(e)) from None


def _to_hf(family: Family, config: Mapping, flat: Mapping, prefix: str) -> dict[str, np.ndarray]:
    try:
        return family.table(config).to_hf(flat, prefix=prefix)
    except KeyError as e:
        raise PeftAdapterError(
            f"parameter {e.args[0]!r} has no Hugging Face name for a {family.model_type} model"
        ) from None


def _peft_names(family: Family, tensors: Mapping, prefix: str) -> dict[str, np.ndarray]:
    """Checkpoint tensor names -> the names of the model in memory, which PEFT uses."""
    out = {}
    for name, array in tensors.items():
        module, leaf = name.rsplit(".", 1)
        out[f"{family.memory_module(module, prefix)}.{leaf}"] = array
    return out


def _task_type(family: Family, config: Mapping, shapes: Mapping) -> str | None:
    return family.peft_task.get(export_head_or_none(family, config, shapes))


def _import_tensor(
    family: Family, config: Mapping, name: str, array: np.ndarray
) -> dict[str, np.ndarray] | None:
    """The ftlab leaves of one HF tensor (prefix allowed, in-memory module names too), by the
    family's table."""
    module, leaf = name.rsplit(".", 1) if "." in name else (name, "")
    name = f"{family.checkpoint_module(module, family.prefix)}.{leaf}" if leaf else name
    try:
        return family.table(config).to_ftlab(family.short_name(name), array)
    except ValueError:
        return None


def _locate(marker: np.ndarray, where: Mapping[float, tuple[str, tuple[int, ...]]]):
    """(tensor name, out offset, transposed) of a (2, 3) marker inside the exported tensors."""
    try:
        (n00, p00), (n01, p01), (n10, p10) = (
            where[marker[i, j]] for i, j in ((0, 0), (0, 1), (1, 0))
        )
    except KeyError:
        return None
    if not n00 == n01 == n10 or len(p00) != 2:
        return None
    (i, j) = p00
    if p01 == (i, j + 1) and p10 == (i + 1, j) and i == 0:
        return n00, j, False  # stored (in, out): Conv1D
    if p01 == (i + 1, j) and p10 == (i, j + 1) and j == 0:
        return n00, i, True  # stored (out, in): nn.Linear
    return None


def hf_layout(params: Mapping, hf_config: Any, *, family: Family | str | None = None) -> Layout:
    """Map every 2-D ``kernel`` of ``params`` (arrays or ShapeDtypeStructs) to its HF module,
    by running the family table's export direction on small marker arrays and finding the
    markers again (in the names of the model in memory, as PEFT saves them)."""
    config, family = _resolve(hf_config, family)
    shapes = {p: tuple(np.shape(v)) for p, v in tree.flatten(params).items()}
    if not shapes:
        raise PeftAdapterError("params is empty")
    probe, counter = {}, 1.0
    for path, shape in shapes.items():
        small = (2,) * (len(shape) - 1) + (3,) if shape else ()
        size = int(np.prod(small, dtype=np.int64))
        probe[path] = (counter + np.arange(size, dtype=np.float64)).reshape(small)
        counter += size
    head = export_head_or_none(family, config, shapes)
    prefix = "" if head == "none" else family.prefix
    tensors = _peft_names(family, _to_hf(family, config, probe, prefix), prefix)
    where = {}
    for name, array in tensors.items():
        for index in np.ndindex(array.shape):
            where[float(array[index])] = (name, index)

    found: dict[str, tuple[str, int, bool]] = {}
    for path, shape in shapes.items():
        if path.rsplit("/", 1)[-1] != "kernel" or len(shape) != 2:
            continue
        hit = _locate(probe[path], where)
        if hit is None or not hit[0].endswith(".weight"):
            continue  # not a plain matrix of one module (no LoRA target then)
        found[path] = hit
    slots: dict[str, Slot] = {}
    for name in sorted({n for n, _, _ in found.values()}):
        members = sorted((off, p) for p, (n, off, _) in found.items() if n == name)
        transposed = found[members[0][1]][2]
        in_dim, out_dim = tensors[name].shape[::-1] if transposed else tensors[name].shape
        offsets = [o for o, _ in members]
        if in_dim != 2 or out_dim != 3 * len(members) or offsets != list(range(0, out_dim, 3)):
            continue  # the tensor holds more than these kernels side by side
        start, module = 0, name.removesuffix(".weight")
        total = sum(shapes[p][1] for _, p in members)
        for _, p in members:
            stop = start + shapes[p][1]
            slots[p] = Slot(p, module, start, stop, total, not found[p][2])
            start = stop
    modules = set()
    for name in tensors:
        parts = name.split(".")[:-1]
        modules.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    return Layout(slots, frozenset(modules), prefix)


def short_names(
    chosen: set[str], universe: set[str] | frozenset[str], *, components: bool
) -> list[str]:
    """The shortest name suffix per chosen module that PEFT matches to chosen modules only.

    ``components``: PEFT's ``target_modules`` rule (equal, or ends with ``"." + name``);
    otherwise its ``modules_to_save`` (and IA3 ``feedforward_modules``) rule: plain ``endswith``.
    """

    def matches(suffix: str) -> set[str]:
        if components:
            return {u for u in universe if u == suffix or u.endswith("." + suffix)}
        return {u for u in universe if u.endswith(suffix)}

    out = set()
    for module in chosen:
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not parts[-k].isdigit() and matches(suffix) <= chosen:  # "h.1.x", not "1.x"
                break
        out.add(suffix)
    return sorted(out)


# -- ftlab factors -> PEFT tensors -------------------------------------------------------------


def _f32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _lora_tensors(
    factors: Mapping[str, Mapping[str, Any]], spec: LoraSpec, layout: Layout
) -> tuple[dict[str, np.ndarray], int, dict[str, list]]:
    """(PEFT ``lora_A``/``lora_B`` tensors, PEFT rank, placement {path: [module, r0, r1]})."""
    by_module: dict[str, list[Slot]] = {}
    for path in factors:
        slot = layout.slots.get(path)
        if slot is None:
            known = ", ".join(sorted(layout.slots)[:6])
            raise PeftAdapterError(
                f"LoRA target {path!r} is not a kernel PEFT can adapt in this model "
                f"(no single Hugging Face module holds it); adaptable kernels include: {known}"
            )
        by_module.setdefault(slot.module, []).append(slot)

    blocks = {}  # module -> (A rows (R_m, in), B (out_total, R_m))
    placement: dict[str, list] = {}
    for module, slots in sorted(by_module.items()):
        a_rows: list[np.ndarray] = []
        rows_of: list[tuple[int, int]] = []
        b_cols = []
        for slot in sorted(slots, key=lambda s: s.start):
            a, b = _f32(factors[slot.path]["a"]), _f32(factors[slot.path]["b"])
            width = slot.stop - slot.start
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or b.shape[1] != width:
                raise PeftAdapterError(
                    f"LoRA factors of {slot.path!r}: a {a.shape} and b {b.shape} are not (in, r) and "
                    f"(r, {width})"
                )
            if a.shape[1] != spec.rank:
                raise PeftAdapterError(
                    f"LoRA factors of {slot.path!r} have rank {a.shape[1]}, the spec says "
                    f"rank {spec.rank}"
                )
            # Kernels sharing the very same ``a`` (an imported fused adapter) share its rows.
            start = sum(r.shape[0] for r in a_rows)
            for (r0, r1), prev in zip(rows_of, a_rows):
                if prev.shape == a.T.shape and np.array_equal(prev, a.T):
                    start = r0
                    break
            else:
                a_rows.append(np.ascontiguousarray(a.T))
                rows_of.append((start, start + a.shape[1]))
            placement[slot.path] = [module, start, start + a.shape[1]]
            b_cols.append((slot, start, b))
        a_mod = np.concatenate(a_rows, axis=0)
        b_mod = np.zeros((slots[0].out_total, a_mod.shape[0]), np.float32)
        for slot, start, b in b_cols:
            b_mod[slot.start : slot.stop, start : start + b.shape[0]] = b.T
        blocks[module] = (a_mod, b_mod)

    rank = max(a.shape[0] for a, _ in blocks.values())
    tensors = {}
    for module, (a_mod, b_mod) in blocks.items():
        pad = rank - a_mod.shape[0]  # one rank for every module: zero rank columns are no-ops
        a_mod = np.pad(a_mod, ((0, pad), (0, 0)))
        b_mod = np.pad(b_mod, ((0, 0), (0, pad)))
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_mod)
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_mod)
    return tensors, rank, placement


def _peft_alpha(spec: LoraSpec, rank: int) -> float | int:
    """``lora_alpha`` giving PEFT's ``alpha / r`` (or ``/ sqrt(r)``) at ``rank`` ftlab's scale."""
    if rank == spec.rank:
        alpha = spec.alpha
    else:
        alpha = spec.scale * (math.sqrt(rank) if spec.rslora else rank)
    return int(alpha) if float(alpha).is_integer() else float(alpha)


def _saved_tensors(
    leaves: Mapping[str, Any], family: Family, config: Mapping, layout: Layout
) -> dict[str, np.ndarray]:
    """HF tensors of fully trained leaves, named as PEFT saves ``modules_to_save``."""
    flat = {p: _f32(v) for p, v in leaves.items()}
    tensors = _peft_names(family, _to_hf(family, config, flat, layout.prefix), layout.prefix)
    for name, array in tensors.items():  # the import direction must give back the same leaves
        back = _import_tensor(family, config, name, array) or {}
        for path, value in back.items():
            if path not in flat or not np.array_equal(value, flat[path]):
                raise PeftAdapterError(
                    f"saved module tensor {name!r} does not import back to the given leaves"
                )
    return {f"{PEFT_PREFIX}{n}": np.ascontiguousarray(v) for n, v in tensors.items()}


def _refuse_non_empty(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise PeftAdapterError(f"adapter target {str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        raise PeftAdapterError(
            f"adapter target {str(directory)!r} is a non-empty directory; refusing to overwrite it"
        )


def peft_adapter(
    factors: Mapping[str, Mapping[str, Any]],
    spec: LoraSpec,
    params: Mapping,
    hf_config: Any,
    *,
    modules_to_save: Mapping | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    family: Family | str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """(adapter config, tensors, safetensors metadata) that ``export_peft_adapter`` writes."""
    config, family = _resolve(hf_config, family)
    if not factors:
        raise PeftAdapterError("no LoRA factors to export")
    layout = hf_layout(params, config, family=family)
    lora, rank, placement = _lora_tensors(factors, spec, layout)
    target_modules = {p[0] for p in placement.values()}

    saved_leaves = tree.flatten(modules_to_save) if modules_to_save else {}
    shapes = {p: tuple(np.shape(v)) for p, v in tree.flatten(params).items()}
    for path, value in saved_leaves.items():
        if path not in shapes or tuple(np.shape(value)) != shapes[path]:
            raise PeftAdapterError(
                f"modules_to_save leaf {path!r} {tuple(np.shape(value))} is not a leaf of params "
                f"{shapes.get(path)}"
            )
        if path in factors:
            raise PeftAdapterError(f"{path!r} is both a LoRA target and saved whole")
    saved = _saved_tensors(saved_leaves, family, config, layout) if saved_leaves else {}
    saved_modules = {n[len(PEFT_PREFIX) :].rsplit(".", 1)[0] for n in saved}
    clash = sorted(target_modules & saved_modules)
    if clash:
        raise PeftAdapterError(
            f"Hugging Face module(s) {clash} would be both LoRA-adapted and saved whole "
            "(PEFT allows one or the other)"
        )

    if task_type is None:
        task_type = _task_type(family, config, shapes)
    to_save = short_names(saved_modules, layout.modules, components=False)
    if task_type == "SEQ_CLS":  # PEFT itself adds these two for sequence classification
        to_save = ["classifier", "score"] + [m for m in to_save if m not in ("classifier", "score")]
    for name in to_save:  # PEFT skips LoRA on modules inside a modules_to_save match
        inside = [m for m in target_modules if re.match(rf"(^|.*\.){re.escape(name)}($|\..*)", m)]
        if inside:
            raise PeftAdapterError(
                f"LoRA module(s) {inside} lie inside modules_to_save entry {name!r}; PEFT "
                "would not adapt them"
            )

    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": _peft_alpha(spec, rank),
        "use_rslora": bool(spec.rslora),
        "lora_dropout": float(spec.dropout),
        "target_modules": short_names(target_modules, layout.modules, components=True),
        "modules_to_save": to_save or None,
        "fan_in_fan_out": any(layout.slots[p].conv1d for p in factors),
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    ours = {
        "rank": spec.rank,
        "alpha": spec.alpha,
        "rslora": bool(spec.rslora),
        "dropout": float(spec.dropout),
        "placement": placement,
    }
    metadata = {"format": "pt", METADATA_KEY: json.dumps(ours, sort_keys=True)}
    return adapter_config, {**lora, **saved}, metadata


def export_peft_adapter(
    directory: str | os.PathLike,
    factors: Mapping[str, Mapping[str, Any]],
    spec: LoraSpec,
    params: Mapping,
    hf_config: Any,
    *,
    modules_to_save: Mapping | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    family: Family | str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads.

    ``factors``: ``{kernel path: {"a", "b"}}`` (``Method.lora_factors``); ``spec``: their
    ``LoraSpec`` (``Method.lora``); ``params``: the base model tree (arrays or shapes; it tells
    which HF module each kernel is); ``hf_config``: the base model's HF config
    (``Pretrained.hf_config``). ``modules_to_save``: fully trained leaves (a tree or
    ``{path: array}``, e.g. ``{"score/kernel": ...}``) saved whole. ``task_type``: by default
    ``SEQ_CLS`` for a classifier (``score/kernel`` in params), else ``CAUSAL_LM``.
    ``directory`` must not exist or be empty; nothing is written before every check passed.
    """
    out = Path(directory).expanduser()
    _refuse_non_empty(out)
    adapter_config, tensors, metadata = peft_adapter(
        factors,
        spec,
        params,
        hf_config,
        modules_to_save=modules_to_save,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        family=family,
    )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ADAPTER_CONFIG, "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
        f.write("\n")
    metadata = {k: v for k, v in metadata.items() if k != "format"}
    files.write_safetensors(out / ADAPTER_WEIGHTS, tensors, **metadata)
    return out


def export_method_adapter(
    directory: str | os.PathLike,
    method: Method,
    trainable: Mapping,
    frozen: Mapping,
    hf_config: Any,
    *,
    save_trained: bool = True,
    **kwargs: Any,
) -> Path:
    """``export_peft_adapter`` for a LoRA ``Method``: its factors, spec and, with
    ``save_trained``, its fully trained leaves (e.g. a new head) as ``modules_to_save``.
    A DoRA or IA3 method is written by ``ftlab.interop.peft_scaling``, a prompt-tuning one
    by ``ftlab.interop.peft_prompt``."""
    if getattr(method, "prompt_tokens", 0):
        from ftlab.interop.peft_prompt import export_prompt_adapter

        return export_prompt_adapter(
            directory, method, trainable, frozen, hf_config, save_trained=save_trained, **kwargs
        )
    if getattr(method, "dora_targets", ()) or getattr(method, "ia3_targets", ()):
        from ftlab.interop.peft_scaling import export_scaled_adapter

        return export_scaled_adapter(
            directory, method, trainable, frozen, hf_config, save_trained=save_trained, **kwargs
        )
    if not method.lora_targets:
        raise PeftAdapterError(f"method {method.name!r} has no LoRA targets to export as PEFT")
    saved = tree.flatten(trainable.get("params", {})) if save_trained else {}
    return export_peft_adapter(
        directory,
        method.lora_factors(trainable),
        method.lora,
        method.base_params(trainable, frozen),
        hf_config,
        modules_to_save=saved or None,
        **kwargs,
    )


# -- PEFT tensors -> ftlab factors -------------------------------------------------------------


@dataclasses.dataclass
class PeftAdapter:
    """An imported adapter: LoRA factors ``{kernel path: {"a", "b"}}`` and their spec, the
    fully saved leaves ``{path: array}`` (``modules_to_save``), the adapter config, notes."""

    factors: dict[str, dict[str, np.ndarray]]
    spec: LoraSpec
    modules: dict[str, np.ndarray]
    config: dict[str, Any]
    notes: list[str] = dataclasses.field(default_factory=list)

    def method(self) -> Method:
        """A LoRA ``Method`` training these factors and saved leaves."""
        return Method("lora", tuple(sorted(self.modules)), tuple(sorted(self.factors)), self.spec)

    def split(self, params: Mapping) -> tuple[Method, dict, dict]:
        """(method, trainable, frozen) over base ``params``, ready for ``Method.apply``."""
        flat = tree.flatten(params)
        trainable = {
            "params": tree.unflatten(dict(self.modules)),
            "lora": tree.unflatten(
                {f"{p}/{k}": v for p, f in self.factors.items() for k, v in f.items()}
            ),
        }
        frozen = tree.unflatten({p: v for p, v in flat.items() if p not in self.modules})
        return self.method(), trainable, frozen


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json``, checked for what ftlab's LoRA can represent."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise PeftAdapterError(
            f"{str(directory)!r} has no {ADAPTER_CONFIG} (is it a PEFT adapter directory?)"
        )
    with open(path) as f:
        config = json.load(f)
    where = f"{path}"
    if config.get("peft_type") != "LORA":
        hint = " (IA3: ftlab.interop.peft_scaling.load_ia3_adapter)"
        raise PeftAdapterError(
            f"{where}: peft_type {config.get('peft_type')!r} is not supported (only 'LORA')"
            + (hint if config.get("peft_type") == "IA3" else "")
        )
    if config.get("use_dora"):
        raise PeftAdapterError(
            f"{where}: use_dora=True; read DoRA adapters with "
            "ftlab.interop.peft_scaling.load_dora_adapter"
        )
    for key in _UNSUPPORTED_FLAGS:
        if config.get(key):
            raise PeftAdapterError(
                f"{where}: {key}={config[key]!r} is a LoRA variant ftlab does not implement"
            )
    if config.get("bias", "none") != "none":
        raise PeftAdapterError(
            f"{where}: bias={config['bias']!r} (trained biases) is not supported; only 'none'"
        )
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise PeftAdapterError(
                f"{where}: {key} {config[key]} sets per-module ranks/alphas; ftlab's LoRA has "
                "one rank and alpha for every target"
            )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise PeftAdapterError(
                f"{where}: {key} must be a positive number, got {config.get(key)!r}"
            )
    return config


def _read_weights(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise PeftAdapterError(
                f"{str(directory)!r} has only adapter_model.bin (a pickle); re-save the adapter "
                "with safe_serialization=True where torch is installed"
            )
        raise PeftAdapterError(f"{str(directory)!r} has no {ADAPTER_WEIGHTS}")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        names = list(f.keys())
        return {n: f.get_tensor(n) for n in names}, metadata


def _dense(
    modules: Mapping[str, tuple[np.ndarray, np.ndarray]], layout: Layout
) -> dict[str, dict[str, np.ndarray]]:
    """Every kernel of an adapted module: the full ``A`` and its block of ``B``."""
    factors = {}
    for module, slots in layout.by_module().items():
        if module not in modules:
            continue
        a_mod, b_mod = modules[module]
        for slot in slots:
            factors[slot.path] = {
                "a": np.ascontiguousarray(a_mod.T),
                "b": np.ascontiguousarray(b_mod[slot.start : slot.stop].T),
            }
    return factors


def _placed(
    modules: Mapping[str, tuple[np.ndarray, np.ndarray]], layout: Layout, placement: Mapping
) -> dict[str, dict[str, np.ndarray]]:
    """The factors as ftlab exported them (the rank rows ``placement`` names)."""
    factors = {}
    for path, (module, r0, r1) in placement.items():
        slot = layout.slots[path]
        a_mod, b_mod = modules[module]
        factors[path] = {
            "a": np.ascontiguousarray(a_mod[r0:r1].T),
            "b": np.ascontiguousarray(b_mod[slot.start : slot.stop, r0:r1].T),
        }
    return factors


def _in_memory_names(
    tensors: Mapping[str, np.ndarray], family: Family, layout: Layout, known: set[str]
) -> dict[str, np.ndarray]:
    """Adapters made with older transformers name modules as the checkpoint does (ViT's
    ``encoder.layer.0.attention.attention.query``); rename those to the in-memory names."""
    out = {}
    for name, array in tensors.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_[AB]\.weight)", name)
        if m and m.group(1) not in known:
            module = family.memory_module(m.group(1), layout.prefix)
            if module in known:
                name = f"{PEFT_PREFIX}{module}.{m.group(2)}"
        out[name] = array
    return out


def load_peft_adapter(
    directory: str | os.PathLike,
    params: Mapping,
    hf_config: Any,
    *,
    family: Family | str | None = None,
) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory into ftlab LoRA factors for the model of ``params``
    (base tree, arrays or shapes) and ``hf_config`` (the base model's HF config).

    The scale is PEFT's (``lora_alpha / r``, or ``/ sqrt(r)`` with ``use_rslora``). Tensors
    that ftlab cannot place (an unknown module, embedding LoRA, DoRA magnitudes, LoRA biases)
    and unsupported config settings are errors naming the key.
    """
    directory = Path(directory).expanduser()
    config = read_adapter_config(directory)
    tensors, metadata = _read_weights(directory)
    hf, family = _resolve(hf_config, family)
    layout = hf_layout(params, hf, family=family)
    module_slots = layout.by_module()
    shapes = {p: tuple(np.shape(v)) for p, v in tree.flatten(params).items()}
    rank = int(config["r"])

    tensors = _in_memory_names(tensors, family, layout, set(module_slots))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    for name, array in sorted(tensors.items()):
        if not name.startswith(PEFT_PREFIX):
            raise PeftAdapterError(
                f"adapter tensor {name!r} does not start with {PEFT_PREFIX!r} (not a PEFT LoRA "
                "adapter for a transformers model)"
            )
        short = name[len(PEFT_PREFIX) :]
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", short)
        if m:
            module, which = m.groups()
            if module not in module_slots:
                raise PeftAdapterError(
                    f"adapter tensor {name!r}: ftlab cannot map module {module!r} to a kernel of "
                    f"this {family.model_type} model"
                )
            pairs.setdefault(module, {})[which] = np.asarray(array, np.float32)
            continue
        if ".lora_" in short:
            raise PeftAdapterError(
                f"adapter tensor {name!r} is a LoRA variant (embedding LoRA, DoRA magnitude, "
                "LoRA bias, ...) that ftlab does not support"
            )
        leaves = _import_tensor(family, hf, short, np.asarray(array, np.float32))
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
            saved[path] = np.ascontiguousarray(value, dtype=np.float32)

    modules: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, pair in pairs.items():
        key = f"{PEFT_PREFIX}{module}"
        if set(pair) != {"A", "B"}:
            (have,) = pair
            missing = "B" if have == "A" else "A"
            raise PeftAdapterError(
                f"adapter has {key}.lora_{have}.weight but no {key}.lora_{missing}.weight"
            )
        a_mod, b_mod = pair["A"], pair["B"]
        slots = module_slots[module]
        fan_in = shapes[slots[0].path][0]
        if a_mod.shape != (rank, fan_in) or b_mod.shape != (slots[0].out_total, rank):
            raise PeftAdapterError(
                f"adapter tensors {key}.lora_A/B.weight have shapes {a_mod.shape}, {b_mod.shape}; "
                f"with r={rank} the model needs {(rank, fan_in)} and {(slots[0].out_total, rank)}"
            )
        modules[module] = (a_mod, b_mod)
    if not modules:
        raise PeftAdapterError(f"{directory / ADAPTER_WEIGHTS} holds no lora_A/lora_B tensors")
    clash = sorted(set(saved) & {s.path for m in modules for s in module_slots[m]})
    if clash:
        raise PeftAdapterError(f"leaves {clash} are both LoRA-adapted and saved whole")

    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)
    spec = LoraSpec(rank, alpha, dropout, rslora)
    factors, notes = _dense(modules, layout), []
    ours = _ftlab_metadata(metadata)
    if ours is not None:
        try:
            mine = LoraSpec(int(ours["rank"]), float(ours["alpha"]), dropout, bool(ours["rslora"]))
            placed = _placed(modules, layout, ours["placement"])
            again, _, _ = _lora_tensors(placed, mine, layout)
            same = set(again) == {
                f"{PEFT_PREFIX}{m}.lora_{w}.weight" for m in modules for w in "AB"
            }
            same = same and all(np.array_equal(again[k], tensors[k]) for k in again)
            same = same and math.isclose(mine.scale, spec.scale, rel_tol=1e-6)
        except (KeyError, TypeError, ValueError, IndexError):
            same = False
        if same:
            factors, spec = placed, mine
        else:
            notes.append(
                f"ignored the {METADATA_KEY} metadata (the tensors changed since ftlab wrote "
                "them); each kernel of a fused module gets the module's full-rank A"
            )
    return PeftAdapter(factors, spec, saved, config, notes)


def _ftlab_metadata(metadata: Mapping[str, str]) -> dict | None:
    text = metadata.get(METADATA_KEY)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
