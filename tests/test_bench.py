"""``ftlab bench`` on a tiny case, the model-FLOPs formula against a hand count, train/mfu,
and the fast dropout PRNG."""

from __future__ import annotations

import json
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import cli
from ftlab.methods import build_method
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.schema import base_config
from ftlab.train import flops
from ftlab.train.rng import dropout_key

TINY = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2)


def _split(method_name: str, **kw):
    model = GPT2(TINY)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = nn.meta.unbox(shapes["params"])
    m = base_config().method
    m.name = method_name
    if method_name == "lora":
        m.lora.rank = 2
        m.lora.targets = (r"attn/(q|v)_proj/kernel",)
    if method_name == "partial":
        m.partial.last_k = 1
    if "frozen_dtype" in m:
        m.frozen_dtype = "float32"
    method = build_method(m, params)
    trainable, frozen = jax.eval_shape(lambda p: method.split(p, jax.random.key(1)), params)
    return model, method, trainable, frozen


# Hand count, tiny GPT-2 (2 layers, width 8, vocabulary 16, tied head), batch 2 x 4 tokens.
# Per layer matmul weights: q, k, v, c_proj 4 x 64 + c_fc 8x32 + c_proj 32x8 = 768; two
# layers 1,536; tied head 16 x 8 = 128; attention 4 * T * d = 4 * 4 * 8 = 128 per layer/token.
# full: every weight 6N (the embeddings are trained: gradients flow everywhere) + 3 x attention
#   = 6 * 1,664 + 3 * 128 * 2 = 10,752 per token.
# lora (r=2 on q, v; 4 factor pairs of 16 + 16): h_0's q, k, v are below every trained leaf
#   (forward only, 2 x 192), the rest 4 x 1,472; h_0's factors have nothing trained upstream
#   (forward + weight gradients, 4 x 64), h_1's 6 x 64; attention 3 x 256
#   = 384 + 5,888 + 256 + 384 + 768 = 7,680 per token.
# top-1 (h_1 trained): h_0 forward only 2 x 768, h_1 6 x 768, the frozen tied head 4 x 128,
#   attention 128 (h_0) + 3 x 128 (h_1) = 1,536 + 4,608 + 512 + 512 = 7,168 per token.
@pytest.mark.parametrize(
    "method_name,per_token", [("full", 10_752), ("lora", 7_680), ("partial", 7_168)]
)
def test_flops_match_a_hand_count(method_name, per_token):
    _, method, trainable, frozen = _split(method_name)
    f = flops.method_step_flops(method, trainable, frozen, batch=2, seq_len=4, tied=True)
    assert f.tokens == 8
    assert f.matmul_params == 1_664
    assert f.per_token == per_token
    assert f.total == 8 * per_token
    assert "6*N_trained + 4*N_frozen_grad + 2*N_frozen_fwd" in f.formula


def test_peak_table_and_override(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    assert flops.peak_flops("NVIDIA H200")[0] == 989e12
    assert flops.peak_flops("TPU v5 lite")[0] == 197e12
    assert flops.peak_flops("TPU v5p")[0] == 459e12
    assert flops.peak_flops("cpu") is None
    monkeypatch.setenv(flops.PEAK_ENV, "1e12")
    assert flops.peak_flops("cpu") == (1e12, f"${flops.PEAK_ENV}")


def test_run_mfu(monkeypatch):
    model, method, trainable, frozen = _split("lora")
    state = types.SimpleNamespace(trainable=trainable, frozen=frozen)
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    if flops.peak_flops() is None:  # CPU: no peak, no MFU
        assert flops.run_mfu(model, method, state, 4, 100.0) is None
    monkeypatch.setenv(flops.PEAK_ENV, "1e9")
    mfu = flops.run_mfu(model, method, state, 4, 100.0)
    assert mfu == pytest.approx(4 * 7_680 * 100.0 / (1e9 * jax.device_count()))
    assert flops.run_mfu(model, method, state, None, 100.0) is None


def test_hash32_dropout_keys():
    key = jax.random.key(3)
    assert dropout_key(key, "threefry") is key
    fast = dropout_key(key, "hash32")
    a = jax.random.bernoulli(jax.random.fold_in(fast, 0), 0.9, (200, 500))
    b = jax.random.bernoulli(jax.random.fold_in(fast, 1), 0.9, (200, 500))
    assert abs(float(a.mean()) - 0.9) < 0.01
    assert abs(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]) < 0.02
    again = jax.random.bernoulli(jax.random.fold_in(dropout_key(key, "hash32"), 0), 0.9, (200, 500))
    np.testing.assert_array_equal(a, again)  # a pure function of the key: resumes match
    y = nn.Dropout(0.5, deterministic=False).apply({}, jnp.ones((64,)), rngs={"dropout": fast})
    assert set(np.unique(np.asarray(y))) <= {0.0, 2.0}


def test_bench_tiny_case_writes_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv(flops.PEAK_ENV, "1e11")  # no matmul measurement: fast
    code = cli.main(
        ["bench", "--case", "tiny", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    )
    assert code == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["device"]["device_kind"]
    assert "jax" in result["device"]
    (case,) = result["cases"]
    (row,) = case["rows"]  # no --torch: ftlab only
    assert row["impl"] == "ftlab" and row["tokens_per_s"] > 0
    assert row["model_flops"] > 0 and 0 < row["mfu"]
    assert "FLOPs/step = tokens x" in row["flops"]["formula"]
    md = (tmp_path / "bench.md").read_text()
    assert "tiny GPT-2" in md and "FLOPs/step = tokens x" in md
