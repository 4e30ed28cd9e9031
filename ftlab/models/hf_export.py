"""Export ftlab parameter trees as Hugging Face model directories (the inverse of ``hf_import``).

``export_hf(path, params, hf_config)`` writes ``config.json`` (the HF config dict, as
``Pretrained.hf_config`` holds it) and ``model.safetensors`` with Hugging Face's tensor names and
layouts: Flax ``Dense.kernel`` (in, out) is transposed back to PyTorch ``Linear.weight``
(out, in); GPT-2's ``Conv1D`` weights stay (in, out) and its ``q_proj``/``k_proj``/``v_proj`` are
re-fused into ``c_attn``; the LM head is written only when the model has its own ``lm_head``
(untied), and its presence must agree with the config's ``tie_word_embeddings``. Every tensor is
float32 (``safetensors.numpy.save_file``, ``{"format": "pt"}`` metadata as transformers expects).

``params`` is a plain model tree, e.g. ``Pretrained.params`` or ``Method.merged_params(...)``
(LoRA folded into the kernels). Before anything is written, every exported tensor is converted
back with the family's import rules and compared to ``params`` leaf by leaf, so an export that
would not re-import to the same tree is an error, not a silent corruption.

Export rules live here per ``model_type`` (``register_exporter``); GPT-2 and LLaMA are built in.
BERT, ViT and ResNet (``model_type`` ``bert``/``vit``/``resnet``) are written by
``ftlab.models.hf_export_encoders`` with the encoder importer's names; a ResNet's BatchNorm
statistics come in ``model_state={"batch_stats": ...}``.

A tree of a ``scan_layers=True`` model (blocks stacked under ``h`` / ``layers`` / ``layer``) is
unstacked first (``ftlab.models.layers.unstack_layers``), so it exports to the same files.

``source=`` copies the tokenizer / preprocessor / generation files (``ASSET_FILES``) of a model
directory next to the weights, so that ``AutoTokenizer`` / ``AutoImageProcessor`` load the export
as they loaded the source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from safetensors.numpy import save_file

from ftlab import tree
from ftlab.models.hf_import import Family, get_family
from ftlab.models.layers import SCAN_NAMES, unstack_layers


class HFExportError(ValueError):
    """Parameters or a target directory that cannot be exported; the message names the cause."""


# -- rules ----------------------------------------------------------------------------------

# handler(match, flat params) -> ({hf tensor name: array}, ftlab paths consumed)
ExportHandler = Callable[[re.Match, Mapping[str, np.ndarray]], tuple[dict[str, np.ndarray], tuple]]


@dataclasses.dataclass(frozen=True)
class ExportRule:
    """ftlab leaves whose path fully matches ``pattern`` become the HF tensors ``handler``
    returns. ``prefixed``: the family's base-model prefix (``transformer.``, ``model.``) goes
    in front of the names (not for heads such as ``lm_head``/``score``)."""

    pattern: str
    handler: ExportHandler
    prefixed: bool = True


def to_linear(array: np.ndarray) -> np.ndarray:
    """Flax ``Dense.kernel`` (in, out) -> PyTorch ``Linear.weight`` (out, in); 1-D unchanged."""
    return array.T if array.ndim == 2 else array


def named(template: str, transform: Callable[[np.ndarray], np.ndarray] | None = None):
    """A handler writing the matched leaf as ``template.format(*match.groups())``."""

    def handle(m: re.Match, flat: Mapping[str, np.ndarray]):
        array = flat[m.string]
        value = array if transform is None else transform(array)
        return {template.format(*m.groups()): value}, (m.string,)

    return handle


def linear(template: str):
    """``named`` for ``nn.Linear`` parameters: kernels transposed, biases as they are."""
    return named(template, to_linear)


def _fuse_c_attn(m: re.Match, flat: Mapping[str, np.ndarray]):
    layer, leaf = m.group(1), m.group(2)
    paths = tuple(f"h_{layer}/attn/{n}_proj/{leaf}" for n in "qkv")
    missing = [p for p in paths if p not in flat]
    if missing:
        raise HFExportError(
            f"cannot fuse GPT-2 c_attn for layer {layer}: missing {', '.join(missing)}"
        )
    kind = "weight" if leaf == "kernel" else "bias"
    fused = np.concatenate([flat[p] for p in paths], axis=-1)  # Conv1D: (in, 3*out)
    return {f"h.{layer}.attn.c_attn.{kind}": fused}, paths


@dataclasses.dataclass(frozen=True)
class Exporter:
    """How an ftlab tree of one ``model_type`` is written with Hugging Face's names."""

    model_type: str
    rules: Sequence[ExportRule]
    prefix: str = ""
    tie_default: bool = True  # HF's default ``tie_word_embeddings`` for this family

    def tensors(self, flat: Mapping[str, np.ndarray], *, prefix: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        done: set[str] = set()
        for path in sorted(flat):
            if path in done:
                continue
            for rule in self.rules:
                m = re.fullmatch(rule.pattern, path)
                if m:
                    tensors, consumed = rule.handler(m, flat)
                    done.update(consumed)
                    for name, value in tensors.items():
                        full = (prefix if rule.prefixed else "") + name
                        if full in out:
                            raise HFExportError(f"{path!r}: HF tensor {full!r} written twice")
                        out[full] = value
                    break
            else:
                raise HFExportError(
                    f"parameter {path!r} has no Hugging Face name for a {self.model_type} model"
                )
        return out


GPT2_EXPORTER = Exporter(
    model_type="gpt2",
    prefix="transformer.",
    tie_default=True,
    rules=(
        ExportRule(r"wte/embedding", named("wte.weight")),
        ExportRule(r"wpe/embedding", named("wpe.weight")),
        ExportRule(r"h_(\d+)/(ln_1|ln_2)/scale", named("h.{0}.{1}.weight")),
        ExportRule(r"h_(\d+)/(ln_1|ln_2)/bias", named("h.{0}.{1}.bias")),
        ExportRule(r"h_(\d+)/attn/[qkv]_proj/(kernel|bias)", _fuse_c_attn),
        # Conv1D weights are stored (in, out): no transpose.
        ExportRule(r"h_(\d+)/attn/c_proj/kernel", named("h.{0}.attn.c_proj.weight")),
        ExportRule(r"h_(\d+)/attn/c_proj/bias", named("h.{0}.attn.c_proj.bias")),
        ExportRule(r"h_(\d+)/mlp/(c_fc|c_proj)/kernel", named("h.{0}.mlp.{1}.weight")),
        ExportRule(r"h_(\d+)/mlp/(c_fc|c_proj)/bias", named("h.{0}.mlp.{1}.bias")),
        ExportRule(r"ln_f/scale", named("ln_f.weight")),
        ExportRule(r"ln_f/bias", named("ln_f.bias")),
        ExportRule(r"lm_head/kernel", linear("lm_head.weight"), prefixed=False),
        ExportRule(r"score/kernel", linear("score.weight"), prefixed=False),
    ),
)

LLAMA_EXPORTER = Exporter(
    model_type="llama",
    prefix="model.",
    tie_default=False,
    rules=(
        ExportRule(r"embed_tokens/embedding", named("embed_tokens.weight")),
        ExportRule(
            r"layers_(\d+)/self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel",
            linear("layers.{0}.self_attn.{1}.weight"),
        ),
        ExportRule(
            r"layers_(\d+)/self_attn/(q_proj|k_proj|v_proj|o_proj)/bias",
            named("layers.{0}.self_attn.{1}.bias"),
        ),
        ExportRule(
            r"layers_(\d+)/mlp/(gate_proj|up_proj|down_proj)/kernel",
            linear("layers.{0}.mlp.{1}.weight"),
        ),
        ExportRule(
            r"layers_(\d+)/mlp/(gate_proj|up_proj|down_proj)/bias",
            named("layers.{0}.mlp.{1}.bias"),
        ),
        ExportRule(
            r"layers_(\d+)/(input_layernorm|post_attention_layernorm)/scale",
            named("layers.{0}.{1}.weight"),
        ),
        ExportRule(r"norm/scale", named("norm.weight")),
        ExportRule(r"lm_head/kernel", linear("lm_head.weight"), prefixed=False),
        ExportRule(r"score/kernel", linear("score.weight"), prefixed=False),
    ),
)

_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter, *, replace: bool = False) -> None:
    """Make ``export_hf`` understand trees of the exporter's ``model_type``."""
    if exporter.model_type in _EXPORTERS and not replace:
        raise ValueError(
            f"an exporter for model_type {exporter.model_type!r} is already registered"
        )
    _EXPORTERS[exporter.model_type] = exporter


