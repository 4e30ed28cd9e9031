"""Import Hugging Face checkpoints (``config.json`` + safetensors) into ftlab parameter trees.

``load_pretrained(path_or_hub_id)`` reads ``config.json``, picks the *family* registered for its
``model_type``, builds the ftlab Flax module, and converts every tensor by the family's rules
(PyTorch ``Linear`` weights are transposed to ``(in, out)``; GPT-2's ``Conv1D`` weights already
are; GPT-2's fused ``c_attn`` is split into ``q_proj``/``k_proj``/``v_proj``). Tensors are
read one at a time with ``safetensors`` (numpy), from ``model.safetensors`` or the shards named
by ``model.safetensors.index.json``; ``pytorch_model.bin`` is unpickled only when
``allow_pickle=True`` (and needs torch).

Every converted leaf is checked against the shapes the model expects (``jax.eval_shape``, so
nothing is allocated twice). A tensor no rule knows, a model leaf the checkpoint lacks, and a
shape that differs are errors naming the tensor. Two exceptions, both reported in
``Pretrained.notes``: a head the model does not have (``lm_head`` when loading into a
classifier, ``score`` when loading into an LM) is dropped, and a new classifier head
(``score``) the checkpoint lacks is initialised fresh.

Adding a family (BERT, ViT, ResNet, ...) needs no edit here: in its own module, build a
``Family`` (``config_from_hf``, ``build``, ``rules``; ``rename``/``linear`` make most rules) and
call ``register_family`` (leaves of other variable collections, such as BatchNorm's
``batch_stats``, are named ``"batch_stats/..."`` and listed in ``Family.collections``). If ``config.json`` names a ``model_type`` nobody registered,
``ftlab.models.<model_type>`` is imported once so that its module-level registration runs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab import tree
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.models.llama import Llama, LlamaConfig


class HFImportError(ValueError):
    """A checkpoint that cannot be imported; the message names the file or tensor."""


class HubOfflineError(HFImportError):
    """A hub id was given but the Hugging Face Hub cannot be reached from this machine."""


# -- families -------------------------------------------------------------------------------

Handler = Callable[[re.Match, np.ndarray], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensors whose (prefix-stripped) name fully matches ``pattern`` become the leaves that
    ``handler(match, array)`` returns (``{ftlab path: array}``)."""

    pattern: str
    handler: Handler


