"""Methods as masks and transforms over one parameter tree: selection, LoRA numerics, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import tree
from ftlab.config import ConfigError
from ftlab.methods import build_method
from ftlab.models.cnn import MLP, SmallCNN
from ftlab.schema import base_config


@pytest.fixture(scope="module")
def cnn():
    model = SmallCNN(5, features=(4, 8), hidden=(16,))
    x = jax.random.uniform(jax.random.key(0), (6, 8, 8))
    return model, model.init(jax.random.key(1), x)["params"], x


def method_cfg(name, **kw):
    c = base_config().method
    c.name = name
    for k, v in kw.items():
        target = c
        *parents, leaf = k.split("__")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return c


def trained(cfg, params):
    return set(build_method(cfg, params).trained)


def test_selection_per_method(cnn):
    _, params, _ = cnn
    paths = set(tree.flatten(params))
    assert trained(method_cfg("full"), params) == paths
    assert trained(method_cfg("frozen", trainable=("head/",)), params) == {
        "head/kernel",
        "head/bias",
    }
    assert trained(method_cfg("bitfit"), params) == {p for p in paths if p.endswith("/bias")}
    # last 2 blocks of block_0..block_2 -> block_1, block_2 (the head is not a numbered block)
    top2 = trained(method_cfg("partial", partial__last_k=2), params)
    assert top2 == {p for p in paths if p.startswith(("block_1/", "block_2/"))}
    by_regex = trained(
        method_cfg("partial", partial__blocks=("block_0/",), trainable=("head/",)),
        params,
    )
    assert by_regex == {"block_0/kernel", "block_0/bias", "head/kernel", "head/bias"}


def test_split_and_combine_roundtrip(cnn):
    _, params, _ = cnn
    m = build_method(method_cfg("bitfit", trainable=("head/",)), params)
    trainable, frozen = m.split(params, jax.random.key(0))
    assert set(tree.flatten(trainable["params"])) == {
        p for p in tree.flatten(params) if "bias" in p or "head" in p
    }
    assert not set(tree.flatten(trainable["params"])) & set(tree.flatten(frozen))
    back = tree.flatten(m.merged_params(trainable, frozen))
    for path, leaf in tree.flatten(params).items():
        np.testing.assert_array_equal(back[path], leaf)


@pytest.mark.parametrize(
    "cfg, key",
    [
        (method_cfg("frozen", trainable=("heads/",)), "method.trainable"),
        (method_cfg("partial", partial__blocks=("block_9/",)), "method.partial.blocks"),
        (method_cfg("lora", lora__targets=("attn/q_proj",)), "method.lora.targets"),
    ],
)
def test_regex_matching_nothing_is_an_error(cnn, cfg, key):
    _, params, _ = cnn
    with pytest.raises(ConfigError, match=rf"config\.{key}: regex '.*' matches no"):
        build_method(cfg, params)


def test_partial_more_blocks_than_model_has(cnn):
    with pytest.raises(ConfigError, match="5 blocks asked for, the model has 3"):
        build_method(method_cfg("partial", partial__last_k=5), cnn[1])


def test_lora_rank_larger_than_target_is_an_error(cnn):
    # block_0 kernel is (3, 3, 1, 4): fan-in 9, fan-out 4
    cfg = method_cfg("lora", lora__targets=("block_0/kernel",), lora__rank=5)
    with pytest.raises(
        ConfigError, match=r"rank 5 is larger than the dimensions of 'block_0/kernel'"
    ):
        build_method(cfg, cnn[1])


def test_lora_target_also_fully_trained_is_an_error(cnn):
    cfg = method_cfg("lora", lora__targets=("head/kernel",), trainable=("head/",))
    with pytest.raises(ConfigError, match="both fully trained"):
        build_method(cfg, cnn[1])


def lora_setup(cnn, **kw):
    model, params, x = cnn
    cfg = method_cfg("lora", lora__targets=(r"block_\d+/kernel", "head/kernel"), lora__rank=2, **kw)
    m = build_method(cfg, params)
    trainable, frozen = m.split(params, jax.random.key(3))
    return model, params, x, m, trainable, frozen


def test_lora_at_step_zero_is_exactly_the_base_model(cnn):
    model, params, x, m, trainable, frozen = lora_setup(cnn)
    assert set(m.lora_targets) == {
        "block_0/kernel",
        "block_1/kernel",
        "block_2/kernel",
        "head/kernel",
    }
    base = model.apply({"params": params}, x)
    np.testing.assert_array_equal(m.apply(model, trainable, frozen, x, train=False), base)
    # b starts at zero, a does not (otherwise the gradient of b would vanish too)
    for factors in tree.flatten(trainable["lora"]).items():
        path, value = factors
        assert (np.all(value == 0)) == path.endswith("/b")


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_lora_equals_unmerged(cnn, rslora):
    model, params, x, m, trainable, frozen = lora_setup(cnn, lora__rslora=rslora, lora__alpha=4.0)
    assert m.lora.scale == pytest.approx(4.0 / (np.sqrt(2) if rslora else 2))
    # non-zero factors so the low-rank branch matters (Dense and Conv layers both adapted)
    keys = iter(jax.random.split(jax.random.key(7), 100))
    trainable = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape), trainable)
    # full fp32 matmuls/convs: on GPUs the default precision rounds fp32 inputs (TF32-like),
    # which differs between the two forms by ~5e-3 (seen on an H200)
    with jax.default_matmul_precision("highest"):
        unmerged = m.apply(model, trainable, frozen, x, train=False)
        merged = model.apply({"params": m.merged_params(trainable, frozen)}, x)
        base = model.apply({"params": params}, x)
    assert np.abs(unmerged - base).max() > 1e-2  # the adapters change the output ...
    np.testing.assert_allclose(
        unmerged, merged, atol=1e-5, rtol=1e-5
    )  # ... identically in both forms


def test_lora_dropout_only_in_training(cnn):
    model, _, x, m, trainable, frozen = lora_setup(cnn, lora__dropout=0.5)
    trainable = jax.tree.map(lambda v: v + 0.5, trainable)
    eval_a = m.apply(model, trainable, frozen, x, train=False)
    eval_b = m.apply(model, trainable, frozen, x, train=False, rng=jax.random.key(1))
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = m.apply(model, trainable, frozen, x, train=True, rng=jax.random.key(1))
    train_b = m.apply(model, trainable, frozen, x, train=True, rng=jax.random.key(2))
    assert np.abs(train_a - train_b).max() > 1e-3
    np.testing.assert_array_equal(
        train_a, m.apply(model, trainable, frozen, x, train=True, rng=jax.random.key(1))
    )


def test_lora_summary_counts():
    model = MLP(3, hidden=(8,))
    params = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    m = build_method(method_cfg("lora", lora__targets=("block_0/kernel",), lora__rank=2), params)
    trainable, frozen = m.split(params, jax.random.key(0))
    # factors a (5, 2) and b (2, 8) = 26 trainable of 5*8+8 + 8*3+3 = 75 base parameters
    assert tree.count(trainable) == 26
    assert "trainable 26 / 75 parameters" in m.summary(trainable, frozen)
    assert "block_0/kernel" in m.summary(trainable, frozen)