def get_exporter(model_type: str) -> Exporter:
    if model_type not in _EXPORTERS:
        raise HFExportError(
            f"model_type {model_type!r} has no ftlab exporter; known: {', '.join(sorted(_EXPORTERS))}"
        )
    return _EXPORTERS[model_type]


register_exporter(GPT2_EXPORTER)
register_exporter(LLAMA_EXPORTER)


# -- exporting ------------------------------------------------------------------------------


def config_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict from ``Pretrained.hf_config`` or a transformers config (``to_dict()``)."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return dict(hf_config.to_dict())
    raise HFExportError(
        f"hf_config must be a dict or have to_dict(), got {type(hf_config).__name__}"
    )


def _check_roundtrip(
    family: Family, tensors: Mapping[str, np.ndarray], flat: Mapping[str, np.ndarray]
) -> None:
    """Every exported tensor converts back (import rules) to exactly the given leaves."""
    back: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        leaves, known = family.convert(name, array)
        if not known or not leaves:
            raise HFExportError(
                f"exported tensor {name!r} is not importable as {family.model_type}"
            )
        back.update(leaves)
    if set(back) != set(flat):
        diff = sorted(set(back) ^ set(flat))
        raise HFExportError(f"export does not re-import to the same leaves: {', '.join(diff[:10])}")
    for path, value in flat.items():
        if back[path].shape != value.shape or not np.array_equal(back[path], value):
            raise HFExportError(f"leaf {path!r} does not survive export -> import unchanged")