def rename(template: str, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Handler:
    """A handler writing one leaf at ``template.format(*match.groups())``."""

    def handle(match: re.Match, array: np.ndarray) -> dict[str, np.ndarray]:
        value = array if transform is None else transform(array)
        return {template.format(*match.groups()): value}

    return handle


def transpose_linear(array: np.ndarray) -> np.ndarray:
    """PyTorch ``Linear.weight`` (out, in) -> Flax ``Dense.kernel`` (in, out); 1-D unchanged."""
    return array.T if array.ndim == 2 else array


def linear(template: str) -> Handler:
    """``rename`` for ``nn.Linear`` parameters: weights transposed, biases as they are."""
    return rename(template, transpose_linear)


def linear_or_bias(template: str) -> Handler:
    """For a pattern ending in ``(weight|bias)``: the leaf ``template.format(*other groups)``
    plus ``/kernel`` (weight transposed) or ``/bias``."""

    def handle(match: re.Match, array: np.ndarray) -> dict[str, np.ndarray]:
        *groups, kind = match.groups()
        leaf = "kernel" if kind == "weight" else "bias"
        return {f"{template.format(*groups)}/{leaf}": transpose_linear(array)}

    return handle


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face ``model_type`` maps onto an ftlab model.

    ``config_from_hf(config_json_dict, **overrides)`` -> ftlab config; ``build(config, head=,
    dtype=, param_dtype=, remat=)`` -> module; ``rules`` are tried in order on each tensor name
    after the first matching ``prefixes`` entry is removed; names matching ``ignore`` (buffers)
    are skipped. ``droppable``: regexes of leaves (heads) that may be in the checkpoint but not
    in the model; ``fresh``: leaves that may be missing from the checkpoint and are initialised.
    ``example_inputs()`` is a tiny input for ``init`` / ``eval_shape``. ``head_of`` maps an
    ``architectures`` entry to the model's ``head`` argument.

    Rules name leaves by their path in the ``params`` collection (``"h_0/ln_1/scale"``); a leaf
    of another variable collection listed in ``collections`` is named with the collection first
    (``"batch_stats/bn_0/mean"`` for a ResNet's running statistics).
    """

    model_type: str
    config_from_hf: Callable[..., Any]
    build: Callable[..., nn.Module]
    rules: Sequence[Rule]
    prefixes: Sequence[str] = ()
    ignore: Sequence[str] = ()
    droppable: Sequence[str] = ()
    fresh: Sequence[str] = ()
    example_inputs: Callable[[], Any] = lambda: jnp.zeros((1, 1), jnp.int32)
    head_of: Callable[[str], str | None] = lambda arch: None
    default_head: str = "lm"
    collections: Sequence[str] = ("params",)

    def convert(self, name: str, array: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        """(leaves, known) for one tensor; ``known`` is False when no rule or ignore matches."""
        short = name
        for prefix in self.prefixes:
            if short.startswith(prefix):
                short = short[len(prefix) :]
                break
        if any(re.fullmatch(p, short) for p in self.ignore):
            return {}, True
        for rule in self.rules:
            m = re.fullmatch(rule.pattern, short)
            if m:
                return rule.handler(m, array), True
        return {}, False


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> None:
    """Make ``load_pretrained`` understand checkpoints whose ``model_type`` is the family's."""
    if family.model_type in _FAMILIES and not replace:
        raise ValueError(f"a family for model_type {family.model_type!r} is already registered")
    _FAMILIES[family.model_type] = family


def get_family(model_type: str) -> Family:
    """The registered family (importing ``ftlab.models.<model_type>`` once if needed)."""
    if model_type not in _FAMILIES and model_type.isidentifier():
        module = f"ftlab.models.{model_type}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but lacks a dependency: say so
                raise
    if model_type not in _FAMILIES:
        raise HFImportError(
            f"config.json model_type {model_type!r} has no ftlab importer; known: "
            f"{', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[model_type]


def families() -> tuple[str, ...]:
    """The model types that can be imported."""
    return tuple(sorted(_FAMILIES))


def _head_from_arch(lm: Sequence[str], classifier: Sequence[str], base: Sequence[str]):
    def head_of(arch: str) -> str | None:
        if arch in lm:
            return "lm"
        if arch in classifier:
            return "classifier"
        if arch in base:
            return "none"
        return None

    return head_of


def _split_c_attn(m: re.Match, array: np.ndarray) -> dict[str, np.ndarray]:
    layer, kind = m.group(1), m.group(2)
    if array.shape[-1] % 3:
        raise HFImportError(
            f"tensor {m.string!r}: fused c_attn of shape {array.shape} cannot be split into q/k/v "
            "(last dimension not divisible by 3)"
        )
    q, k, v = np.split(array, 3, axis=-1)
    leaf = "kernel" if kind == "weight" else "bias"
    return {f"h_{layer}/attn/{n}_proj/{leaf}": a for n, a in zip("qkv", (q, k, v))}


GPT2_FAMILY = Family(
    model_type="gpt2",
    config_from_hf=GPT2Config.from_hf_config,
    build=lambda config, **kw: GPT2(config, **kw),
    prefixes=("transformer.",),
    rules=(
        Rule(r"wte\.weight", rename("wte/embedding")),
        Rule(r"wpe\.weight", rename("wpe/embedding")),
        Rule(r"h\.(\d+)\.(ln_1|ln_2)\.weight", rename("h_{0}/{1}/scale")),
        Rule(r"h\.(\d+)\.(ln_1|ln_2)\.bias", rename("h_{0}/{1}/bias")),
        Rule(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", _split_c_attn),
        # Conv1D weights are stored (in, out): no transpose.
        Rule(r"h\.(\d+)\.attn\.c_proj\.weight", rename("h_{0}/attn/c_proj/kernel")),
        Rule(r"h\.(\d+)\.attn\.c_proj\.bias", rename("h_{0}/attn/c_proj/bias")),
        Rule(r"h\.(\d+)\.mlp\.(c_fc|c_proj)\.weight", rename("h_{0}/mlp/{1}/kernel")),
        Rule(r"h\.(\d+)\.mlp\.(c_fc|c_proj)\.bias", rename("h_{0}/mlp/{1}/bias")),
        Rule(r"ln_f\.weight", rename("ln_f/scale")),
        Rule(r"ln_f\.bias", rename("ln_f/bias")),
        Rule(r"lm_head\.weight", linear("lm_head/kernel")),
        Rule(r"score\.weight", linear("score/kernel")),
    ),
    ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),  # causal-mask buffers of old checkpoints
    droppable=(r"lm_head/.*", r"score/.*"),
    fresh=(r"score/.*",),
    head_of=_head_from_arch(
        ("GPT2LMHeadModel", "GPT2DoubleHeadsModel"),
        ("GPT2ForSequenceClassification",),
        ("GPT2Model",),
    ),
)

LLAMA_FAMILY = Family(
    model_type="llama",
    config_from_hf=LlamaConfig.from_hf_config,
    build=lambda config, **kw: Llama(config, **kw),
    prefixes=("model.",),
    rules=(
        Rule(r"embed_tokens\.weight", rename("embed_tokens/embedding")),
        Rule(
            r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)",
            linear_or_bias("layers_{0}/self_attn/{1}"),
        ),
        Rule(
            r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)",
            linear_or_bias("layers_{0}/mlp/{1}"),
        ),
        Rule(
            r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
            rename("layers_{0}/{1}/scale"),
        ),
        Rule(r"norm\.weight", rename("norm/scale")),
        Rule(r"lm_head\.weight", linear("lm_head/kernel")),
        Rule(r"score\.weight", linear("score/kernel")),
    ),
    ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
    droppable=(r"lm_head/.*", r"score/.*"),
    fresh=(r"score/.*",),
    head_of=_head_from_arch(
        ("LlamaForCausalLM",), ("LlamaForSequenceClassification",), ("LlamaModel",)
    ),
)

register_family(GPT2_FAMILY)
register_family(LLAMA_FAMILY)


# -- locating and reading a checkpoint ------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_HUB_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json")
_PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def hub_offline(*also: str) -> bool:
    """Whether Hub access is off now: ``HF_HUB_OFFLINE`` or any of ``also``
    (``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``), read at call time because
    huggingface_hub reads its variable only when imported, or the Hub unreachable from this
    machine (``hub_unreachable``: a connection attempt of at most 3 s, once per process)."""
    truthy = {"1", "on", "yes", "true"}
    for var in ("HF_HUB_OFFLINE", *also):
        if os.environ.get(var, "").strip().lower() in truthy:
            return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - transformers depends on it
        return True
    return hub_unreachable() is not None  # no network: say so now, not after retries


_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> str | None:
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f} s"


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (a TCP connection to its endpoint,
    at most ``timeout`` seconds, once per process), or None when it answers or a proxy is
    configured (then the download itself finds out). Without it a download offline retries
    for half a minute before failing."""
    if any(os.environ.get(var) for var in _PROXIES):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _probe(endpoint, timeout)


def looks_like_hub_id(name: str) -> bool:
    """``gpt2`` or ``owner/name`` (not a path such as ``./x``, ``/x``, ``~/x`` or ``a/b/c``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """A local model directory: ``name_or_path`` itself, or a hub snapshot downloaded now."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HFImportError(
            f"{text!r} is a file; pass the model directory that holds config.json and the weights"
        )
    if not looks_like_hub_id(text):
        raise HFImportError(f"model directory {text!r} does not exist")
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - transformers depends on it
        raise HFImportError(
            f"{text!r} is not a local directory and huggingface_hub is not installed to "
            "download it; pass the path of a local model directory"
        ) from None
    patterns = list(_HUB_PATTERNS) + (list(_PICKLE_PATTERNS) if allow_pickle else [])
    try:
        local = huggingface_hub.snapshot_download(  # unreachable: the local cache only
            text,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=hub_offline(),
        )
    except Exception as e:  # network failures come as OSError, httpx errors, hub errors...
        if type(e).__name__ in (
            "RepositoryNotFoundError",
            "GatedRepoError",
            "RevisionNotFoundError",
        ):
            raise HFImportError(
                f"{text!r} is not a local directory and the Hugging Face Hub answered "
                f"{type(e).__name__}: {e}"
            ) from e
        unreachable = hub_unreachable()
        raise HubOfflineError(
            f"{text!r} is not a local directory, so it was taken as a Hugging Face Hub id, but the "
            f"download failed ({type(e).__name__}: {e}). This machine looks offline ("
            + (f"huggingface.co unreachable: {unreachable}" if unreachable else "no route to it")
            + "). Download the model on a machine with network access, e.g. "
            f"`huggingface-cli download {text} --local-dir DIR` or "
            "`AutoModel.from_pretrained(...).save_pretrained(DIR, safe_serialization=True)`, "
            "copy DIR here, and pass its path (a directory holding config.json and "
            "model.safetensors) instead of the hub id."
        ) from e
    return Path(local)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{str(directory)!r} has no config.json (is it a model directory?)")
    with open(path) as f:
        return json.load(f)


def _shards(directory: Path, index_name: str, single: str) -> list[Path] | None:
    index = directory / index_name
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise HFImportError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
        return [directory / name for name in files]
    if (directory / single).is_file():
        return [directory / single]
    return None


def weight_files(directory: str | os.PathLike, *, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a model directory (or, with ``allow_pickle``, the .bin files)."""
    directory = Path(directory)
    files = _shards(directory, "model.safetensors.index.json", "model.safetensors")
    if files:
        return files
    pickled = _shards(directory, "pytorch_model.bin.index.json", "pytorch_model.bin")
    if pickled:
        if not allow_pickle:
            raise HFImportError(
                f"{str(directory)!r} has only pytorch_model.bin (a pickle, which can run code when "
                "loaded) and no model.safetensors. Convert it to safetensors where torch is "
                "installed (`from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`), "
                "and set config.model.pretrained to that directory (ftlab's training never unpickles "
                "weights; from Python, load_pretrained(..., allow_pickle=True) reads a file you trust)."
            )
        return pickled
    raise HFImportError(
        f"{str(directory)!r} has no weights: expected model.safetensors, "
        "model.safetensors.index.json (sharded) or pytorch_model.bin"
    )


def iter_tensors(
    directory: str | os.PathLike, *, allow_pickle: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) for every tensor of a model directory, one at a time."""
    return _read_files(weight_files(directory, allow_pickle=allow_pickle))


def _read_files(files: Sequence[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="numpy") as f:
                    names = f.keys()  # a safe_open handle is not iterable
                    for name in names:
                        yield name, f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 (safetensors' SafetensorError, OSError)
                raise HFImportError(
                    f"{str(file)!r} cannot be read as safetensors ({type(e).__name__}: {e}); "
                    "the file is truncated or damaged: download or export it again"
                ) from None
        else:
            yield from _torch_tensors(file)


def _torch_tensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise HFImportError(
            f"{str(file)!r} is a PyTorch pickle; reading it needs torch, which is not installed "
            "(install torch, or convert the checkpoint to safetensors elsewhere)"
        ) from None
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    for name, value in state.items():
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        yield name, value.numpy()


# -- converting -----------------------------------------------------------------------------


@dataclasses.dataclass
class Pretrained:
    """An imported model: the module, its plain (unboxed) variables, and provenance.

    ``variables`` holds every collection (``{"params": ...}``, plus e.g. ``batch_stats`` for
    families that have them); ``params`` is ``variables["params"]``. ``notes`` lists the heads
    dropped and the leaves initialised fresh.
    """

    model: nn.Module
    variables: dict[str, Any]
    config: Any
    hf_config: dict[str, Any]
    path: Path
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return self.variables["params"]


def abstract_variables(model: nn.Module, inputs: Any) -> dict[str, Any]:
    """The model's variables (all collections) as boxed ``ShapeDtypeStruct``s (logical axes
    kept; ``nn.get_partition_spec`` reads them)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))


