"""EfficientNet: parity with transformers' PyTorch model on a tiny random fixture, HF export,
the B0 parameter count from shapes alone, drop connect, and a linear probe.

The fixture (``tests/fixtures/tiny_efficientnet``) is written by
``tests/fixtures/make_efficientnet_fixtures.py`` with torch; these tests need neither torch nor
transformers' model code.
"""

import functools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file
from transformers import EfficientNetConfig

from ftlab import tree
from ftlab.interop.efficientnet import TABLE
from ftlab.interop.pretrained import export_hf, hf_config_for, load_pretrained
from ftlab.methods import build_method
from ftlab.models.efficientnet import EfficientNet, MBConv, round_filters, round_repeats
from ftlab.plan import KNOWN_MODELS
from ftlab.schema import base_config
from ftlab.train import losses
from ftlab.train.rng import dropout_key
from ftlab.train.state import TrainState
from ftlab.train.step import make_train_step

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_efficientnet"


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def data():
    return dict(np.load(FIXTURE / "inputs_logits.npz"))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("train", "mutable", "capture"))
def _jitted(model, variables, images, rngs=None, *, train, mutable=False, capture=False):
    with jax.default_matmul_precision("highest"):
        return model.apply(
            variables,
            images,
            train=train,
            mutable=mutable,
            rngs=rngs,
            capture_intermediates=capture,
        )


def _key(seed):
    """A dropout key as the train step makes it (a cheap hash on CPU: fast to compile)."""
    return dropout_key(jax.random.key(seed))


def _forward(model, variables, images, *, train, mutable=False, rngs=None, capture=False):
    """``model.apply``, compiled once per model and mode (the module is a static argument;
    the tests share compilations: same model, mode and argument structure)."""
    rngs = rngs or {"dropout": _key(0)}
    return _jitted(model, variables, images, rngs, train=train, mutable=mutable, capture=capture)


def _eval(model, variables, images, key=0):
    """Eval-mode logits and intermediates (always captured: one compilation per model)."""
    rngs = {"dropout": _key(key)}
    return _forward(
        model, variables, images, train=False, mutable=("intermediates",), rngs=rngs, capture=True
    )


def test_rounding_rules_are_transformers():
    # width 0.2, divisor 4: 24 -> 4.8 rounds to 4, more than 10% down, so 8
    assert [round_filters(c, 0.2, 4) for c in (32, 16, 24, 40, 1280)] == [8, 4, 8, 8, 256]
    assert [round_filters(c, 1.1, 8) for c in (32, 16, 24, 40, 80, 112, 192, 320)] == [
        32,
        16,
        24,
        48,
        88,
        120,
        208,
        352,
    ]  # B2's widths
    assert [round_repeats(n, 1.2) for n in (1, 2, 3, 4)] == [2, 3, 4, 5]


def test_logits_match_pytorch(pretrained, data):
    model, variables = pretrained.model, pretrained.variables
    assert isinstance(model, EfficientNet) and model.num_labels == 4
    assert set(variables) == {"params", "batch_stats"} and pretrained.notes == []
    specs = model.blocks()
    assert [(s.in_dim, s.out_dim, s.stride, s.residual, s.adjust_padding) for s in specs] == [
        (8, 4, 1, False, True),
        (4, 4, 1, True, True),
        (4, 8, 2, False, True),  # pads 1 before, 2 after its 5x5
        (8, 8, 1, True, True),
        (8, 8, 2, False, False),  # in depthwise_padding: 1 on both sides
        (8, 8, 1, True, True),
    ]
    pixels = jnp.asarray(data["pixel_values"])  # NCHW, as HF's pixel_values
    logits, inter = _eval(model, variables, pixels)
    diff = np.abs(np.asarray(logits) - data["logits"]).max()
    assert diff < 1e-4, diff
    last = np.asarray(inter["intermediates"]["block_5"]["__call__"][0]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(last, data["last_block"], atol=1e-4, rtol=0)
    nhwc, _ = _eval(model, variables, pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(nhwc), np.asarray(logits), atol=1e-6, rtol=0)


def test_training_mode_batch_norm_follows_pytorch_momentum(pretrained, data):
    """One train-mode pass (dropouts off) moves every running mean as PyTorch's did."""
    model = pretrained.model.clone(dropout_rate=0.0, drop_connect_rate=0.0)
    _, updates = _forward(
        model,
        pretrained.variables,
        jnp.asarray(data["pixel_values"]),
        train=True,
        mutable=("batch_stats",),
    )
    got = tree.flatten({"batch_stats": updates["batch_stats"]})
    expected = {}
    for key, value in data.items():
        if key.startswith("train_mean/"):
            name = key.removeprefix("train_mean/").removeprefix("efficientnet.")
            expected.update(TABLE.to_ftlab(name, value))
    assert len(expected) == 18 and expected.keys() <= got.keys()
    for path, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[path]), value, atol=1e-5, err_msg=path)


