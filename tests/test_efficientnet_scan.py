"""EfficientNet ``scan_layers=True``: the scanned stages compute the unrolled function (eval
logits, train-mode BatchNorm updates), stochastic depth still draws per block at each block's
own rate, and the per-block trees convert both ways bit for bit (HF export and import).

The fixture's stages have only one block after their first (nothing to scan), so a tiny
random one-stage configuration of three blocks is built here.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import tree
from ftlab.interop.pretrained import export_hf, hf_config_for, load_pretrained
from ftlab.models.efficientnet import EfficientNet, mbconv_scan, stack_blocks, unstack_blocks
from ftlab.plan import KNOWN_MODELS
from ftlab.train.rng import dropout_key

TINY = EfficientNet(
    width_coefficient=0.2,
    depth_coefficient=1.0,
    depth_divisor=4,
    kernel_sizes=(5,),
    in_channels=(32,),
    out_channels=(24,),
    strides=(2,),
    num_block_repeats=(3,),
    expand_ratios=(4,),
    image_size=16,
    num_labels=3,
    drop_connect_rate=0.4,
    dropout_rate=0.0,
)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("train",))
def _apply(model, variables, images, key, *, train):
    with jax.default_matmul_precision("highest"):
        return model.apply(
            variables, images, train=train, mutable=["batch_stats"], rngs={"dropout": key}
        )


@pytest.fixture(scope="module")
def variables():
    """TINY's variables, every leaf moved off its init value (numpy leaves) so that BatchNorm
    statistics and the logits are far from trivial."""
    shapes = nn.meta.unbox(jax.eval_shape(TINY.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    rng = np.random.default_rng(0)

    def value(path, s):
        if path.endswith("/var"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if path.endswith("/scale"):
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return (rng.standard_normal(s.shape) * 0.3).astype(np.float32)

    return tree.unflatten({p: value(p, s) for p, s in tree.flatten(shapes).items()})


def test_runs_and_stacked_tree_are_what_the_scanned_model_initialises(variables):
    assert TINY.scanned_runs() == [[1, 2]]  # block 0 starts the stage
    scanned = TINY.clone(scan_layers=True)
    stacked = {c: stack_blocks(t, TINY) for c, t in variables.items()}
    for c in ("params", "batch_stats"):
        assert stacked[c].keys() >= {"block_0", "blocks_1_to_2", "top_norm"}
        assert not {"block_1", "block_2"} & stacked[c].keys()
    k = stacked["params"]["blocks_1_to_2"]["depthwise_conv"]["kernel"]
    assert k.shape == (2, 5, 5, 1, 32) and isinstance(k, np.ndarray)
    np.testing.assert_array_equal(k[1], variables["params"]["block_2"]["depthwise_conv"]["kernel"])
    boxed = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    want = {p: s.shape for p, s in tree.flatten(nn.meta.unbox(boxed)).items()}
    assert want == {p: np.shape(v) for p, v in tree.flatten(stacked).items()}
    names = [v.names for p, v in tree.flatten(boxed["params"]).items() if "blocks_" in p]
    assert names and all(n[0] == "layers" for n in names)  # the layer axis, for sharding rules
    # B0's layout: the 3-, 3- and 4-block stages scan, the parameter count is unchanged
    b0 = EfficientNet.from_hf_config({**KNOWN_MODELS["google/efficientnet-b0"], "num_labels": 10})
    assert b0.scanned_runs() == [[6, 7], [9, 10], [12, 13, 14]]
    shapes = jax.eval_shape(
        b0.clone(scan_layers=True).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    assert tree.count(nn.meta.unbox(shapes["params"])) == 4_020_358  # 4,007,548 + 1280*10+10


def test_scanned_model_computes_the_unrolled_function(variables):
    scanned = TINY.clone(scan_layers=True)
    stacked = {c: stack_blocks(t, TINY) for c, t in variables.items()}
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    key = dropout_key(jax.random.key(2))  # a cheap hash on CPU: fast to compile
    ref, _ = _apply(TINY, variables, images, key, train=False)
    got, _ = _apply(scanned, stacked, images, key, train=False)
    diff = float(np.abs(np.asarray(got) - np.asarray(ref)).max())
    assert np.abs(np.asarray(ref)).max() > 1e-1 and diff < 1e-6, diff
    # training mode without drop connect: the same function and the same BatchNorm updates
    quiet, quiet_scanned = TINY.clone(drop_connect_rate=0.0), scanned.clone(drop_connect_rate=0.0)
    ref, ref_stats = _apply(quiet, variables, images, key, train=True)
    got, got_stats = _apply(quiet_scanned, stacked, images, key, train=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    want = tree.flatten(jax.device_get(ref_stats["batch_stats"]))
    back = tree.flatten(unstack_blocks(jax.device_get(got_stats["batch_stats"])))
    assert back.keys() == want.keys()
    old = tree.flatten(variables["batch_stats"])
    assert all(not np.allclose(want[p], old[p]) for p in want)  # every statistic moved
    for p in want:
        np.testing.assert_allclose(back[p], want[p], atol=1e-5, rtol=1e-6, err_msg=p)


def test_scanned_drop_connect_draws_per_block_at_its_own_rate():
    """Two scanned blocks, per-example drop connect; a block whose projection BatchNorm has
    scale and bias 0 adds exactly nothing, so the examples changed show the other's mask."""
    stack = mbconv_scan(2)(8, 8, residual=True, drop_rate=0.7, drop_connect_mode="per_example")
    x = jax.random.normal(jax.random.key(0), (400, 2, 2, 8))
    rates = jnp.asarray([0.2, 0.7])
    shapes = nn.meta.unbox(jax.eval_shape(lambda: stack.init(jax.random.key(1), x, rates, False)))
    base = jax.tree.map(lambda s: np.full(s.shape, 0.3, np.float32), shapes)

    run = jax.jit(
        lambda v, r, key: stack.apply(v, x, r, True, mutable=["batch_stats"], rngs={"dropout": key})
    )

    def kept(silent, rates, seed=3):
        v = jax.tree.map(np.copy, base)
        for name in ("scale", "bias"):
            v["params"]["project_norm"][name][silent] = 0.0
        (y, _), _ = run(v, rates, dropout_key(jax.random.key(seed)))
        return np.abs(np.asarray(y - x)).reshape(400, -1).max(-1) > 0

    first, second = kept(1, rates), kept(0, rates)  # block 0's mask, block 1's mask
    assert 0.1 < 1 - first.mean() < 0.3 and 0.6 < 1 - second.mean() < 0.8
    half = jnp.asarray([0.5, 0.5])
    assert not np.array_equal(kept(1, half), kept(0, half))  # one key per block
    assert not np.array_equal(kept(1, half), kept(1, half, seed=4))  # and per step


