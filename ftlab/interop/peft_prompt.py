"""Prompt-tuning adapters in Hugging Face PEFT's format (``peft_type: PROMPT_TUNING``), read
into and written from ftlab's ``method.name = "prompt"`` trees (``ftlab.methods.prompt``).

PEFT (0.21) saves a ``PromptTuningConfig`` (``num_virtual_tokens``, ``token_dim``,
``num_transformer_submodules`` (1 for a decoder), ``num_attention_heads`` and ``num_layers``
(the base model's), ``prompt_tuning_init`` (``RANDOM`` | ``SAMPLE_VOCAB`` | ``TEXT``) and its
text / tokenizer, ``task_type`` ``CAUSAL_LM`` or ``SEQ_2_SEQ_LM``) and one tensor,
``prompt_embeddings`` of shape (num_virtual_tokens * num_transformer_submodules, token_dim):
the soft prompt, which is ftlab's ``{"prompt": {"embeddings"}}`` leaf as it is. ``PeftModelForCausalLM.forward``
prepends it to the input embeddings (``ftlab.models.layers.Decoder``: ``prompt_embeds``).

T5 (``task_type`` ``SEQ_2_SEQ_LM``): ``PeftModelForSeq2SeqLM.forward`` (PROMPT_TUNING branch)
prepends the first ``num_virtual_tokens`` rows of ``prompt_embeddings`` to the encoder's input
embeddings and leaves the decoder alone (``ftlab.models.t5.T5``: ``prompt_embeds``). PEFT's
default for SEQ_2_SEQ_LM is ``num_transformer_submodules`` 2, a (2v, token_dim) table whose
rows v..2v-1 PROMPT_TUNING never reads (that forward's last branch, e.g. multitask prompt
tuning, is the one that prepends them to the decoder).
ftlab exports 1 (a (v, token_dim) table: a valid config PEFT loads and runs the same) and
imports 1 or 2, keeping the first v rows (a note records the dropped ones).

Only causal LMs (GPT-2, LLaMA) and T5 without other trained leaves: PEFT's prompt learning saves no
``modules_to_save`` here, so a run that also trains base leaves (``method.trainable``) is
refused on export rather than written without them. ``prompt_tuning_init`` records ftlab's
``method.prompt.init`` (``random`` -> ``RANDOM``, ``vocab`` -> ``SAMPLE_VOCAB``, ``text`` ->
``TEXT`` with the text and ``base_model_name_or_path`` as the tokenizer, or ``RANDOM`` when
there is no such name: PEFT would refuse a ``TEXT`` config without one). The init only matters
to a fresh PEFT model; a loaded one takes the saved prompt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ftlab import tree
from ftlab.config import ConfigError
from ftlab.interop import peft as peft_lib
from ftlab.interop.errors import PeftAdapterError
from ftlab.interop.peft_scaling import ScaledAdapter, _f32, _family, _read, _write
from ftlab.methods import Method
from ftlab.methods import prompt as prompt_lib

TENSOR = "prompt_embeddings"
_FROM_PEFT = {v: k for k, v in prompt_lib.PEFT_INIT.items()}


def _model_sizes(hf: Mapping, family_type: str) -> tuple[int, int]:
    """(num_attention_heads, num_layers) of the base model, as PEFT's
    ``_prepare_prompt_learning_config`` reads them from its config."""
    heads = next((hf[k] for k in ("num_attention_heads", "n_head", "num_heads") if k in hf), None)
    layers = next(
        (hf[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in hf), None
    )  # T5: num_heads, num_layers (the encoder's), as PEFT reads them through the aliases
    if heads is None or layers is None:
        raise PeftAdapterError(
            f"a {family_type} config without num_attention_heads / num_hidden_layers "
            "(n_head / n_layer, num_heads / num_layers)"
        )
    return int(heads), int(layers)


def _task_type(source: str) -> str:
    """PEFT's task type of a prompt on this token embedding (``ftlab.methods.prompt``)."""
    return "SEQ_2_SEQ_LM" if prompt_lib.is_encoder_decoder(source) else "CAUSAL_LM"


def _source(params: Mapping) -> tuple[str, tuple[int, ...]]:
    flat = tree.flatten(params)
    try:
        path = prompt_lib.embedding_path(sorted(flat))
    except ConfigError as e:
        raise PeftAdapterError(str(e).replace("config.method.name: ", "")) from None
    return path, tuple(np.shape(flat[path]))


