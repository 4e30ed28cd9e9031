"""Memory planner: per-device bytes of a train step for a target, without any weight.

``ftlab plan CONFIG [--target tpu-v5e-8|gpu-h100x8|...]`` compiles the config's real train
step ahead of time: for the host (default), or for a TPU topology through libtpu's
compile-only devices (``jax.experimental.topologies``, works on a CPU-only machine), or for
GPUs through the CUDA plugin's topology when it is installed. Parameters, gradients,
optimizer state and the batch are counted from shapes and shardings (``jax.eval_shape``);
the step's peak comes from XLA's memory analysis of the compiled step (arguments + outputs
- aliased + temporaries), FLOPs from its cost analysis. Neither the dataset nor weights are
needed: the model's shapes come from ``model.hf_config``, a local pretrained directory's
``config.json`` or the built-in shapes of the recipes' hub models, the batch is synthesised
from the configured shape.

The planner sits above the training code it compiles (it imports ``ftlab.train``; nothing
in ``ftlab.train`` or ``ftlab.parallel`` imports it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections as mc
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab.config import ConfigError
from ftlab.train.state import TrainState

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s (or arrays)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def parse_bytes(text: str | int) -> int:
    """``"80GB"``, ``"16GiB"``, ``"512M"`` or a plain number -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"device memory {text!r}: expected a size such as 80GB or 16GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def local_device_memory() -> int | None:
    """The first local device's memory limit, when the backend reports one (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _fmt(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


# -- targets ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for: ``platform`` (``host``, ``tpu``, ``gpu``), its device count
    and memory per device, and how to get compile-only devices for it."""

    name: str
    platform: str
    devices: int
    memory: int | None  # bytes per device
    hosts: int = 1
    topology: str = ""  # TPU: libtpu's topology name; GPU: the XLA target-config spec
    options: tuple = ()  # extra keyword arguments of get_topology_desc

    @property
    def describe(self) -> str:
        hosts = f", {self.hosts} hosts" if self.hosts > 1 else ""
        mem = f", {_fmt(self.memory)} each" if self.memory else ""
        return f"{self.name} ({self.devices} devices{hosts}{mem})"


GiB = 2**30


def _tpu(name, topology, devices, memory_gib, hosts=1, **options) -> Target:
    return Target(name, "tpu", devices, memory_gib * GiB, hosts, topology, tuple(options.items()))


def _gpu(name, spec, devices, memory_gib) -> Target:
    return Target(name, "gpu", devices, memory_gib * GiB, 1, spec)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        # Colab's one-chip runtimes, single-host slices, a multi-host v4 pod slice
        _tpu("tpu-v5e-1", "v5e:1x1", 1, 16, chips_per_host_bounds=(1, 1, 1)),
        _tpu("tpu-v5e-4", "v5e:2x2", 4, 16, chips_per_host_bounds=(2, 2, 1)),
        _tpu("tpu-v5e-8", "v5e:2x4", 8, 16, chips_per_host_bounds=(2, 4, 1)),
        _tpu("tpu-v5e-16", "v5e:4x4", 16, 16, hosts=2, chips_per_host_bounds=(2, 4, 1)),
        _tpu("tpu-v6e-1", "v6e:1x1", 1, 32, chips_per_host_bounds=(1, 1, 1)),
        _tpu("tpu-v6e-8", "v6e:2x4", 8, 32, chips_per_host_bounds=(2, 4, 1)),
        _tpu("tpu-v4-8", "v4:2x2x1", 4, 32, chip_config_name="megacore"),
        _tpu("tpu-v4-32", "v4:2x2x4", 16, 32, hosts=4, chip_config_name="megacore"),
        _tpu("tpu-v5p-8", "v5p:2x2x1", 4, 95, chip_config_name="megacore"),
        _tpu("tpu-v5p-32", "v5p:2x2x4", 16, 95, hosts=4, chip_config_name="megacore"),
        _gpu("gpu-h100", "h100_sxm", 1, 80),
        _gpu("gpu-h100x8", "h100_sxm", 8, 80),
        _gpu("gpu-h200", "h200", 1, 141),
        _gpu("gpu-h200x8", "h200", 8, 141),
        _gpu("gpu-a100-80gb", "a100_sxm_80", 1, 80),
        _gpu("gpu-a100-80gbx8", "a100_sxm_80", 8, 80),
    )
}
# the topologies the README's launch commands name
README_TARGETS = ("tpu-v5e-1", "tpu-v6e-1", "tpu-v5e-8", "tpu-v4-32", "gpu-a100-80gb", "gpu-h100x8")


