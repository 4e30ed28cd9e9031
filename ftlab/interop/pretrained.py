"""``load_pretrained`` and ``export_hf``: every family, both ways, through its one table.

Import reads ``config.json``, builds the family's Flax module, and converts each tensor by the
table (one at a time, from ``model.safetensors`` or its shards), checking every leaf against the
shapes the model expects (``jax.eval_shape``: nothing is allocated twice). An unknown tensor, a
missing leaf and a shape that differs are ``HFImportError``s naming the tensor; heads the model
lacks are dropped and new heads initialised, both listed in ``Pretrained.notes``.

Export writes ``config.json`` + ``model.safetensors`` with the table's names and inverse
transforms, and before anything is written imports the tensors again into the model the config
describes: they must give back every leaf bit for bit (``HFExportError`` otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab import tree
from ftlab.interop import files, hub
from ftlab.interop.errors import HFExportError, HFImportError
from ftlab.interop.family import Family, family_of_model, get_family
from ftlab.models.layers import SCAN_NAMES, num_labels, unstack_layers

Tensors = Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray]


@dataclasses.dataclass
class Pretrained:
    """An imported model: the module, its plain variables (every collection: ``params`` and,
    for ResNet, ``batch_stats``), the HF config it came from, and what was dropped or
    initialised fresh (``notes``). ``config`` is the family's own config object when it has
    one (``GPT2Config``), else None."""

    model: nn.Module
    variables: dict[str, Any]
    config: Any
    hf_config: dict[str, Any]
    path: Path
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return self.variables["params"]

    @property
    def model_state(self) -> dict[str, Any]:
        """The collections besides ``params`` (what ``export_hf(model_state=)`` takes)."""
        return {k: v for k, v in self.variables.items() if k != "params"}


def family_for(hf_config: Mapping[str, Any], where: Any = "hf_config") -> Family:
    model_type = hf_config.get("model_type")
    if not model_type:
        raise HFImportError(f"{where} has no model_type")
    return get_family(model_type)


def build(
    family: Family,
    hf_config: Mapping[str, Any],
    *,
    head: str | None = None,
    names: Iterable[str] = (),
    options: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> nn.Module:
    """The family's module for ``hf_config`` with ``head`` (default: from ``architectures``);
    ``names``: the checkpoint's tensor names, for what the config cannot tell."""
    head = head or family.head_from_config(hf_config)
    opts = {k: v for k, v in (options or {}).items() if k in family.options}
    return family.build(dict(hf_config), head, opts, {**family.infer(list(names)), **overrides})