def test_conversion_round_trips_through_hugging_face_bit_for_bit(variables, tmp_path):
    stacked = {c: stack_blocks(t, TINY) for c, t in variables.items()}
    back = {c: unstack_blocks(t) for c, t in stacked.items()}
    a, b = tree.flatten(variables), tree.flatten(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    # export the scanned model's variables as they are (the family unstacks) and import them
    out = export_hf(
        tmp_path / "hf",
        stacked["params"],
        hf_config_for(TINY),
        model_state={"batch_stats": stacked["batch_stats"]},
    )
    again = load_pretrained(out)
    assert again.model.clone(hidden_dim=None) == TINY
    restacked = {
        c: stack_blocks(jax.device_get(t), again.model) for c, t in again.variables.items()
    }
    a, b = tree.flatten(stacked), tree.flatten(restacked)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)
    # what the conversions refuse
    with pytest.raises(ValueError, match="lead with .*not 3 blocks"):
        unstack_blocks({"blocks_1_to_3": {"kernel": np.zeros((2, 4))}})
    with pytest.raises(ValueError, match="has no block_2"):
        stack_blocks({k: v for k, v in variables["params"].items() if k != "block_2"}, TINY)
    with pytest.raises(ValueError, match="both 'blocks_1_to_2' and block_2"):
        unstack_blocks({**stacked["params"], "block_2": variables["params"]["block_2"]})
