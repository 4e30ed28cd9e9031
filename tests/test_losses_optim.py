"""Losses and optimiser/schedule construction, checked against independent numpy computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab.schema import base_config
from ftlab.train import losses, optim

# ---------------------------------------------------------------- numpy references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits, labels, ls=0.0):
    logits = np.asarray(logits, np.float64)
    k = logits.shape[-1]
    onehot = np.eye(k)[np.asarray(labels)]
    targets = (1.0 - ls) * onehot + ls / k
    return -(targets * np_log_softmax(logits)).sum(axis=-1)


# ---------------------------------------------------------------- losses


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cross_entropy_matches_numpy(ls):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=7)
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ls)
    assert got.shape == (7,)
    np.testing.assert_allclose(
        np.asarray(got), np_cross_entropy(logits, labels, ls), rtol=1e-5, atol=1e-5
    )


def test_label_smoothing_changes_loss():
    logits = jnp.asarray([[10.0, 0.0, 0.0]])
    labels = jnp.asarray([0])
    assert float(losses.cross_entropy(logits, labels, 0.1)[0]) > float(
        losses.cross_entropy(logits, labels, 0.0)[0]
    )


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_cross_entropy_bfloat16_logits(ls):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(6, 4)) * 2, jnp.bfloat16)
    labels = rng.integers(0, 4, size=6)
    got = losses.cross_entropy(logits, jnp.asarray(labels), ls)
    assert got.dtype == jnp.float32
    # reference computed on the bf16-rounded values, plus a bf16-sized tolerance
    ref = np_cross_entropy(np.asarray(logits.astype(jnp.float32)), labels, ls)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-2, atol=2e-2)


def test_cross_entropy_3d_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=(2, 3))
    got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.1)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(
        np.asarray(got), np_cross_entropy(logits, labels, 0.1), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_masked_lm_loss_mean_over_masked_tokens(ls):
    rng = np.random.default_rng(3)
    b, t, v = 3, 5, 7
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t))
    mask = np.ones((b, t), np.int32)
    mask[:, :2] = 0  # prompt positions
    mask[2, 4] = 0  # padding
    got = float(
        losses.masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), ls)
    )
    per_token = np_cross_entropy(logits, targets, ls)
    expected = per_token[mask.astype(bool)].mean()
    assert got == pytest.approx(expected, rel=1e-5)

    # changing logits (and targets) at masked-out positions must not change the loss
    logits2 = logits.copy()
    logits2[mask == 0] = rng.normal(size=(int((mask == 0).sum()), v)) * 50
    targets2 = targets.copy()
    targets2[mask == 0] = (targets[mask == 0] + 1) % v
    got2 = float(
        losses.masked_lm_loss(jnp.asarray(logits2), jnp.asarray(targets2), jnp.asarray(mask), ls)
    )
    assert got2 == pytest.approx(got, rel=1e-6)

    # ... while changing a masked-in logit does
    logits3 = logits.copy()
    logits3[0, 3] += 5.0 * np.eye(v)[(targets[0, 3] + 1) % v]
    got3 = float(
        losses.masked_lm_loss(jnp.asarray(logits3), jnp.asarray(targets), jnp.asarray(mask), ls)
    )
    assert got3 > got + 1e-3


def test_masked_lm_loss_empty_mask_is_zero():
    logits = jnp.ones((2, 3, 4))
    targets = jnp.zeros((2, 3), jnp.int32)
    got = losses.masked_lm_loss(logits, targets, jnp.zeros((2, 3)))
    assert np.isfinite(float(got))
    assert float(got) == 0.0


def test_squared_error_and_weighted_mean_with_padding():
    rng = np.random.default_rng(4)
    outputs = rng.normal(size=(6, 2)).astype(np.float32)
    targets = rng.normal(size=(6, 2)).astype(np.float32)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
    outputs[4:] = 1e3  # padding rows with garbage must not count
    per = losses.squared_error(jnp.asarray(outputs), jnp.asarray(targets))
    ref_per = ((outputs.astype(np.float64) - targets) ** 2).sum(axis=-1)
    np.testing.assert_allclose(np.asarray(per), ref_per, rtol=1e-5)
    got = float(losses.weighted_mean(per, jnp.asarray(weights)))
    assert got == pytest.approx(ref_per[:4].mean(), rel=1e-5)
    assert float(losses.weighted_mean(per, None)) == pytest.approx(ref_per.mean(), rel=1e-5)


def test_squared_error_single_output_column():
    outputs = jnp.asarray([[1.0], [2.0], [4.0]])
    targets = jnp.asarray([[0.0], [2.0], [1.0]])
    got = np.asarray(losses.squared_error(outputs, targets))
    np.testing.assert_allclose(got, [1.0, 0.0, 9.0])


def test_weighted_mean_all_zero_weights_is_finite():
    got = float(losses.weighted_mean(jnp.asarray([1.0, 2.0]), jnp.zeros(2)))
    assert got == 0.0


def test_per_example_loss_dispatch_and_unknown():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=4)
    fn = losses.per_example_loss("cross_entropy", 0.1)
    got = fn(jnp.asarray(logits), {"labels": jnp.asarray(labels)})
    np.testing.assert_allclose(np.asarray(got), np_cross_entropy(logits, labels, 0.1), rtol=1e-5)
    mse = losses.per_example_loss("mse")
    got = mse(jnp.asarray([[1.0], [3.0]]), {"labels": jnp.asarray([[0.0], [1.0]])})
    np.testing.assert_allclose(np.asarray(got), [1.0, 4.0])
    with pytest.raises(ValueError, match="nope"):
        losses.per_example_loss("nope")


# ---------------------------------------------------------------- schedules


def optim_cfg(**kw):
    c = base_config().optim
    for k, v in kw.items():
        c[k] = v
    return c


def test_schedule_warmup_then_cosine():
    lr, warm, total, frac = 0.1, 10, 110, 0.2
    s = optim.schedule(
        optim_cfg(lr=lr, warmup_steps=warm, schedule="cosine", final_lr_fraction=frac),
        total,
    )
    for step in [0, 1, 5, 9]:
        assert float(s(step)) == pytest.approx(lr * step / warm, abs=1e-7)
    decay = total - warm
    for step in [10, 20, 35, 60, 85, 109, 110]:
        t = step - warm
        expected = lr * (frac + (1 - frac) * 0.5 * (1 + math.cos(math.pi * t / decay)))
        assert float(s(step)) == pytest.approx(expected, rel=1e-5)
    assert float(s(total)) == pytest.approx(lr * frac, rel=1e-5)
    assert float(s(warm)) == pytest.approx(lr, rel=1e-6)


def test_schedule_warmup_then_linear():
    lr, warm, total, frac = 2e-3, 4, 54, 0.1
    s = optim.schedule(
        optim_cfg(lr=lr, warmup_steps=warm, schedule="linear", final_lr_fraction=frac),
        total,
    )
    for step in [0, 2, 3]:
        assert float(s(step)) == pytest.approx(lr * step / warm, abs=1e-10)
    for step in [4, 10, 29, 53, 54]:
        expected = lr + (lr * frac - lr) * (step - warm) / (total - warm)
        assert float(s(step)) == pytest.approx(expected, rel=1e-5)
    assert float(s(total + 100)) == pytest.approx(lr * frac, rel=1e-5)


def test_schedule_constant_and_no_warmup():
    lr = 0.05
    s = optim.schedule(optim_cfg(lr=lr, warmup_steps=0, schedule="constant"), 100)
    for step in [0, 1, 50, 100, 1000]:
        assert float(s(step)) == pytest.approx(lr, rel=1e-6)
    s = optim.schedule(optim_cfg(lr=lr, warmup_steps=5, schedule="constant"), 100)
    assert float(s(0)) == 0.0
    assert float(s(1)) == pytest.approx(lr / 5, rel=1e-6)
    for step in [5, 6, 99]:
        assert float(s(step)) == pytest.approx(lr, rel=1e-6)
    # cosine without warmup starts at lr and ends at lr * final_lr_fraction
    s = optim.schedule(
        optim_cfg(lr=lr, warmup_steps=0, schedule="cosine", final_lr_fraction=0.0), 40
    )
    assert float(s(0)) == pytest.approx(lr, rel=1e-6)
    assert float(s(20)) == pytest.approx(lr / 2, rel=1e-5)
    assert float(s(40)) == pytest.approx(0.0, abs=1e-9)


def test_schedule_unknown_raises():
    with pytest.raises(ValueError, match="bogus"):
        optim.schedule(optim_cfg(schedule="bogus"), 10)


# ---------------------------------------------------------------- decay mask


def test_decay_mask_kernels_only_and_structure():
    params = {
        "params": {
            "block_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
            "layer_norm": {"scale": jnp.ones((4,))},
            "ln_f_norm": {"kernel": jnp.ones((4, 4))},
        },
        "lora": {},
    }
    mask = optim.decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert mask["lora"] == {}
    p = mask["params"]
    assert bool(p["block_0"]["kernel"])
    assert not p["block_0"]["bias"]
    assert not p["layer_norm"]["scale"]
    assert not p["ln_f_norm"]["kernel"]


def test_decay_mask_lora_factors_decayed():
    params = {
        "lora": {"block_0/kernel": {"a": jnp.ones((3, 2)), "b": jnp.ones((2, 4))}},
        "head": {"bias": jnp.ones(2)},
    }
    mask = optim.decay_mask(params)
    assert bool(mask["lora"]["block_0/kernel"]["a"]) and bool(mask["lora"]["block_0/kernel"]["b"])
    assert not bool(mask["head"]["bias"])


# ---------------------------------------------------------------- optimisers


def small_tree():
    return {
        "dense": {
            "kernel": jnp.asarray(np.linspace(-1, 1, 12).reshape(3, 4), jnp.float32),
            "bias": jnp.asarray([0.5, -0.5, 1.0, -1.0], jnp.float32),
        }
    }


def fixed_grad():
    rng = np.random.default_rng(6)
    g = rng.normal(size=(3, 4)).astype(np.float32)
    g[np.abs(g) < 0.1] = 0.3  # no near-zero entries: signs must be unambiguous
    return {
        "dense": {
            "kernel": jnp.asarray(g),
            "bias": jnp.asarray([0.2, -0.7, 1.5, -0.4], jnp.float32),
        }
    }


def one_update(cfg, params, grads, total_steps=100):
    tx, _ = optim.optimizer(cfg, total_steps)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params)
    return updates


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_optimizer_first_step_opposes_gradient(name):
    cfg = optim_cfg(
        name=name,
        lr=1e-2,
        clip_norm=1.0,
        weight_decay=1e-4,
        schedule="constant",
        warmup_steps=0,
    )
    params, grads = small_tree(), fixed_grad()
    updates = one_update(cfg, params, grads)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        u, g = np.asarray(u), np.asarray(g)
        assert u.shape == g.shape
        assert np.all(np.isfinite(u))
        assert np.all(np.sign(u) == -np.sign(g)), (name, u, g)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    for p0, p1 in zip(jax.tree.leaves(params), jax.tree.leaves(new)):
        assert not np.allclose(np.asarray(p0), np.asarray(p1))


def test_adamw_first_step_is_lr_times_sign():
    lr = 1e-2
    cfg = optim_cfg(
        name="adamw",
        lr=lr,
        clip_norm=1e6,
        weight_decay=0.0,
        schedule="constant",
        warmup_steps=0,
    )
    grads = fixed_grad()
    updates = one_update(cfg, small_tree(), grads)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(u), -lr * np.sign(np.asarray(g)), rtol=1e-4)


def test_adamw_weight_decay_on_kernels_only():
    lr, wd = 1e-2, 0.5
    cfg = optim_cfg(
        name="adamw",
        lr=lr,
        clip_norm=1.0,
        weight_decay=wd,
        schedule="constant",
        warmup_steps=0,
    )
    params = small_tree()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = one_update(cfg, params, zeros)
    np.testing.assert_array_equal(np.asarray(updates["dense"]["bias"]), 0.0)
    kernel = np.asarray(params["dense"]["kernel"])
    np.testing.assert_allclose(
        np.asarray(updates["dense"]["kernel"]), -lr * wd * kernel, rtol=1e-5, atol=1e-9
    )
    new_kernel = kernel + np.asarray(updates["dense"]["kernel"])
    assert np.all(np.abs(new_kernel[kernel != 0]) < np.abs(kernel[kernel != 0]))


@pytest.mark.parametrize("name", ["sgd", "adafactor"])
def test_weight_decay_skips_bias_for_other_optimizers(name):
    cfg = optim_cfg(
        name=name,
        lr=1e-2,
        clip_norm=1.0,
        weight_decay=0.5,
        momentum=0.0,
        schedule="constant",
    )
    params = small_tree()
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = one_update(cfg, params, zeros)
    np.testing.assert_array_equal(np.asarray(updates["dense"]["bias"]), 0.0)
    k = np.asarray(params["dense"]["kernel"])
    uk = np.asarray(updates["dense"]["kernel"])
    nz = k != 0
    assert np.all(np.sign(uk[nz]) == -np.sign(k[nz]))


def test_sgd_momentum_zero_clipping_norm():
    lr = 0.3
    cfg = optim_cfg(
        name="sgd",
        lr=lr,
        momentum=0.0,
        clip_norm=1.0,
        weight_decay=0.0,
        schedule="constant",
    )
    params = small_tree()
    grads = jax.tree.map(lambda g: g * 1e4, fixed_grad())
    updates = one_update(cfg, params, grads)
    flat_u = np.concatenate([np.asarray(u).ravel() for u in jax.tree.leaves(updates)]).astype(
        np.float64
    )
    flat_g = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(grads)]).astype(
        np.float64
    )
    assert np.linalg.norm(flat_u) == pytest.approx(lr * 1.0, rel=1e-5)
    np.testing.assert_allclose(flat_u, -lr * flat_g / np.linalg.norm(flat_g), rtol=1e-4, atol=1e-8)


def test_sgd_no_clipping_when_zero():
    lr = 0.1
    cfg = optim_cfg(
        name="sgd",
        lr=lr,
        momentum=0.0,
        clip_norm=0.0,
        weight_decay=0.0,
        schedule="constant",
    )
    grads = jax.tree.map(lambda g: g * 100, fixed_grad())
    updates = one_update(cfg, small_tree(), grads)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(u), -lr * np.asarray(g), rtol=1e-5)


def test_optimizer_returns_schedule_and_unknown_raises():
    cfg = optim_cfg(lr=0.2, warmup_steps=4, schedule="linear", final_lr_fraction=0.0)
    _, lr = optim.optimizer(cfg, 8)
    assert float(lr(2)) == pytest.approx(0.1, rel=1e-6)
    assert float(lr(6)) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError, match="nadam"):
        optim.optimizer(optim_cfg(name="nadam"), 10)