def test_export_matches_the_fixture_layout_bit_for_bit(pretrained, tmp_path):
    out = export_hf(
        tmp_path / "hf", pretrained.params, pretrained.hf_config, model_state=pretrained.model_state
    )
    ours, theirs = (
        load_file(str(out / "model.safetensors")),
        load_file(str(FIXTURE / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].shape == value.shape and ours[name].dtype == value.dtype, name
        if not name.endswith("num_batches_tracked"):  # ftlab does not count batches
            np.testing.assert_array_equal(ours[name], value, err_msg=name)
    # transformers reads the config back as the fixture's
    theirs_cfg = EfficientNetConfig.from_pretrained(FIXTURE).to_dict()
    ours_cfg = EfficientNetConfig.from_pretrained(out).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        theirs_cfg.pop(key, None)
        ours_cfg.pop(key, None)
    assert ours_cfg == theirs_cfg
    again = load_pretrained(out)
    assert again.model == pretrained.model
    for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(pretrained.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_written_for_an_ftlab_model_round_trips(pretrained):
    config = hf_config_for(pretrained.model)
    assert config["architectures"] == ["EfficientNetForImageClassification"]
    assert config["hidden_dim"] == 256 and config["depthwise_padding"] == [4]
    assert EfficientNet.from_hf_config(config) == pretrained.model
    assert json.loads(json.dumps(config)) == config


def _axes(boxed):
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape), (leaf.names, leaf.value.shape)
    return {name for leaf in leaves for name in leaf.names if name}


def test_b0_parameter_count_from_shapes():
    """The planner's ``google/efficientnet-b0`` shapes (transformers' config for B0 builds the
    same module) give the real checkpoint's 5,288,548 parameters."""
    model = EfficientNet.from_hf_config(
        {**KNOWN_MODELS["google/efficientnet-b0"], "num_labels": 1000}
    )
    b0 = EfficientNetConfig(
        width_coefficient=1.0,
        depth_coefficient=1.0,
        image_size=224,
        hidden_dim=1280,
        dropout_rate=0.2,
        num_labels=1000,
    )
    assert EfficientNet.from_hf_config(b0) == model
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    params = nn.meta.unbox(boxed["params"])
    assert tree.count(params) == 5_288_548
    paths = tree.flatten(params)
    assert sum(1 for p in paths if p.endswith("project_conv/kernel")) == 16
    assert paths["block_15/expand_conv/kernel"].shape == (1, 1, 192, 1152)
    assert paths["block_15/depthwise_conv/kernel"].shape == (3, 3, 1, 1152)
    assert paths["block_15/se_reduce/kernel"].shape == (1, 1, 1152, 48)
    assert paths["top_conv/kernel"].shape == (1, 1, 320, 1280)
    assert paths["classifier/kernel"].shape == (1280, 1000)
    assert "block_0/expand_conv/kernel" not in paths  # expand ratio 1
    assert _axes(boxed["params"]) == {"conv_in", "conv_out", "embed", "classes"}
    stats = tree.flatten(nn.meta.unbox(boxed["batch_stats"]))
    assert stats.keys() == {p.replace("/scale", "/mean") for p in paths if p.endswith("/scale")} | {
        p.replace("/scale", "/var") for p in paths if p.endswith("/scale")
    }


def test_drop_connect_only_in_training_and_scaled_by_block(pretrained, data):
    specs = pretrained.model.blocks()
    assert [s.drop_rate for s in specs] == pytest.approx([0.4 * i / 6 for i in range(6)])
    model = pretrained.model.clone(dropout_rate=0.0)  # only drop connect is random
    quiet = model.clone(drop_connect_rate=0.0)  # the momentum test's model
    pixels = jnp.asarray(data["pixel_values"])
    variables = pretrained.variables

    def train(m, key):
        out, _ = _forward(
            m, variables, pixels, train=True, mutable=("batch_stats",), rngs={"dropout": key}
        )
        return np.asarray(out)

    a, b = train(model, _key(1)), train(model, _key(2))
    assert np.abs(a - b).max() > 1e-4 and np.abs(a - train(quiet, _key(1))).max() > 1e-4
    np.testing.assert_array_equal(train(quiet, _key(1)), train(quiet, _key(2)))
    # in evaluation the rates and the rng change nothing: the fixture's eval logits
    evals = [np.asarray(_eval(pretrained.model, variables, pixels, key)[0]) for key in (1, 2)]
    np.testing.assert_array_equal(evals[0], evals[1])
    np.testing.assert_allclose(evals[0], data["logits"], atol=1e-4, rtol=0)


def test_per_example_drop_connect_drops_whole_branches():
    block = MBConv(8, 8, residual=True, drop_rate=0.5, drop_connect_mode="per_example")
    x = jax.random.normal(jax.random.key(0), (32, 4, 4, 8))
    shapes = nn.meta.unbox(jax.eval_shape(block.init, jax.random.key(1), x))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), shapes)  # no compile
    y, _ = _forward(
        block,
        variables,
        x,
        train=True,
        mutable=("batch_stats",),
        rngs={"dropout": _key(2)},
    )
    kept = np.abs(np.asarray(y - x)).reshape(32, -1).max(-1) > 0
    assert 4 < kept.sum() < 28  # whole examples dropped (branch exactly 0), the others kept
    np.testing.assert_array_equal(np.asarray(y)[~kept], np.asarray(x)[~kept])