def _qualified(path: str, collections: Sequence[str]) -> str:
    """``"h_0/ln_1/scale"`` -> ``"params/h_0/ln_1/scale"``; other collections keep their name."""
    first = path.split("/", 1)[0]
    return path if first in collections and first != "params" else f"params/{path}"


def _shown(path: str) -> str:
    return path.removeprefix("params/")


def convert_tensors(
    family: Family,
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    expected: Mapping[str, Any],
    *,
    param_dtype: Any = jnp.float32,
) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Convert HF tensors into flat ftlab leaves checked against ``expected``.

    ``expected``: flat ``{"collection/path": array or ShapeDtypeStruct}`` of the model's
    variables (``"params/h_0/ln_1/scale"``). Returns (leaves keyed the same way, missing keys
    that ``family.fresh`` allows, notes). Raises ``HFImportError`` naming the tensor for unknown
    names, unexpected leaves and shape mismatch, and naming the leaves for missing ones.
    """
    if isinstance(tensors, Mapping):
        tensors = iter(tensors.items())
    leaves: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    notes: list[str] = []
    unknown: list[str] = []
    for name, array in tensors:
        converted, known = family.convert(name, np.asarray(array))
        if not known:
            unknown.append(name)
            continue
        for short, value in converted.items():
            path = _qualified(short, family.collections)
            short = _shown(path)
            if path not in expected:
                if any(re.fullmatch(p, short) for p in family.droppable):
                    notes.append(f"dropped {name!r} ({short}): the model has no such head")
                    continue
                raise HFImportError(
                    f"tensor {name!r} maps to {short!r}, which this {family.model_type} model "
                    "(as config.json describes it) does not have"
                )
            want = tuple(expected[path].shape)
            if tuple(value.shape) != want:
                raise HFImportError(
                    f"tensor {name!r} -> {short!r}: checkpoint shape {tuple(value.shape)} but the "
                    f"model built from config.json expects {want}"
                )
            if path in leaves:
                raise HFImportError(
                    f"tensor {name!r} -> {short!r}: {source[path]!r} already set it"
                )
            leaves[path] = np.asarray(value, dtype=param_dtype)
            source[path] = name
    if unknown:
        raise HFImportError(
            f"unknown tensor(s) for a {family.model_type} checkpoint: "
            f"{', '.join(repr(n) for n in unknown[:10])}{', ...' if len(unknown) > 10 else ''}"
        )
    missing = sorted(set(expected) - set(leaves))
    fresh = [p for p in missing if any(re.fullmatch(r, _shown(p)) for r in family.fresh)]
    hard = [_shown(p) for p in missing if p not in fresh]
    if hard:
        raise HFImportError(
            f"the checkpoint lacks {len(hard)} parameter(s) the model needs: "
            f"{', '.join(hard[:10])}{', ...' if len(hard) > 10 else ''}"
        )
    notes += [f"initialised {_shown(p)} fresh (not in the checkpoint)" for p in fresh]
    return leaves, fresh, notes


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    head: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    rng: jax.Array | None = None,
    **config_overrides: Any,
) -> Pretrained:
    """Import a Hugging Face model directory (or hub id) as an ftlab model and parameters.

    ``head``: ``"lm"``, ``"classifier"`` or ``"none"``; by default read from the config's
    ``architectures``. A classifier built from an LM checkpoint gets a fresh ``score`` head
    (from ``rng``). ``config_overrides`` (e.g. ``num_labels=3``, ``embd_pdrop=0.0``) replace
    fields of the family's config.
    """
    directory = resolve(name_or_path, revision=revision, allow_pickle=allow_pickle)
    hf_config = read_config(directory)
    model_type = hf_config.get("model_type")
    if not model_type:
        raise HFImportError(f"{directory / 'config.json'} has no model_type")
    family = get_family(model_type)
    files = weight_files(directory, allow_pickle=allow_pickle)  # refuse early, before building
    config = family.config_from_hf(hf_config, **config_overrides)
    if head is None:
        archs = [family.head_of(a) for a in hf_config.get("architectures") or ()]
        head = next((h for h in archs if h), family.default_head)
    model = family.build(config, head=head, dtype=dtype, param_dtype=param_dtype, remat=remat)
    variables, notes = model_variables(
        family, model, family.example_inputs(), _read_files(files), rng, param_dtype=param_dtype
    )
    return Pretrained(model, variables, config, hf_config, directory, notes)


def model_variables(
    family: Family,
    model: nn.Module,
    inputs: Any,
    tensors: Iterator[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    rng: jax.Array | None = None,
    *,
    param_dtype: Any = jnp.float32,
) -> tuple[dict[str, Any], list[str]]:
    """``model``'s variables from checkpoint ``tensors``; leaves the family may lack (a new
    head) are initialised from ``rng``. Returns (variables, notes)."""
    expected = tree.flatten(nn.meta.unbox(abstract_variables(model, inputs)))
    leaves, fresh, notes = convert_tensors(family, tensors, expected, param_dtype=param_dtype)
    variables = {path: jnp.asarray(value) for path, value in leaves.items()}
    if fresh:
        rng = jax.random.key(0) if rng is None else rng

        def init_fresh(key):  # under jit, leaves not returned are never computed
            flat = tree.flatten(nn.meta.unbox(model.init(key, inputs)))
            return {p: flat[p] for p in fresh}

        variables.update(jax.jit(init_fresh)(rng))
    return tree.unflatten(variables), notes
