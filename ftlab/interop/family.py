"""What one Hugging Face ``model_type`` is in ftlab, and the registry of them.

A family module (``ftlab/interop/gpt2.py``, ...) builds a ``Family``: how to build the Flax
module from ``config.json``, its one name ``Table``, the base-model prefix, its heads, and the few
quirks of its checkpoints (buffers to skip, old tensor names). ``get_family("bert")`` imports
``ftlab.interop.bert`` once, whose last line registers it, so a new family is one new file.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from ftlab.interop.errors import HFImportError
from ftlab.interop.table import Renames, Table

BUILTIN = ("gpt2", "llama", "bert", "vit", "resnet", "efficientnet", "whisper", "t5")
MODEL_OPTIONS = ("dtype", "param_dtype", "remat", "attention_impl")


def _nothing(*args: Any) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Family:
    """How a Hugging Face ``model_type`` maps onto an ftlab model, both ways.

    ``build(hf_config, head, options, overrides)`` -> module: ``head`` is ``"lm"``,
    ``"classifier"`` or ``"none"``; ``options`` the model keywords of ``MODEL_OPTIONS`` it
    accepts (``options`` lists them); ``overrides`` replace config fields (``num_labels=3``).
    ``table(hf_config)`` -> the name ``Table`` (most families ignore the config).
    ``prefix``: the base model's prefix in a task model's names (``"transformer."``), left out
    by a bare model (``GPT2Model``). ``heads``: head -> prefix of its leaves (``"score/"``);
    ``tied_heads``: heads whose leaves may be absent (an LM head tied to the embeddings).
    ``architectures``: head -> the ``architectures`` entry written for it; ``head_of_arch``
    the other way (more names may map to one head). ``default_head``: on import when
    ``architectures`` says nothing; ``bare_default``: on export when neither the config nor
    the params name a head.

    On import: HF names matching ``ignore`` are skipped (buffers), ``aliases`` rename old
    tensor names, names matching ``drop_hf`` (pre-training heads) and leaves matching
    ``droppable`` (heads the model lacks) are dropped with a note, and leaves matching
    ``fresh`` that the checkpoint lacks are initialised. ``infer(tensor names)`` -> build
    overrides the config cannot tell (BERT without its pooler). On export ``buffers(tensors)``
    adds what PyTorch saves besides parameters, and ``check_export(config, flat, head)``
    refuses inconsistent trees with a message. ``memory_names`` and ``peft_task`` are what
    PEFT adapters need besides the table (``ftlab.interop.peft``). ``unscan`` turns a
    ``scan_layers=True`` model's collection into the per-layer tree (encoder-decoders and
    EfficientNet stack below the top level).
    """

    model_type: str
    build: Callable[..., nn.Module]
    table: Callable[[Mapping[str, Any]], Table]
    example_inputs: Callable[[nn.Module], Any]
    prefix: str = ""
    heads: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tied_heads: Sequence[str] = ()
    architectures: Mapping[str, str] = dataclasses.field(default_factory=dict)
    head_of_arch: Mapping[str, str] = dataclasses.field(default_factory=dict)
    default_head: str = "lm"
    bare_default: str = "lm"
    options: Sequence[str] = MODEL_OPTIONS
    collections: Sequence[str] = ("params",)
    ignore: Sequence[str] = ()
    aliases: Sequence[tuple[str, str]] = ()
    drop_hf: Sequence[str] = ()
    droppable: Sequence[str] = ()
    fresh: Sequence[str] = ()
    infer: Callable[[Sequence[str]], dict] = _nothing
    buffers: Callable[[Mapping[str, np.ndarray]], dict] = _nothing
    check_export: Callable[[Mapping[str, Any], Mapping[str, Any], str], None] = _nothing
    config_of: Callable[[nn.Module], dict] | None = None  # an ftlab-built model's config.json
    model_class: type | None = None
    # PEFT: module names in memory where they differ from the checkpoint's (without the
    # prefix), and the adapter's task_type per head (None: PEFT has none, e.g. images)
    memory_names: Renames = dataclasses.field(default_factory=Renames)
    peft_task: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    # a scan_layers=True model's collection -> the per-layer tree the table names (export
    # unstacks with it; unchanged when not scanned); None: a top-level stack (``SCAN_NAMES``)
    unscan: Callable[[Mapping[str, Any]], dict] | None = None

    def head_from_config(self, hf_config: Mapping[str, Any]) -> str:
        """The head ``architectures`` names (the first it knows), else ``default_head``."""
        for arch in hf_config.get("architectures") or ():
            if arch in self.head_of_arch:
                return self.head_of_arch[arch]
        return self.default_head

    def short_name(self, name: str) -> str:
        """An HF tensor name as the table spells it: aliases applied, prefix removed."""
        for pattern, replacement in self.aliases:
            name = re.sub(pattern, replacement, name)
        return name[len(self.prefix) :] if self.prefix and name.startswith(self.prefix) else name

    def memory_module(self, module: str, prefix: str) -> str:
        """A checkpoint module name (with ``prefix``) as the model in memory names it."""
        if not module.startswith(prefix):
            return self.memory_names.to_memory(module)
        return prefix + self.memory_names.to_memory(module[len(prefix) :])

    def checkpoint_module(self, module: str, prefix: str) -> str:
        """The inverse of ``memory_module``."""
        if not module.startswith(prefix):
            return self.memory_names.to_checkpoint(module)
        return prefix + self.memory_names.to_checkpoint(module[len(prefix) :])

    def ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Make ``load_pretrained`` / ``export_hf`` understand the family's ``model_type``."""
    if family.model_type in _FAMILIES and not replace:
        raise ValueError(f"a family for model_type {family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family
    return family


def get_family(model_type: str) -> Family:
    """The registered family (importing ``ftlab.interop.<model_type>`` once if needed)."""
    if model_type not in _FAMILIES and str(model_type).isidentifier():
        module = f"ftlab.interop.{model_type}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but lacks a dependency: say so
                raise
    if model_type not in _FAMILIES:
        raise HFImportError(
            f"config.json model_type {model_type!r} has no ftlab importer; known: "
            f"{', '.join(families())}"
        )
    return _FAMILIES[model_type]


def families() -> tuple[str, ...]:
    """The model types that can be imported and exported (the built-in ones and any other
    registered)."""
    for name in BUILTIN:
        if name not in _FAMILIES:
            importlib.import_module(f"ftlab.interop.{name}")
    return tuple(sorted(_FAMILIES))


def family_of_model(model: nn.Module) -> Family:
    """The family whose ``model_class`` ``model`` is (for ``hf_config_for``)."""
    families()
    for family in _FAMILIES.values():
        if family.model_class is not None and isinstance(model, family.model_class):
            return family
    raise TypeError(f"no Hugging Face family builds {type(model).__name__}")