def test_linear_probe_trains_only_the_classifier(pretrained, data):
    cfg = base_config().method
    cfg.name = "frozen"
    cfg.trainable = ("classifier/",)
    method = build_method(cfg, pretrained.params)
    assert sorted(method.trained) == ["classifier/bias", "classifier/kernel"]
    trainable, frozen = method.split(pretrained.params, jax.random.key(0))
    tx = optax.sgd(0.1)
    state = TrainState.create(trainable, frozen, tx, 0, pretrained.model_state)
    step = jax.jit(
        make_train_step(
            pretrained.model, method, tx, lambda s: 0.1, losses.per_example_loss("cross_entropy")
        )
    )
    batch = {"inputs": jnp.asarray(data["pixel_values"]), "labels": jnp.asarray([1, 3])}
    seen = []
    for _ in range(3):
        state, metrics = step(state, batch)
        seen.append(float(metrics["loss"]))
    assert np.isfinite(seen).all()
    before = tree.flatten(pretrained.params)
    after = tree.flatten(method.merged_params(state.trainable, state.frozen))
    assert before.keys() == after.keys()
    changed = {p for p in before if not np.array_equal(np.asarray(after[p]), before[p])}
    assert changed == {"classifier/bias", "classifier/kernel"}
    # BatchNorm statistics still update in training mode (the weights stay frozen)
    stats = tree.flatten(state.model_state)
    old = tree.flatten(pretrained.model_state)
    assert all(not np.array_equal(np.asarray(stats[p]), old[p]) for p in old)