ENCODER_TYPES = ("bert", "vit", "resnet")  # written by ftlab.models.hf_export_encoders


def unrolled(params: Mapping) -> Mapping:
    """A ``scan_layers=True`` tree (``h/...`` with a leading layer axis) as the per-layer tree
    (``h_0/...``) that Hugging Face's names are written from; other trees unchanged."""
    for name in SCAN_NAMES:
        if isinstance(params.get(name), Mapping):
            return unstack_layers(nn.meta.unbox(dict(params)), name)
    return params


def hf_tensors(
    params: Mapping,
    hf_config: Any,
    *,
    family: Family | str | None = None,
    model_state: Mapping | None = None,
) -> dict[str, np.ndarray]:
    """The ``{HF name: array}`` that ``export_hf`` would write (nothing is written): float32,
    except the int64 ``num_batches_tracked`` of a ResNet's BatchNorms."""
    config = config_dict(hf_config)
    params = unrolled(params)
    model_type = family.model_type if isinstance(family, Family) else family
    model_type = model_type or config.get("model_type")
    if model_type in ENCODER_TYPES:
        from ftlab.models.hf_export_encoders import encoder_tensors

        return encoder_tensors(
            params, {**config, "model_type": model_type}, model_state=model_state
        )
    if model_state:
        raise HFExportError(
            f"model_state {sorted(model_state)}: a {model_type} model has no collections besides "
            "params to export"
        )
    if family is None:
        model_type = config.get("model_type")
        if not model_type:
            raise HFExportError("hf_config has no model_type; pass family=")
        family = get_family(model_type)
    elif isinstance(family, str):
        family = get_family(family)
    exporter = get_exporter(family.model_type)

    flat = {
        p: np.ascontiguousarray(np.asarray(v, dtype=np.float32))
        for p, v in tree.flatten(nn.meta.unbox(params)).items()  # init's boxes
    }
    if not flat:
        raise HFExportError("params is empty")
    others = sorted({p.split("/", 1)[0] for p in flat} & (set(family.collections) - {"params"}))
    if others:  # e.g. BatchNorm statistics: no exporter handles them yet
        raise HFExportError(f"collections {others} cannot be exported")

    tied = bool(config.get("tie_word_embeddings", exporter.tie_default))
    if tied and "lm_head/kernel" in flat:
        raise HFExportError(
            "params have an untied lm_head/kernel but hf_config says tie_word_embeddings=true"
        )
    if not tied and "lm_head/kernel" not in flat and "score/kernel" not in flat:
        archs = [family.head_of(a) for a in config.get("architectures") or ()]
        if "lm" in archs:
            raise HFExportError(
                "hf_config says tie_word_embeddings=false (an own lm_head) but params have no "
                "lm_head/kernel"
            )

    # A bare base model (GPT2Model, LlamaModel) is saved by HF without the base prefix.
    archs = [family.head_of(a) for a in config.get("architectures") or ()]
    headless = "none" in archs and not ({"lm_head/kernel", "score/kernel"} & set(flat))
    tensors = exporter.tensors(flat, prefix="" if headless else exporter.prefix)
    tensors = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in tensors.items()}
    _check_roundtrip(family, tensors, flat)
    return tensors


# Files of a model directory that are not weights or config but make it usable: tokenizers
# (fast and slow: vocabularies, merges, sentencepiece models), image preprocessors, generation
# defaults and chat templates.
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
    """Write a Hugging Face model directory (``config.json`` + ``model.safetensors``).

    ``params``: a plain ftlab tree (``Pretrained.params``, ``Method.merged_params(...)``).
    ``hf_config``: the HF config dict (``Pretrained.hf_config``) or a transformers config.
    ``family``: a ``Family`` or model type; by default the config's ``model_type``.
    ``model_state``: the model's other collections (a ResNet's ``{"batch_stats": ...}``).
    ``source``: a model directory whose tokenizer / preprocessor / generation files
    (``ASSET_FILES``, those present) are copied alongside.
    ``path`` must not exist or be an empty directory; returns it.
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
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for file in assets:
        shutil.copyfile(file, out / file.name)
    return out
