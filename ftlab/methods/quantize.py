"""Weight-only quantisation of kernels: int8 per output channel and 4-bit NF4 (QLoRA).

The numerics are qwix's (``qwix.quantize`` / ``qwix.dequantize``: absmax calibration, int8
rounding, NF4's 16 levels from Appendix E of Dettmers et al. 2023); this module stores the
result packed and runs it inside ftlab's layers:

- **int8**: ``qvalue`` int8 of the kernel's shape, one float32 ``scale`` per output channel
  (``scale = absmax / 127.5``, qwix's symmetric bound; ``|W - W'| <= scale / 2``).
- **nf4**: blocks of ``block`` (64) consecutive weights along the fan-in axis of each output
  channel (bitsandbytes' blocks of 64 along a PyTorch ``(out, in)`` row), one float32 absmax
  per block, each weight the nearest of the 16 NF4 levels times its block's absmax; the 4-bit
  codes are packed two per byte along the fan-in axis (``uint8``, ``ceil(in / 2) x out``), so
  a kernel costs 4 bits + 32 / 64 bits = 0.5625 bytes per weight as XLA allocates it (no
  double quantisation). A fan-in that 64 does not divide uses its largest divisor <= 64 (a
  width-32 test model: one block per column).
- **nf4 with double quantisation** (``double=True``, ``method.quantize_double``; QLoRA
  section 3): the NF4 codes are the same (chosen with the exact absmax), and the float32
  absmax of every block is itself quantised: their mean is subtracted (``offset``, one float32
  per kernel) and the rest, taken in bitsandbytes' order (each output channel's blocks in
  turn) in groups of ``DOUBLE_BLOCK`` (256), is stored as 8-bit floats (``float8_e4m3fn``
  held as their ``uint8`` bits in ``scale``, so checkpoints and safetensors store plain
  bytes) with a float32 ``scale2`` per group (the group's absmax / 448, E4M3's largest
  value). The absmax costs 8 / 64 + 32 / (64 * 256) bits per weight instead of 32 / 64: a
  kernel costs 4.127 bits = 0.5159 bytes per weight instead of 0.5625.

Kernels with more than two dims (convolutions) are quantised as their ``(fan-in, out)``
matrix. ``QuantizedArray`` keeps the kernel's shape, so ``tree.count`` counts the weights it
stands for; its ``qvalue`` and ``scale`` have the kernel's rank (2-D kernels), so they take
the kernel's logical axes (``ftlab.parallel.shard``) and shard like it.

NF4 dequantisation looks the codes up with a 16-way select instead of qwix's gather, which
XLA's TPU compiler handles badly (see ``_dequantize``); quantisation and int8 are qwix's.

In the model a quantised kernel is never stored dequantised: ``call`` (used by the LoRA
interceptor, ``ftlab.methods.lora.interceptor``) runs the layer on ``dequantize(q)`` inside a
``jax.checkpoint``, so the backward pass dequantises again instead of keeping a float copy of
every kernel alive between the forward and backward passes.

Why packing is done here rather than with qwix's ``uint4`` storage: XLA packs ``uint4`` in
memory, but Orbax/tensorstore cannot save it ("Unsupported data type: uint4") and safetensors
has no 4-bit dtype; two codes per ``uint8`` checkpoint and export as they are.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

QTYPES = ("int8", "nf4")
BLOCK = 64  # NF4 block size (QLoRA, bitsandbytes)
DOUBLE_BLOCK = 256  # double quantisation: absmax values per 8-bit float block (QLoRA)
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn

# The 16 NF4 levels (QLoRA Appendix E; bitsandbytes), as qwix holds them.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_levels() -> np.ndarray:
    """The NF4 code book qwix dequantises with (``numerics.get_nf4_buckets``), as float32."""
    from qwix._src.core import numerics

    return np.asarray(numerics.get_nf4_buckets(), np.float32)


@flax.struct.dataclass
class QuantizedArray:
    """A kernel stored quantised: ``qvalue`` (int8, or uint8 holding two NF4 codes), ``scale``
    (float32; double-quantised NF4: the uint8 bits of 8-bit floats, with ``scale2`` and
    ``offset``) and the kernel's own ``shape``; ``dequantize`` gives the kernel back."""

    qvalue: jax.Array
    scale: jax.Array
    qtype: str = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    scale2: jax.Array | None = None  # double quantisation: float32 per group of 256 absmax
    offset: jax.Array | None = None  # double quantisation: the mean absmax, float32 ()

    @property
    def double(self) -> bool:
        return self.scale2 is not None

    @property
    def dtype(self):  # what it dequantises to
        return jnp.dtype(jnp.float32)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (packed codes + scales)."""
        arrays = [a for a in (self.qvalue, self.scale, self.scale2, self.offset) if a is not None]
        return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def block_size(fan_in: int, block: int = BLOCK) -> int:
    """``block`` when it divides ``fan_in``, else the largest divisor of ``fan_in`` <= ``block``."""
    if fan_in % block == 0:
        return block
    return max(d for d in range(1, min(block, fan_in) + 1) if fan_in % d == 0)


def _matrix(w: jax.Array) -> jax.Array:
    """A kernel as its (fan-in, out) matrix."""
    return w.reshape(-1, w.shape[-1])


def pack_nibbles(codes: jax.Array) -> jax.Array:
    """(n, m) codes 0..15 -> (ceil(n / 2), m) uint8: row 2i in the low, 2i + 1 in the high nibble."""
    codes = jnp.asarray(codes).astype(jnp.uint8)
    if codes.shape[0] % 2:
        codes = jnp.concatenate([codes, jnp.zeros((1, *codes.shape[1:]), jnp.uint8)])
    return codes[0::2] | (codes[1::2] << 4)


def unpack_nibbles(packed: jax.Array, rows: int) -> jax.Array:
    """The inverse of ``pack_nibbles``: (ceil(rows / 2), m) uint8 -> (rows, m) uint8 codes."""
    low, high = packed & 0xF, packed >> 4
    codes = jnp.stack([low, high], axis=1).reshape(-1, *packed.shape[1:])
    return codes[:rows]


def quantize(w: jax.Array, qtype: str, block: int = BLOCK, double: bool = False) -> QuantizedArray:
    """``w`` (a kernel, >= 2 dims) quantised by qwix and packed (see the module docstring);
    ``double`` (NF4 only) quantises the blocks' absmax too."""
    if qtype not in QTYPES:
        raise ValueError(f"quantisation {qtype!r}: choose one of {', '.join(QTYPES)}")
    if np.ndim(w) < 2:
        raise ValueError(f"only kernels (>= 2 dims) are quantised, got shape {np.shape(w)}")
    if double and qtype != "nf4":
        raise ValueError(f"double quantisation applies to nf4, not {qtype}")
    q = _quantize(jnp.asarray(w, jnp.float32), qtype, block)
    return double_quantize(q) if double else q