class PlannerSetupError(ConfigError):
    """What to install to plan for a target (libtpu, the CUDA plugin)."""


def get_target(name: str | None) -> Target:
    """``None``/``host``: this machine's devices; else a name from ``TARGETS``."""
    if name in (None, "", "host"):
        mem = local_device_memory()
        return Target("host", "host", jax.device_count(), mem, jax.process_count())
    if name not in TARGETS:
        import difflib

        near = difflib.get_close_matches(name, TARGETS, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(
            f"--target {name!r} is unknown{hint}; targets: host, {', '.join(TARGETS)}"
        )
    return TARGETS[name]


def target_devices(target: Target) -> list:
    """Compile-only devices of ``target`` (every device of every host of the slice)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise PlannerSetupError(
                f'planning for {target.name} needs libtpu: pip install "jax[tpu]=={jax.__version__}" '
                '(or pip install -e ".[tpu-plan]")'
            ) from None
        # compile-only: no chip is opened, so another process holding libtpu's lock is fine
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        desc = topologies.get_topology_desc(
            topology_name=target.topology, platform="tpu", **dict(target.options)
        )
        devices = list(desc.devices)
    else:
        devices = _gpu_devices(target)
    if len(devices) != target.devices:
        raise RuntimeError(f"{target.name}: expected {target.devices} devices, got {len(devices)}")
    return devices


# XLA's GpuTargetConfigProto needs a device description; these are the public numbers of
# each GPU (SMs, compute capability, memory, shared memory, L2, bandwidth, clock), the
# fields XLA's own specs (xla/backends/gpu/target_config/specs) give
_GPUS = {
    "h100_sxm": (
        "NVIDIA H100 80GB HBM3",
        132,
        (9, 0),
        84_942_979_072,
        233_472,
        232_448,
        52_428_800,
        3_352_320_000_000,
        1.98,
    ),
    "h200": (
        "NVIDIA H200",
        132,
        (9, 0),
        150_754_820_096,
        233_472,
        232_448,
        62_914_560,
        4_800_000_000_000,
        1.98,
    ),
    "a100_sxm_80": (
        "NVIDIA A100-SXM4-80GB",
        108,
        (8, 0),
        85_198_045_184,
        167_936,
        166_912,
        41_943_040,
        2_039_000_000_000,
        1.41,
    ),
}


def gpu_target_config(spec: str) -> str:
    """A ``GpuTargetConfigProto`` (text format) for the GPU ``spec`` names."""
    name, sms, (major, minor), memory, smem_core, smem_optin, l2, bandwidth, ghz = _GPUS[spec]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {ghz}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
}}
device_description_str: "{name}"
"""


def _gpu_devices(target: Target) -> list:
    """Compile-only CUDA devices: the CUDA plugin's topology for ``target``'s GPUs
    (``FTLAB_GPU_TARGET_CONFIG`` may name another ``GpuTargetConfigProto`` text file)."""
    from jax.experimental import topologies

    spec = os.environ.get("FTLAB_GPU_TARGET_CONFIG", "")
    text = Path(spec).read_text() if spec else gpu_target_config(target.topology)
    try:
        desc = topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{target.devices}", target_config=text
        )
    except (NotImplementedError, RuntimeError) as e:
        raise PlannerSetupError(
            f"planning for {target.name} needs the CUDA plugin (no GPU needed): pip install "
            f'"jax[cuda13-local]=={jax.__version__}" (or pip install -e ".[gpu-plan]") ({e})'
        ) from None
    return list(desc.devices)