def load_prompt_adapter(
    directory: str | os.PathLike,
    params: Mapping,
    hf_config: Any,
    *,
    family: Any = None,
) -> ScaledAdapter:
    """Read a PEFT prompt-tuning adapter for the causal LM or T5 of ``params`` (base tree)
    and ``hf_config``: a ``ScaledAdapter`` whose method has ``prompt_tokens`` and whose leaves
    are ``{"prompt": {"embeddings": (v, embed)}}``. A SEQ_2_SEQ_LM adapter with
    ``num_transformer_submodules`` 2 (PEFT's default) keeps the first v rows, the only ones
    PEFT's PROMPT_TUNING forward reads (a note says so)."""
    directory = Path(directory).expanduser()
    config, tensors, _ = _read(directory)
    where = str(directory / peft_lib.ADAPTER_CONFIG)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise PeftAdapterError(
            f"{where}: peft_type {config.get('peft_type')!r} is not 'PROMPT_TUNING'"
        )
    _, fam = _family(hf_config, family)
    source, shape = _source(params)
    task = _task_type(source)
    if config.get("task_type") != task:
        raise PeftAdapterError(
            f"{where}: task_type {config.get('task_type')!r}; a prompt for this "
            f"{fam.model_type} model is {task!r} (ftlab runs CAUSAL_LM adapters on GPT-2 and "
            "LLaMA, SEQ_2_SEQ_LM on T5)"
        )
    seq2seq = task == "SEQ_2_SEQ_LM"
    # PEFT's default when unset (_setup_prompt_encoder): 2 for SEQ_2_SEQ_LM, else 1
    submodules = int(config.get("num_transformer_submodules") or (2 if seq2seq else 1))
    if submodules not in ((1, 2) if seq2seq else (1,)):
        raise PeftAdapterError(
            f"{where}: num_transformer_submodules {submodules}; "
            + ("an encoder-decoder has 1 or 2" if seq2seq else "a decoder has 1")
        )
    if sorted(tensors) != [TENSOR]:
        raise PeftAdapterError(
            f"{directory}: a prompt-tuning adapter holds one tensor {TENSOR!r}, got {sorted(tensors)}"
        )
    table = np.asarray(tensors[TENSOR], np.float32)
    v = int(config.get("num_virtual_tokens") or 0)
    if table.shape != (v * submodules, shape[1]) or v <= 0:
        raise PeftAdapterError(
            f"adapter tensor {TENSOR!r} has shape {table.shape}; the config's "
            f"num_virtual_tokens {v} x num_transformer_submodules {submodules} and this "
            f"{fam.model_type} model's width {shape[1]} need {(v * submodules, shape[1])}"
        )
    if config.get("token_dim") not in (None, shape[1]):
        raise PeftAdapterError(
            f"{where}: token_dim {config['token_dim']} differs from the model's width {shape[1]}"
        )
    notes = []
    if submodules == 2:
        notes.append(
            f"{TENSOR} has {2 * v} rows (num_transformer_submodules 2, PEFT's SEQ_2_SEQ_LM "
            f"default); PEFT's PROMPT_TUNING forward prepends only the first {v} to the "
            f"encoder input, so rows {v}..{2 * v - 1} (unused) were dropped; an export writes "
            "num_transformer_submodules 1"
        )
    prompt = np.ascontiguousarray(table[:v])
    init = _FROM_PEFT.get(str(config.get("prompt_tuning_init") or "RANDOM"), "random")
    method = Method("prompt", (), prompt_tokens=v, prompt_init=init, prompt_source=source)
    return ScaledAdapter(method, {"prompt": {"embeddings": prompt}}, {}, config, notes)


def prompt_adapter(
    method: Method,
    trainable: Mapping,
    frozen: Mapping,
    hf_config: Any,
    *,
    save_trained: bool = True,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    family: Any = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """(adapter config, tensors, metadata) of a prompt-tuning method's PEFT adapter, as
    ``save_pretrained`` writes them (``peft_version`` left out)."""
    if not method.prompt_tokens:
        raise PeftAdapterError(f"method {method.name!r} has no soft prompt to export")
    trained = sorted(tree.flatten(trainable.get("params", {})))
    if trained and save_trained:
        raise PeftAdapterError(
            f"the run also trains {trained[:4]}{' ...' if len(trained) > 4 else ''} "
            "(method.trainable); PEFT's prompt tuning saves only the soft prompt"
        )
    hf, fam = _family(hf_config, family)
    base = {**tree.flatten(frozen), **tree.flatten(trainable.get("params", {}))}
    source, _ = _source(tree.unflatten(base))  # a causal LM or T5 ftlab prompt-tunes
    task = _task_type(source)
    if task_type not in (None, task):
        raise PeftAdapterError(
            f"a prompt for this {fam.model_type} model exports a {task} adapter, not {task_type!r}"
        )
    prompt = _f32(method.prompt_embeddings(trainable))
    heads, layers = _model_sizes(hf, fam.model_type)
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": heads,
        "num_layers": layers,
        # 1 for T5 too (PEFT's SEQ_2_SEQ_LM default is 2): PROMPT_TUNING's forward prepends
        # only the first num_virtual_tokens rows, to the encoder, so a (v, token_dim) table with
        # 1 submodule is the whole prompt, a valid config PEFT loads and runs the same
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(prompt.shape[0]),
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": prompt_lib.PEFT_INIT.get(method.prompt_init, "RANDOM"),
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": task,
        "token_dim": int(prompt.shape[1]),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    if method.prompt_init == "text":
        if base_model_name_or_path:  # PEFT's TEXT needs the text and a tokenizer to load
            config["prompt_tuning_init_text"] = method.prompt_init_text
            config["tokenizer_name_or_path"] = base_model_name_or_path
        else:  # (the init matters only to a fresh PEFT model; the saved prompt is loaded)
            config["prompt_tuning_init"] = "RANDOM"
    return config, {TENSOR: prompt}, {"format": "pt"}


def export_prompt_adapter(
    directory: str | os.PathLike,
    method: Method,
    trainable: Mapping,
    frozen: Mapping,
    hf_config: Any,
    **kwargs: Any,
) -> Path:
    """Write a prompt-tuning method's PEFT adapter directory (``PeftModel.from_pretrained``
    loads it); ``directory`` must not exist or be empty; nothing is written before every check
    passed. Keywords as ``prompt_adapter``."""
    config, tensors, metadata = prompt_adapter(method, trainable, frozen, hf_config, **kwargs)
    return _write(Path(directory).expanduser(), config, tensors, metadata)