def abstract_variables(model: nn.Module, inputs: Any) -> dict[str, Any]:
    """The model's variables (all collections) as boxed ``ShapeDtypeStruct``s (logical axes
    kept; ``nn.get_partition_spec`` reads them)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))


def _qualified(path: str, family: Family) -> str:
    """``"h_0/ln_1/scale"`` -> ``"params/h_0/ln_1/scale"``; other collections keep their name."""
    first = path.split("/", 1)[0]
    return path if first in family.collections and first != "params" else f"params/{path}"


def _shown(path: str) -> str:
    return path.removeprefix("params/")


def _matches(patterns: Iterable[str], path: str) -> bool:
    return any(re.fullmatch(p, path) for p in patterns)


def convert_tensors(
    family: Family,
    hf_config: Mapping[str, Any],
    tensors: Tensors,
    expected: Mapping[str, Any],
    *,
    fresh: Iterable[str] | None = None,
    replace_heads: bool = False,
    param_dtype: Any = jnp.float32,
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """HF tensors -> flat leaves ``{"collection/path": array}`` checked against ``expected``
    (the model's flat variables, arrays or ``ShapeDtypeStruct``s).

    Returns (leaves, missing keys left for a fresh init, notes). ``fresh``: leaf regexes that
    may be missing (default ``family.fresh``); ``replace_heads``: a droppable head of another
    shape (1,000 ImageNet classes for a 10-class task) is dropped and initialised fresh
    instead of being an error.
    """
    table = family.table(hf_config)
    fresh = tuple(family.fresh if fresh is None else fresh)
    items = iter(tensors.items()) if isinstance(tensors, Mapping) else iter(tensors)
    leaves: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    notes: list[str] = []
    unknown: list[str] = []
    replaced: set[str] = set()
    for name, array in items:
        short = family.short_name(name)
        if family.ignored(short):
            continue
        try:
            converted = table.to_ftlab(short, np.asarray(array))
        except ValueError as e:
            raise HFImportError(str(e).replace(repr(short), repr(name), 1)) from None
        if converted is None:
            if _matches(family.drop_hf, short):
                notes.append(f"dropped {name!r}: the model has no such head")
                continue
            unknown.append(name)
            continue
        for path, value in converted.items():
            key = _qualified(path, family)
            if key not in expected:
                if _matches(family.droppable, path):
                    notes.append(f"dropped {name!r} ({path}): the model has no such head")
                    continue
                raise HFImportError(
                    f"tensor {name!r} maps to {path!r}, which this {family.model_type} model "
                    "(as config.json describes it) does not have"
                )
            want = tuple(expected[key].shape)
            if tuple(value.shape) != want:
                if replace_heads and _matches(family.droppable, path):
                    notes.append(
                        f"dropped the checkpoint's {path} {tuple(value.shape)} for a new head "
                        f"{want}"
                    )
                    replaced.add(key)
                    continue
                how = "" if value.shape == np.shape(array) else f" -> {tuple(value.shape)}"
                raise HFImportError(
                    f"tensor {name!r}: checkpoint shape {tuple(np.shape(array))}{how} for "
                    f"{path!r}, but the model built from config.json expects {want}"
                )
            if key in leaves:
                raise HFImportError(f"tensor {name!r} -> {path!r}: {source[key]!r} already set it")
            dtype = param_dtype if key.startswith("params/") else expected[key].dtype
            leaves[key] = np.asarray(value, dtype=dtype)
            source[key] = name
    if unknown:
        raise HFImportError(
            f"unknown tensor(s) for a {family.model_type} checkpoint: "
            f"{', '.join(repr(n) for n in unknown[:10])}{', ...' if len(unknown) > 10 else ''}"
        )
    missing = sorted(set(expected) - set(leaves))
    new = [p for p in missing if p in replaced or _matches(fresh, _shown(p))]
    hard = [_shown(p) for p in missing if p not in new]
    if hard:
        raise HFImportError(
            f"the checkpoint lacks {len(hard)} parameter(s) the model needs: "
            f"{', '.join(hard[:10])}{', ...' if len(hard) > 10 else ''}"
        )
    notes += [f"initialised {_shown(p)} fresh (not in the checkpoint)" for p in new]
    return leaves, new, notes


def model_variables(
    model: nn.Module,
    tensors: Tensors,
    hf_config: Mapping[str, Any],
    *,
    family: Family | None = None,
    inputs: Any = None,
    rng: jax.Array | None = None,
    fresh: Iterable[str] | None = None,
    replace_heads: bool = False,
    param_dtype: Any = jnp.float32,
) -> tuple[dict[str, Any], list[str]]:
    """``model``'s variables (every collection) from checkpoint ``tensors``; leaves it may
    lack (a new head) are initialised from ``rng``. Returns (variables, notes)."""
    family = family or family_for(hf_config)
    inputs = family.example_inputs(model) if inputs is None else inputs
    expected = tree.flatten(nn.meta.unbox(abstract_variables(model, inputs)))
    leaves, new, notes = convert_tensors(
        family,
        hf_config,
        tensors,
        expected,
        fresh=fresh,
        replace_heads=replace_heads,
        param_dtype=param_dtype,
    )
    variables = {path: jnp.asarray(value) for path, value in leaves.items()}
    if new:
        rng = jax.random.key(0) if rng is None else rng

        def init_fresh(key):  # under jit, leaves not returned are never computed
            flat = tree.flatten(nn.meta.unbox(model.init(key, inputs)))
            return {p: flat[p] for p in new}

        variables.update(jax.jit(init_fresh)(rng))
    return tree.unflatten(variables), notes


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    head: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: bool | str = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    rng: jax.Array | None = None,
    **overrides: Any,
) -> Pretrained:
    """Import a Hugging Face model directory (or hub id) of any family.

    ``head``: ``"lm"``, ``"classifier"`` or ``"none"``; by default read from the config's
    ``architectures``. A head the checkpoint lacks (a classifier on an LM or a bare
    backbone) is initialised from ``rng``. ``overrides`` (``num_labels=3``,
    ``embd_pdrop=0.0``, ``hidden_dropout=0.0``) replace fields of the config.
    """
    directory = hub.resolve(name_or_path, revision=revision, allow_pickle=allow_pickle)
    hf_config = hub.read_config(directory)
    family = family_for(hf_config, directory / "config.json")
    weights = files.weight_files(directory, allow_pickle=allow_pickle)  # refuse before building
    options = {"dtype": dtype, "param_dtype": param_dtype}
    if remat:
        options["remat"] = remat
    try:
        model = build(
            family,
            hf_config,
            head=head,
            names=files.tensor_names(weights),
            options=options,
            **overrides,
        )
    except (KeyError, TypeError, ValueError) as e:  # a config.json ftlab cannot build
        raise HFImportError(
            f"{directory / 'config.json'}: cannot build a {family.model_type} model: {e}"
        ) from None
    variables, notes = model_variables(
        model,
        files.read_files(weights),
        hf_config,
        family=family,
        rng=rng,
        param_dtype=param_dtype,
    )
    return Pretrained(model, variables, getattr(model, "config", None), hf_config, directory, notes)


# -- export ---------------------------------------------------------------------------------


def config_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict from ``Pretrained.hf_config`` or a transformers config (``to_dict()``)."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return dict(hf_config.to_dict())
    raise HFExportError(
        f"hf_config must be a dict or have to_dict(), got {type(hf_config).__name__}"
    )


def unrolled(params: Mapping, family: Family | None = None) -> Mapping:
    """A ``scan_layers=True`` tree (``h/...`` with a leading layer axis) as the per-layer tree
    (``h_0/...``) that Hugging Face's names are written from; other trees unchanged. A family
    whose stacks sit below the top level says how (``Family.unscan``)."""
    if family is not None and family.unscan is not None:
        return family.unscan(nn.meta.unbox(dict(params)))
    for name in SCAN_NAMES:
        if isinstance(params.get(name), Mapping):
            return unstack_layers(nn.meta.unbox(dict(params)), name)
    return params


def export_head(family: Family, config: Mapping[str, Any], paths: Iterable[str]) -> str:
    """The head a tree is exported with: the one whose leaves it has, else the one the
    config's ``architectures`` names, else ``family.bare_default``; a contradiction between
    the two is an ``HFExportError``."""
    paths = list(paths)
    present = [h for h, pre in family.heads.items() if any(p.startswith(pre) for p in paths)]
    archs = [a for a in config.get("architectures") or () if a in family.head_of_arch]
    declared = [family.head_of_arch[a] for a in archs]
    if present:
        head = present[0]
        if "none" in declared:
            bare = archs[declared.index("none")]
            raise HFExportError(
                f"params have a {head} head ({family.heads[head]}) but hf_config architectures "
                f"say {bare}; use {family.architectures.get(head, 'a task model')}"
            )
        return head
    head = declared[0] if declared else family.bare_default
    if head in family.heads and head not in family.tied_heads:
        raise HFExportError(
            f"hf_config architectures say {archs[0]} but params have no {family.heads[head]}kernel"
        )
    return head


def export_prefix(family: Family, config: Mapping[str, Any], paths: Iterable[str]) -> str:
    """The base-model prefix of the exported names: none for a bare model (``BertModel``)."""
    return "" if export_head(family, config, paths) == "none" else family.prefix


def _flat_tree(params: Mapping, model_state: Mapping | None, family: Family) -> dict:
    state = dict(nn.meta.unbox(dict(model_state or {})))  # init's boxes
    wanted = set(family.collections) - {"params"}
    if set(state) != wanted:
        need = f"model_state={{{', '.join(repr(c) + ': ...' for c in sorted(wanted))}}}"
        raise HFExportError(
            f"a {family.model_type} export takes {need if wanted else 'no model_state'}; got "
            f"collections {sorted(state) or 'none'}"
        )
    flat = {
        p: np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        for p, v in tree.flatten(nn.meta.unbox(dict(unrolled(params, family)))).items()
    }
    if not flat:
        raise HFExportError("params is empty")
    for collection, values in state.items():
        if family.unscan is not None:  # EfficientNet's scanned BatchNorm statistics
            values = family.unscan(values)
        for p, v in tree.flatten(values).items():
            flat[f"{collection}/{p}"] = np.ascontiguousarray(np.asarray(v, dtype=np.float32))
    return flat


def _check_labels(family: Family, config: Mapping[str, Any], flat: Mapping, head: str) -> None:
    leaf = f"{family.heads.get(head, '')}kernel"
    if head != "classifier" or leaf not in flat:
        return
    outputs = int(np.shape(flat[leaf])[-1])
    declared = num_labels(config, outputs)
    if declared != outputs:
        raise HFExportError(
            f"hf_config declares {declared} labels (id2label / num_labels) but {leaf} has "
            f"{outputs} outputs; set id2label (or num_labels) in the config to the fine-tuned "
            "task's labels"
        )


def hf_tensors(
    params: Mapping,
    hf_config: Any,
    *,
    family: Family | str | None = None,
    model_state: Mapping | None = None,
) -> dict[str, np.ndarray]:
    """The ``{HF name: array}`` that ``export_hf`` writes (nothing is written): float32, plus
    the int64 ``num_batches_tracked`` of BatchNorms. ``params``: the ``params`` collection
    (per-layer or scanned); ``model_state``: the other collections (a ResNet's
    ``{"batch_stats": ...}``)."""
    config = config_dict(hf_config)
    try:
        if isinstance(family, str):
            family = get_family(family)
        family = family or family_for(config)
    except HFImportError as e:
        raise HFExportError(str(e)) from None
    flat = _flat_tree(params, model_state, family)
    head = export_head(family, config, flat)
    family.check_export(config, flat, head)
    _check_labels(family, config, flat, head)
    prefix = "" if head == "none" else family.prefix
    try:
        tensors = family.table(config).to_hf(flat, prefix=prefix)
    except KeyError as e:
        raise HFExportError(
            f"parameter {e.args[0]!r} has no Hugging Face name for a {family.model_type} model"
        ) from None
    tensors = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in tensors.items()}
    tensors.update(family.buffers(tensors))
    _check_reimport(family, config, head, tensors, flat)
    return tensors


def _check_reimport(
    family: Family, config: Mapping[str, Any], head: str, tensors: Mapping, flat: Mapping
) -> None:
    """The tensors import into the model ``config`` describes as exactly ``flat``."""
    try:
        model = build(family, config, head=head, names=tensors)
        expected = tree.flatten(
            nn.meta.unbox(abstract_variables(model, family.example_inputs(model)))
        )
        back, _, _ = convert_tensors(family, config, tensors, expected, fresh=())
    except (HFImportError, KeyError, TypeError, ValueError) as e:
        raise HFExportError(
            f"the exported tensors do not import back into the model hf_config describes: {e}"
        ) from e
    back = {_shown(k): v for k, v in back.items()}
    if back.keys() != flat.keys():
        diff = sorted(back.keys() ^ flat.keys())
        raise HFExportError(f"export does not re-import to the same leaves: {diff[:10]}")
    for path, value in flat.items():
        if back[path].shape != value.shape or not np.array_equal(back[path], value):
            raise HFExportError(f"leaf {path!r} does not survive export -> import unchanged")


# Files of a model directory that are not weights or config but make it usable: tokenizers,
# image preprocessors, generation defaults and chat templates.
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def asset_files(source: str | os.PathLike) -> list[Path]:
    """The ``ASSET_FILES`` present in the model directory ``source`` (a missing directory is an
    error; a directory holding none of them gives ``[]``)."""
    directory = Path(source).expanduser()
    if not directory.is_dir():
        raise HFExportError(
            f"source {str(directory)!r} (tokenizer / preprocessor files to copy) is not a directory"
        )
    return [directory / name for name in ASSET_FILES if (directory / name).is_file()]


def export_hf(
    path: str | os.PathLike,
    params: Mapping,
    hf_config: Any,
    *,
    family: Family | str | None = None,
    model_state: Mapping | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write a Hugging Face model directory (``config.json`` + ``model.safetensors``) that
    transformers' ``from_pretrained`` loads.

    ``params``: a plain ftlab tree (``Pretrained.params``, ``Method.merged_params(...)``);
    ``hf_config``: the HF config dict (``Pretrained.hf_config``, ``hf_config_for(model)``) or
    a transformers config; ``model_state``: the other collections (``Pretrained.model_state``);
    ``source``: a model directory whose tokenizer / preprocessor / generation files
    (``ASSET_FILES``) are copied alongside. ``path`` must not exist or be an empty directory.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise HFExportError(f"export target {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise HFExportError(
            f"export target {str(out)!r} is a non-empty directory; refusing to overwrite it"
        )
    config = config_dict(hf_config)
    # all checks before anything is written
    tensors = hf_tensors(params, config, family=family, model_state=model_state)
    assets = [] if source is None else asset_files(source)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    files.write_safetensors(out / "model.safetensors", tensors)
    for file in assets:
        shutil.copyfile(file, out / file.name)
    return out


def hf_config_for(model: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """A ``config.json`` dict describing a model built in ftlab (the trainer's small ResNet),
    so that it exports without a source config."""
    family = family_of_model(model)
    if family.config_of is None:
        raise HFExportError(f"the {family.model_type} family cannot describe an ftlab model")
    return family.config_of(model, **kwargs)