@jax.jit
def _double(scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(blocks, out) float32 absmax -> (8-bit float bits (blocks, out) uint8, float32 scale per
    group of ``DOUBLE_BLOCK``, float32 mean)."""
    offset = jnp.mean(scale)
    flat = (scale - offset).T.reshape(-1)  # bitsandbytes' order: each channel's blocks
    n = flat.shape[0]
    groups = -(-n // DOUBLE_BLOCK)
    padded = jnp.pad(flat, (0, groups * DOUBLE_BLOCK - n)).reshape(groups, DOUBLE_BLOCK)
    scale2 = jnp.max(jnp.abs(padded), axis=1) / E4M3_MAX
    safe = jnp.where(scale2 > 0, scale2, 1.0)
    codes = (padded / safe[:, None]).astype(jnp.float8_e4m3fn)
    bits = jax.lax.bitcast_convert_type(codes, jnp.uint8).reshape(-1)[:n]
    return bits.reshape(scale.shape[::-1]).T, scale2, offset


def double_quantize(q: QuantizedArray) -> QuantizedArray:
    """An NF4 ``q`` with its float32 absmax quantised to 8-bit floats (see the module doc)."""
    if q.qtype != "nf4" or q.double:
        raise ValueError("double quantisation applies once, to an nf4 kernel")
    bits, scale2, offset = _double(q.scale)
    return q.replace(scale=bits, scale2=scale2, offset=offset)


def absmax(q: QuantizedArray) -> jax.Array:
    """``q``'s float32 scales (the int8 step, NF4's block absmax; double-quantised: decoded)."""
    if not q.double:
        return q.scale
    codes = jax.lax.bitcast_convert_type(q.scale.T.reshape(-1), jnp.float8_e4m3fn)
    n = codes.shape[0]
    group = jnp.repeat(q.scale2, DOUBLE_BLOCK)[:n]
    values = codes.astype(jnp.float32) * group + q.offset
    return values.reshape(q.scale.shape[::-1]).T


@functools.partial(jax.jit, static_argnames=("qtype", "block"))
def _quantize(w: jax.Array, qtype: str, block: int) -> QuantizedArray:
    import qwix

    m = _matrix(w)
    if qtype == "int8":
        q = qwix.quantize(m, jnp.int8, channelwise_axes=(1,))
        return QuantizedArray(q.qvalue, q.scale, "int8", tuple(w.shape))
    q = qwix.quantize(
        m, "nf4", channelwise_axes=(1,), tiled_axes={0: block_size(m.shape[0], block)}
    )
    return QuantizedArray(pack_nibbles(q.qvalue), q.scale, "nf4", tuple(w.shape))


def dequantize(q: QuantizedArray, dtype: Any = jnp.float32) -> jax.Array:
    """The kernel ``q`` stands for, in ``dtype`` (qwix's dequantisation: codes x scale)."""
    return _dequantize(q, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q: QuantizedArray, dtype: Any) -> jax.Array:
    import qwix

    scale = absmax(q).astype(dtype)
    if q.qtype == "int8":
        return qwix.dequantize(qwix.QArray(q.qvalue, scale, None, jnp.int8)).reshape(q.shape)
    # NF4: the code book looked up with a 16-way select, then times each block's absmax. Not
    # qwix.dequantize: its lookup (a gather over every code) took 396 s and 602 MiB of
    # temporaries to compile for one 4096 x 11008 kernel on a TPU v5e target, against 14 s
    # and 172 MiB for this; the values are the same (tests/test_qlora.py checks them bitwise).
    rows = math.prod(q.shape[:-1])
    codes = unpack_nibbles(q.qvalue, rows).astype(jnp.int32)
    levels = [jnp.full(codes.shape, np.float32(v), dtype) for v in NF4_LEVELS]
    values = jax.lax.select_n(codes, *levels)
    blocks = scale.shape[0]
    values = values.reshape(blocks, rows // blocks, -1) * scale[:, None, :]
    return values.reshape(q.shape)


def error_bound(q: QuantizedArray) -> jax.Array:
    """The largest ``|W - dequantize(q)|`` rounding to nearest allows, per weight (the kernel's
    (fan-in, out) matrix): half a step (``scale / 2``) for int8; for NF4 half the largest gap
    between neighbouring levels times the block's absmax."""
    rows = math.prod(q.shape[:-1])
    if q.qtype == "int8":
        half = q.scale / 2
    elif q.double:  # the codes were chosen with the exact absmax: add what decoding it moved
        raise ValueError("error_bound: a double-quantised kernel has no per-weight bound here")
    else:
        half = q.scale * (float(np.max(np.diff(nf4_levels()))) / 2)
    return jnp.repeat(half, rows // half.shape[0], axis=0)


# -- trees --------------------------------------------------------------------------------------


def quantize_flat(
    flat: Mapping[str, Any], paths, qtype: str, block: int = BLOCK, double: bool = False
) -> dict:
    """``flat`` with the leaves at ``paths`` quantised."""
    chosen = set(paths)
    return {p: quantize(v, qtype, block, double) if p in chosen else v for p, v in flat.items()}


def dequantize_flat(flat: Mapping[str, Any], dtype: Any = jnp.float32) -> dict:
    """``flat`` with every quantised leaf dequantised."""
    return {p: dequantize(v, dtype) if is_quantized(v) else v for p, v in flat.items()}


def kernel_paths(flat: Mapping[str, Any]) -> list[str]:
    """Leaves a weight-only quantisation applies to: kernels (named ``kernel``, >= 2 dims)."""
    return [p for p, v in flat.items() if p.rsplit("/", 1)[-1] == "kernel" and np.ndim(v) >= 2]


# -- inside the model ---------------------------------------------------------------------------


def quantized_kernel(module: Any) -> QuantizedArray | None:
    """The bound ``module``'s own ``params/kernel`` when it is stored quantised, else None."""
    if getattr(module, "scope", None) is None or not module.has_variable("params", "kernel"):
        return None
    kernel = module.get_variable("params", "kernel")
    return kernel if is_quantized(kernel) else None


def call(module: Any, kernel: QuantizedArray, args: tuple, kwargs: Mapping) -> jax.Array:
    """``module(*args, **kwargs)`` with its kernel dequantised inside the call.

    The layer (``nn.Dense``, ``nn.Conv``: anything reading ``params/kernel``) runs detached on
    ``{"kernel": dequantize(kernel), <its other params>}``, in the module's compute dtype;
    ``jax.checkpoint`` keeps only the packed kernel for the backward pass, which dequantises
    again. Gradients flow to the inputs and to the other params (a trained bias)."""
    others = {k: v for k, v in module.variables["params"].items() if k != "kernel"}
    dtype = getattr(module, "dtype", None) or getattr(module, "param_dtype", None) or jnp.float32
    detached = module.clone(parent=None)

    def run(inputs, packed, rest):
        params = {**rest, "kernel": dequantize(packed, dtype)}
        return detached.apply({"params": params}, *inputs, **kwargs)

    return jax.checkpoint(run)(tuple(args), kernel, others)


# -- export files ---------------------------------------------------------------------------------


def to_tensors(flat: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Safetensors tensors and metadata for a flat tree with quantised leaves: a quantised
    ``p`` becomes ``p.qvalue`` (int8 / packed uint8) and ``p.scale`` (float32); its kind and
    shape go in the metadata (``ftlab.quantized``: JSON ``{path: [qtype, shape]}``)."""
    import json

    tensors, kinds = {}, {}
    for path, v in flat.items():
        if is_quantized(v):
            tensors[f"{path}.qvalue"] = np.asarray(v.qvalue)
            tensors[f"{path}.scale"] = np.asarray(v.scale)
            kinds[path] = [v.qtype, list(v.shape)]
            if v.double:  # the 8-bit scales' own scales and mean
                tensors[f"{path}.scale2"] = np.asarray(v.scale2)
                tensors[f"{path}.offset"] = np.asarray(v.offset).reshape(1)
                kinds[path].append("double")
        else:
            tensors[path] = np.asarray(v)
    return tensors, {"ftlab.quantized": json.dumps(kinds, sort_keys=True)}


def from_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> dict:
    """The inverse of ``to_tensors``: a flat tree with ``QuantizedArray`` leaves."""
    import json

    kinds = json.loads((metadata or {}).get("ftlab.quantized", "{}"))
    flat = {}
    for path, (qtype, shape, *double) in kinds.items():
        flat[path] = QuantizedArray(
            jnp.asarray(tensors[f"{path}.qvalue"]),
            jnp.asarray(tensors[f"{path}.scale"]),
            qtype,
            tuple(shape),
            jnp.asarray(tensors[f"{path}.scale2"]) if double else None,
            jnp.asarray(tensors[f"{path}.offset"]).reshape(()) if double else None,
        )
    for name, value in tensors.items():
        base = name.rsplit(".", 1)[0]
        if base not in kinds:
            flat[name] = jnp.asarray(value)
    return flat