# -- the plan -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one train step on a mesh.

    ``compiled`` holds XLA's memory analysis (``argument``, ``output``, ``alias``, ``temp``,
    ``code``) when the step was compiled; ``temp`` covers activations, gradients and
    workspace, so ``activations`` is ``temp`` less the gradients (estimated from shapes).
    """

    mesh: dict[str, int]
    parameters: int  # trained + frozen base weights + method-owned leaves (LoRA factors)
    trainable: int
    gradients: int  # one per trainable leaf, sharded like it
    optimizer: int
    model_state: int
    batch: int
    compiled: dict[str, int] | None = None
    flops: float | None = None  # per device, XLA's cost analysis (where the backend gives it)
    target: str = "host"
    compile_s: float | None = None
    teacher: int = 0  # a distillation teacher's frozen variables, resident beside the state
    teacher_source: str = ""

    @property
    def activations(self) -> int | None:
        if self.compiled is None:
            return None
        return max(self.compiled["temp"] - self.gradients, 0)

    @property
    def total(self) -> int:
        """Peak estimate: the compiled step's live buffers (arguments + outputs - aliased +
        temporaries), else the sum of the parts known from shapes."""
        if self.compiled is not None:
            c = self.compiled
            return c["argument"] + c["output"] - c["alias"] + c["temp"]
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.model_state
            + self.batch
            + self.teacher
        )

    def fits(self, device_memory: int) -> bool:
        return self.total <= device_memory

    def table(self, device_memory: int | None = None) -> str:
        mesh = " x ".join(f"{a}={n}" for a, n in self.mesh.items())
        rows = [
            ("parameters", self.parameters),
            ("  of which trainable", self.trainable),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("model state", self.model_state),
            *([("teacher parameters (frozen)", self.teacher)] if self.teacher_source else []),
            ("batch", self.batch),
            ("activations + workspace", self.activations),
            ("total (peak)" if self.compiled else "total (without activations)", self.total),
        ]
        lines = [f"per-device memory on mesh {mesh}:"]
        lines += [f"  {name:<28}{_fmt(n):>14}" for name, n in rows]
        if self.teacher_source:
            lines.insert(1, f"  distillation teacher: {self.teacher_source} (forward only)")
        if self.flops:
            lines.append(f"  {'FLOPs per step':<28}{_fmt_flops(self.flops):>14}")
        if device_memory is not None:
            verdict = "fits" if self.fits(device_memory) else "does NOT fit"
            if self.compiled is None:
                verdict += " (activations not counted)"
            lines.append(
                f"  {verdict} in {_fmt(device_memory)} per device "
                f"({100.0 * self.total / device_memory:.1f}% used)"
            )
        return "\n".join(lines)


def _fmt_flops(n: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def _memory(compiled) -> dict[str, int] | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "code": int(stats.generated_code_size_in_bytes),
    }


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError, ValueError):  # not every backend gives one
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def plan_step(
    train_step: Callable,
    state: TrainState,
    batch: Any,
    *,
    compile: bool = True,
    target: str = "host",
    rng_partitionable: bool | None = None,
    teacher: Any = None,
    teacher_source: str = "",
) -> MemoryPlan:
    """Plan ``train_step`` on ``state`` and ``batch``: trees of ``ShapeDtypeStruct``s that
    carry their shardings (``shard.with_shardings``). With ``compile`` the step is lowered and
    compiled as the trainer would run it (state donated) for XLA's memory analysis; the mesh
    may be one of compile-only devices (another machine's topology). ``teacher``: a
    distillation teacher's variables (sharded ``ShapeDtypeStruct``s), the step's third
    argument (``train_step(state, batch, teacher)``), counted apart as ``teacher``."""
    shardings = jax.tree.map(lambda s: s.sharding, state)
    mesh = jax.tree.leaves(shardings)[0].mesh
    compiled = flops = seconds = None
    if compile:
        start = time.perf_counter()
        batch_sharding = jax.tree.map(lambda s: s.sharding, batch)
        rng = (
            contextlib.nullcontext()
            if rng_partitionable is None
            else jax.threefry_partitionable(rng_partitionable)
        )
        with warnings.catch_warnings(), rng:
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            args, in_shardings = (state, batch), (shardings, batch_sharding)
            if teacher is not None:
                args += (teacher,)
                in_shardings += (jax.tree.map(lambda s: s.sharding, teacher),)
            executable = (
                jax.jit(
                    train_step,
                    in_shardings=in_shardings,
                    out_shardings=(shardings, NamedSharding(mesh, P())),
                    donate_argnums=0,
                )
                .lower(*args)
                .compile()
            )
        seconds = time.perf_counter() - start
        compiled, flops = _memory(executable), _flops(executable)
    trainable = device_bytes(state.trainable)
    return MemoryPlan(
        mesh=dict(mesh.shape),
        parameters=trainable + device_bytes(state.frozen),
        trainable=trainable,
        gradients=trainable,
        optimizer=device_bytes(state.opt_state),
        model_state=device_bytes(state.model_state),
        batch=device_bytes(batch),
        compiled=compiled,
        flops=flops,
        target=target,
        compile_s=seconds,
        teacher=device_bytes(teacher) if teacher is not None else 0,
        teacher_source=teacher_source if teacher is not None else "",
    )


# -- shapes without data or weights -------------------------------------------------------

# config.json fields of the recipes' hub models: their shapes, so a plan needs no download
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
    },
    "gpt2-medium": {
        "model_type": "gpt2",
        "vocab_size": 50257,
        "n_positions": 1024,
        "n_embd": 1024,
        "n_layer": 24,
        "n_head": 16,
    },
    "huggyllama/llama-7b": {
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
    },
    "bert-base-uncased": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "google/vit-base-patch16-224-in21k": {
        "model_type": "vit",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "image_size": 224,
        "patch_size": 16,
        "num_channels": 3,
    },
    "microsoft/resnet-50": {
        "model_type": "resnet",
        "embedding_size": 64,
        "hidden_sizes": [256, 512, 1024, 2048],
        "depths": [3, 4, 6, 3],
        "layer_type": "bottleneck",
        "num_channels": 3,
    },
    "google/efficientnet-b0": {
        "model_type": "efficientnet",
        "width_coefficient": 1.0,
        "depth_coefficient": 1.0,
        "image_size": 224,
        "hidden_dim": 1280,
        "dropout_rate": 0.2,
        "num_channels": 3,
    },
}
KNOWN_CLASSES = {
    "cifar10": 10,
    "cifar100": 100,
    "stanfordnlp/sst2": 2,
    "glue/sst2": 2,
    "sst2": 2,
    "mnist": 10,
    "digits": 10,
}


def shapes_config(cfg: mc.ConfigDict) -> mc.ConfigDict:
    """A copy of ``cfg`` whose model needs no download: a pretrained hub id becomes its
    ``config.json`` fields in ``model.hf_config`` (a local directory is read as is)."""
    from ftlab.config import override_copy

    shapes = model_shapes(cfg.model)
    if shapes is cfg.model:
        return cfg
    c = override_copy(cfg, {"model.pretrained": ""})
    with c.unlocked():
        c.model.hf_config = shapes.hf_config.to_dict()
    return c


def model_shapes(model: mc.ConfigDict, key: str = "config.model") -> mc.ConfigDict:
    """``model`` (a ``config.model``) itself, or a copy whose pretrained hub id is replaced by
    its built-in ``config.json`` fields in ``hf_config``."""
    if model.name != "hf" or not model.pretrained:
        return model
    if (Path(model.pretrained).expanduser() / "config.json").is_file():
        return model
    extra = model.hf_config.to_dict() if isinstance(model.hf_config, mc.ConfigDict) else {}
    known = KNOWN_MODELS.get(model.pretrained)
    if known is None:
        raise ConfigError(
            f"{key}.pretrained: {model.pretrained!r} is not a local directory with a "
            "config.json and its shapes are not built in; point it at a local copy, or give the "
            f"whole config.json in --{key}.hf_config (with model_type)"
        )
    c = mc.ConfigDict(model.to_dict())
    c.pretrained = ""
    c.hf_config = {**known, **extra}
    return c


def _task(cfg, model_type: str | None) -> str:
    from ftlab.interop.build import DECODERS, SEQ2SEQ

    if cfg.data.task != "auto":
        return cfg.data.task
    if model_type in SEQ2SEQ:
        return "seq2seq"
    return "causal_lm" if model_type in DECODERS else "classification"


def _seq2seq_split(cfg: mc.ConfigDict, hf: dict):
    """Zero rows of an encoder-decoder's training batch: the encoder's inputs (T5: token ids
    of ``data.max_length`` and their mask; Whisper: log-mel ``input_features`` (n, mel bins,
    frames), ``data.audio.num_frames`` or the model's window of ``2 x max_source_positions``),
    the decoder's inputs and mask and the labels (``data.max_length`` tokens)."""
    from ftlab.data import Split

    n, length = cfg.train.batch_size, cfg.data.max_length
    decoder = np.zeros((n, length), np.int32)
    inputs: dict[str, np.ndarray] = {}
    if hf["model_type"] == "whisper":
        frames = int(_get(cfg, "data.audio.num_frames", 0) or 0)
        frames = frames or 2 * int(hf.get("max_source_positions", 1500))
        mels = int(hf.get("num_mel_bins", 80))
        inputs["input_features"] = np.zeros((n, mels, frames), np.float32)
    else:
        inputs["input_ids"] = np.zeros((n, length), np.int32)
        inputs["attention_mask"] = np.ones((n, length), np.int32)
    inputs["decoder_input_ids"] = decoder
    inputs["decoder_attention_mask"] = np.ones_like(decoder)
    return Split(inputs, decoder.copy(), np.full(n, float(length), np.float32))


def synthetic_data(cfg: mc.ConfigDict):
    """A ``Dataset`` of ``train.batch_size`` zero rows shaped like the configured data (token
    ids of ``data.max_length``, images of ``data.clean.image_size``, an encoder-decoder's
    source and target: ``_seq2seq_split``), or ``None`` when the
    inputs' shape cannot be told from the config (a small offline dataset is loaded then)."""
    from ftlab.data import Dataset, Split
    from ftlab.interop.build import hf_config

    if cfg.model.name != "hf":
        return None
    hf = hf_config(cfg.model)
    kind = hf["model_type"]
    task = _task(cfg, kind)
    n, length = cfg.train.batch_size, cfg.data.max_length
    if task == "causal_lm":
        ids = np.zeros((n, length), np.int32)
        split = Split(ids, ids.copy(), np.ones(n, np.float32))
        outputs = 0
    elif task == "seq2seq":  # encoder-decoders (T5, Whisper)
        split = _seq2seq_split(cfg, hf)
        outputs = 0
    else:
        if kind in ("vit", "resnet", "efficientnet"):
            size = tuple(cfg.data.clean.image_size) or (hf.get("image_size", 224),) * 2
            inputs = np.zeros((n, *size, hf.get("num_channels", 3)), np.float32)
        else:
            ids = np.zeros((n, length), np.int32)
            inputs = {"attention_mask": np.ones_like(ids), "input_ids": ids}
        name = str(cfg.data.name)
        outputs = len(cfg.data.classes) or KNOWN_CLASSES.get(
            name, KNOWN_CLASSES.get(name.rsplit("/", 1)[-1], 2)
        )
        if task == "regression":
            outputs = 1
        labels = np.zeros(n, np.float32 if task == "regression" else np.int32)
        split = Split(inputs, labels)
    names = [str(i) for i in range(outputs)] if task == "classification" else []
    return Dataset(split, split, split, task, outputs, names)


# -- a config's plan ----------------------------------------------------------------------


def _get(cfg, dotted: str, default=None):
    node = cfg
    for key in dotted.split("."):
        if key not in node:
            return default
        node = node[key]
    return node


def _mesh_shape(cfg) -> dict | None:
    mesh_cfg = cfg.get("mesh")
    shape = mesh_cfg.get("shape") if mesh_cfg is not None else None
    return shape.to_dict() if hasattr(shape, "to_dict") else shape


def check_config(cfg: mc.ConfigDict, devices: int) -> None:
    """Batch, accumulation and mesh divisibility on ``devices`` devices (no compile), with the
    fix in the message."""
    from ftlab.parallel import mesh as mesh_lib
    from ftlab.parallel import shard

    shape = mesh_lib.resolve_shape(_mesh_shape(cfg), devices)
    try:
        shard.check_batch(cfg.train.batch_size, shape, cfg.optim.accum_steps)
    except ConfigError as e:
        fix = batch_fix(cfg.train.batch_size, cfg.optim.accum_steps, shape)
        raise ConfigError(f"{e}{fix}") from None
    shard.check_batch(cfg.train.eval_batch_size, shape, key="config.train.eval_batch_size")


def batch_fix(batch_size: int, accum: int, shape: dict[str, int]) -> str:
    """``"; set config.optim.accum_steps to 4 or ..."``: what makes the batch split."""
    shards = shape.get("data", 1) * shape.get("fsdp", 1)
    fixes = []
    ok = [a for a in range(accum, 0, -1) if batch_size % a == 0 and (batch_size // a) % shards == 0]
    if ok:
        fixes.append(f"config.optim.accum_steps to {ok[0]}")
    if shape.get("fsdp", 1) > 1:
        micro = batch_size // accum if batch_size % accum == 0 else 0
        fsdp = [
            f
            for f in range(shape["fsdp"] - 1, 0, -1)
            if micro and shape["fsdp"] % f == 0 and micro % (f * shape.get("data", 1)) == 0
        ]
        if fsdp:
            fixes.append(
                f"config.mesh.shape.fsdp to {fsdp[0]} (with config.mesh.shape.tensor="
                f"{shape['fsdp'] // fsdp[0] * shape.get('tensor', 1)})"
            )
    elif shards > 1 and batch_size % accum == 0:
        micro = batch_size // accum
        t = next(
            (t for t in range(2, shards + 1) if shards % t == 0 and micro % (shards // t) == 0),
            None,
        )
        if t:
            fixes.append(f"config.mesh.shape.tensor to {t * shape.get('tensor', 1)}")
    return "".join(f"; or set {f}" for f in fixes)


def plan_config(
    cfg,
    *,
    devices: int | None = None,
    compile: bool | None = None,
    target: str | Target | None = None,
    teacher_model: mc.ConfigDict | None = None,
) -> MemoryPlan:
    """Plan the train step of an experiment config (model, method, optimizer, batch, mesh).

    With ``config.distill.teacher`` the step runs the teacher's forward too: its variables
    (sharded like the student's, in ``method.frozen_dtype``) are an argument of the step,
    built from its config alone (its run's ``config.json``, a Hugging Face directory's, or
    ``teacher_model``: the model config of a stage not trained yet).

    ``target`` (a name of ``TARGETS``) compiles for that machine's compile-only devices;
    otherwise ``config.mesh.shape`` (default: data parallel) is laid over ``devices`` devices
    (default: all present), and a device count this machine does not have gives an abstract
    mesh: parameters, gradients and optimizer state from shapes, no compiled activations.
    Every config error (a mesh or batch that does not divide) comes before any compilation.
    """
    from ftlab.data.batches import train_batch
    from ftlab.parallel import shard
    from ftlab.parallel.mesh import make_abstract_mesh, make_mesh
    from ftlab.train import losses, optim
    from ftlab.train import step as step_lib
    from ftlab.train.loop import prepare

    tgt = target if isinstance(target, Target) else get_target(target)
    if tgt.platform != "host":
        devices = tgt.devices
        # what the trainer picks for "auto" on an accelerator
        auto = {"train.compute_dtype": "bfloat16", "method.frozen_dtype": "bfloat16"}
        auto = {k: v for k, v in auto.items() if _get(cfg, k) == "auto"}
        if auto:
            from ftlab.config import override_copy

            cfg = override_copy(cfg, auto)
    cfg = shapes_config(cfg)
    if not cfg.train.num_steps:  # epochs of the synthesised data mean nothing: one schedule
        from ftlab.config import override_copy

        cfg = override_copy(cfg, {"train.num_steps": cfg.optim.warmup_steps + 1})
    n = devices or jax.device_count()
    check_config(cfg, n)
    data = synthetic_data(cfg)
    data, model, method = prepare(cfg, devices=n, data=data)
    shape = _mesh_shape(cfg)
    real = devices is None or devices == jax.device_count() or tgt.platform != "host"
    if compile and not real:
        raise ValueError(
            f"cannot compile for {devices} devices on a machine with {jax.device_count()}; "
            "plan from shapes (compile=False) or for a --target"
        )
    if tgt.platform != "host":
        if compile is False:
            mesh = make_abstract_mesh(shape, n)
        else:
            mesh = make_mesh(shape, devices=target_devices(tgt))
    elif real:
        mesh = make_mesh(shape)
    else:
        mesh = make_abstract_mesh(shape, devices)

    sample = data.train.sample_inputs()
    variables = jax.eval_shape(model.init, jax.random.key(cfg.seed), sample)
    tx, lr = optim.optimizer(cfg.optim, max(cfg.train.num_steps, 1))
    init = shard.init_state_fn(method, tx, cfg.seed)
    loss_fn = losses.per_example_loss(cfg.train.loss, cfg.train.label_smoothing)
    teacher = None
    if cfg.distill.teacher:  # its config only: shapes, dtypes and shardings, no weights
        from ftlab.train import distill
        from ftlab.train.loop import compute_dtype

        teacher = distill.load(
            cfg,
            data,
            model,
            sample,
            mesh,
            loss_fn,
            compute_dtype(cfg.train.compute_dtype),
            tx,
            method.frozen_dtype,
            weights=False,
            model_cfg=_teacher_model_cfg(cfg, teacher_model),
        )
        init, state_sh = teacher.wrap_init(init, variables, mesh)  # + the hidden projection
        abstract = shard.abstract_state(init, variables)
    else:
        abstract = shard.abstract_state(init, variables)
        state_sh = shard.state_shardings(abstract, variables, mesh)
    state = shard.with_shardings(abstract, state_sh)
    host = train_batch(data.train, 0, cfg.train.batch_size, cfg.seed, shuffle=False)
    batch = shard.abstract_batch(host, shard.batch_sharding(mesh))
    extra = {}
    if hasattr(step_lib, "training_loss"):  # the trainer's loss (chunked cross-entropy or not)
        loss_fn, kwargs = step_lib.training_loss(cfg.train, method, loss_fn)
        extra = {"model_kwargs": kwargs} if kwargs else {}
    step = step_lib.make_train_step(
        model, method, tx, lr, loss_fn, cfg.optim.accum_steps, **extra, distill=teacher
    )
    do_compile = (real if compile is None else compile) and isinstance(mesh, jax.sharding.Mesh)
    # the trainer's random numbers: non-partitionable threefry on CPU (loop.use_fast_cpu_rng)
    partitionable = tgt.platform != "host" or jax.default_backend() != "cpu"
    try:
        return plan_step(
            step,
            state,
            batch,
            compile=do_compile,
            target=tgt.name,
            rng_partitionable=partitionable,
            teacher=None if teacher is None else teacher.variables,
            teacher_source="" if teacher is None else teacher.source,
        )
    except jax.errors.JaxRuntimeError as e:
        if tgt.platform == "host":
            raise
        first = str(e).splitlines()[0][:300]
        raise PlannerSetupError(f"XLA could not compile the step for {tgt.name}: {first}") from None


def _teacher_model_cfg(cfg: mc.ConfigDict, given: mc.ConfigDict | None) -> mc.ConfigDict | None:
    """The teacher's model config for planning: ``given`` (a stage's), else its run's saved
    ``config.json`` (a hub id replaced by its built-in shapes); None: a Hugging Face directory,
    read as training reads it."""
    if given is not None:
        return model_shapes(given, "config.distill.teacher: the teacher's model")
    from ftlab.train import distill, run_files

    path = Path(cfg.distill.teacher).expanduser()
    if distill._is_hf_dir(path):
        return None
    try:
        params_dir, _ = run_files.resolve_init(str(path))
    except ConfigError:
        return None  # a Hugging Face directory, or nothing: distill.load says which
    saved = params_dir.parent / "config.json"
    if not saved.is_file():
        return None
    import json

    model = mc.ConfigDict(json.loads(saved.read_text())["model"])
    return model_shapes(model, "config.distill.teacher: the teacher's model")


def runs(cfg: mc.ConfigDict, variant: str | None = None) -> list[tuple[str, mc.ConfigDict]]:
    """``[(name, run config)]``: the config itself, or each stage and variant of a multi-run
    config (``variant``: only that one)."""
    from ftlab import experiment

    planned = experiment.plan(cfg, Path("WORKDIR"))
    names = list(dict.fromkeys(p.name for p in planned))  # seeds repeat a name
    if variant and variant not in names:
        raise ConfigError(
            f"--variant {variant!r}: the config's runs are {', '.join(names) or '(single run)'}"
        )
    if len(planned) <= 1 and not variant:
        return [("", cfg)]
    stages = [n for n, _ in cfg.stages]
    out, seen = [], set()
    for p in planned:
        if (variant and p.name != variant) or p.name in seen:
            continue
        seen.add(p.name)
        out.append(
            (p.name, experiment._run_config(cfg, p.name, p.overrides, Path("WORKDIR"), stages))
        )
    return out


def suggestions(cfg: mc.ConfigDict, p: MemoryPlan, device_memory: int) -> list[str]:
    """What would make a plan that does not fit fit, largest saving first (estimates)."""
    out = []
    micro = cfg.train.batch_size // cfg.optim.accum_steps
    shards = p.mesh.get("data", 1) * p.mesh.get("fsdp", 1)
    acts = p.activations or 0
    if micro > shards and acts:
        nxt = next(
            (
                a
                for a in range(cfg.optim.accum_steps + 1, cfg.train.batch_size + 1)
                if cfg.train.batch_size % a == 0 and (cfg.train.batch_size // a) % shards == 0
            ),
            None,
        )
        if nxt:
            out.append(
                f"--config.optim.accum_steps={nxt} (micro-batch {cfg.train.batch_size // nxt}: "
                "activations shrink about in proportion)"
            )
    if not cfg.model.get("remat", False) and acts > 0.2 * p.total:
        out.append("--config.model.remat=True (recompute each block in the backward pass)")
    frozen = p.parameters - p.trainable
    if frozen > 0.2 * p.total and _get(cfg, "method.frozen_dtype", "bfloat16") != "bfloat16":
        out.append(
            f"--config.method.frozen_dtype=bfloat16 (frozen weights {_fmt(frozen)} -> {_fmt(frozen // 2)})"
        )
    devices = math.prod(p.mesh.values())
    if devices > 1 and p.mesh.get("fsdp", 1) < devices:
        out.append(
            f"--config.mesh.shape.fsdp={devices} --config.mesh.shape.data=1 (shard "
            "parameters, gradients and optimizer state over every device)"
        )
    if not out or p.parameters + p.optimizer > device_memory:
        out.append("a target with more devices or memory per device (fsdp over more chips)")
    return out


def describe(
    cfg,
    *,
    device_memory: int | None = None,
    devices: int | None = None,
    target: str | None = None,
    variant: str | None = None,
) -> tuple[str, bool | None]:
    """What ``ftlab plan`` prints, and whether every planned run fits (None: no memory size).

    ``device_memory`` defaults to the target's (or what the local accelerator reports).
    """
    tgt = get_target(target)
    if tgt.platform != "host" and devices not in (None, tgt.devices):
        raise ConfigError(f"--devices {devices}: {tgt.name} has {tgt.devices} devices")
    if device_memory is None:
        device_memory = tgt.memory if devices in (None, jax.device_count(), tgt.devices) else None
    texts, verdicts = [], []
    planned = runs(cfg, variant)
    # a stage's parameters a later run distils from: not trained yet, planned from its config
    stages = {n for n, _ in cfg.stages} if "stages" in cfg else set()
    every = dict(runs(cfg)) if variant else dict(planned)
    stage_models = {
        str(Path("WORKDIR") / n / "params"): every[n].model for n in stages if n in every
    }
    for name, run in planned:
        teacher = stage_models.get(str(run.distill.teacher)) if run.distill.teacher else None
        p = plan_config(run, devices=devices, target=tgt, teacher_model=teacher)
        where = tgt.describe
        if tgt.platform == "host" and devices not in (None, jax.device_count()):
            where = f"{devices} devices (from shapes: this machine has {jax.device_count()})"
        head = f"plan for {where}" + (f", run {name!r}" if name else "")
        if p.compile_s is not None:
            head += f" (compiled in {p.compile_s:.1f} s)"
        text = head + "\n" + p.table(device_memory)
        if device_memory is not None and not p.fits(device_memory):
            text += "\n  what might make it fit (estimates):" + "".join(
                f"\n    {s}" for s in suggestions(run, p, device_memory)
            )
        texts.append(text)
        verdicts.append(None if device_memory is None else p.fits(device_memory))
    fits = None if device_memory is None else all(verdicts)
    return "\n\n".join(texts), fits
