"""QLoRA's double quantisation (``method.quantize_double``): NF4's block absmax stored as
8-bit floats in groups of 256 with a float32 scale each, the mean subtracted (Dettmers et al.
2023, section 3), checked against a numpy / ml_dtypes reference; memory per weight; the
method, a short run and its checkpoint; the export files."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from ftlab import tree
from ftlab.config import ConfigError
from ftlab.methods import build_method
from ftlab.methods import quantize as q
from ftlab.schema import base_config
from tests.conftest import tiny_config


def _matrix(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[rng.integers(0, shape[0], 8), rng.integers(0, shape[1], 8)] *= 20
    return w


def _reference(single: q.QuantizedArray, offset: np.float32):
    """numpy: the absmax (blocks, out) less ``offset``, in bitsandbytes' order (each output
    channel's blocks in turn), groups of 256 scaled to E4M3's 448, cast to float8_e4m3fn."""
    absmax = np.asarray(single.scale, np.float32)
    flat = (absmax - offset).T.reshape(-1)
    n = flat.size
    padded = np.zeros(-(-n // 256) * 256, np.float32)
    padded[:n] = flat
    groups = padded.reshape(-1, 256)
    scale2 = (np.abs(groups).max(1) / np.float32(448.0)).astype(np.float32)
    codes = (groups / scale2[:, None]).astype(ml_dtypes.float8_e4m3fn)
    decoded = codes.astype(np.float32) * scale2[:, None] + offset
    absmax2 = decoded.reshape(-1)[:n].reshape(absmax.shape[::-1]).T
    bits = codes.view(np.uint8).reshape(-1)[:n].reshape(absmax.shape[::-1]).T
    return bits, scale2, absmax2


def test_double_quantised_absmax_and_weights_equal_a_numpy_reference():
    w = _matrix((512, 40))  # 8 blocks of 64 per column x 40 columns = 320 absmax: 2 groups
    single = q.quantize(w, "nf4")
    double = q.quantize(w, "nf4", double=True)
    assert double.double and not single.double
    np.testing.assert_array_equal(double.qvalue, single.qvalue)  # codes from the exact absmax
    absmax = np.asarray(single.scale)
    offset = np.float32(double.offset)
    assert offset == pytest.approx(absmax.mean(), rel=1e-6)
    bits, scale2, absmax2 = _reference(single, offset)
    assert double.scale.dtype == np.uint8 and double.scale.shape == absmax.shape
    np.testing.assert_array_equal(double.scale, bits)
    np.testing.assert_array_equal(double.scale2, scale2)
    np.testing.assert_allclose(q.absmax(double), absmax2, rtol=1e-7, atol=0)
    # the weights: NF4 levels x the decoded absmax of their block (64 rows of a column)
    codes = np.asarray(q.unpack_nibbles(single.qvalue, 512)).astype(int)
    expected = q.nf4_levels()[codes] * np.repeat(absmax2, 64, axis=0)
    np.testing.assert_allclose(q.dequantize(double), expected, rtol=1e-6, atol=0)
    # 8-bit absmax moves the weights a little from single quantisation's (not beyond 1/16)
    moved = np.abs(np.asarray(q.dequantize(double)) - np.asarray(q.dequantize(single)))
    assert 0 < moved.max() <= np.abs(w).max() / 16


def test_bytes_per_weight_drop_from_0_5625_to_0_5159():
    shape = jax.ShapeDtypeStruct((4096, 4096), np.float32)
    single = jax.eval_shape(lambda w: q.quantize(w, "nf4"), shape)
    double = jax.eval_shape(lambda w: q.quantize(w, "nf4", double=True), shape)
    n = 4096 * 4096
    assert single.nbytes / n == 0.5625
    # 4 bits + 8 / 64 + 32 / (64 * 256) bits (+ one float32 mean per kernel)
    assert double.nbytes == n // 2 + n // 64 + 4 * n // (64 * 256) + 4
    assert double.nbytes / n == pytest.approx(0.515869, abs=1e-6)


def test_method_run_checkpoint_and_export_files(tmp_path):
    """qlora + quantize_double on the tiny CNN: the frozen kernels are double-quantised, a
    short run trains, checkpoints and restores them bit-identical, the summary says so; the
    export tensors round-trip; int8 with double quantisation is refused naming the key."""
    from ftlab import checkpoint
    from ftlab.train.loop import build, train

    cfg = tiny_config(
        **{
            "method.name": "qlora",
            "method.trainable": ("head/",),
            "method.lora.targets": (r"block_\d+/kernel",),
            "method.lora.rank": 2,
            "method.quantize_double": True,
            "train.num_steps": 2,
            "optim.warmup_steps": 1,
            "checkpoint.every_steps": 2,
            "train.eval_every": 2,
            "train.log_every": 2,
            "eval.before_training": False,
        }
    )
    summary = train(cfg, tmp_path)
    assert "absmax double-quantised" in summary["method_summary"]
    run = build(cfg)
    frozen = tree.flatten(run.state.frozen)
    quantized = {p: v for p, v in frozen.items() if q.is_quantized(v)}
    assert quantized and all(v.double for v in quantized.values())
    ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints", save_every=2)
    restored, _ = ckpts.restore(run.state)
    ckpts.close()
    for a, b in zip(jax.tree.leaves(restored.frozen), jax.tree.leaves(run.state.frozen)):
        np.testing.assert_array_equal(a, b)  # frozen: never trained, saved as stored
    tensors, meta = q.to_tensors(quantized)
    back = q.from_tensors(tensors, json.loads(json.dumps(meta)))
    for p, v in quantized.items():
        assert back[p].double
        np.testing.assert_array_equal(q.dequantize(back[p]), q.dequantize(v))
    params = tree.unflatten({p: np.zeros((8, 8), np.float32) for p in ("a/kernel", "b/kernel")})
    method_cfg = base_config().method
    method_cfg.name, method_cfg.trainable = "frozen", ("^b/",)
    method_cfg.quantize, method_cfg.quantize_double = "int8", True
    with pytest.raises(ConfigError, match=r"^config.method.quantize_double: .*'int8'"):
        build_method(method_cfg, params)
