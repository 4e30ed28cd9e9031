"""The trainer end to end on tiny digits runs: what trains, what stays frozen, resume,
early stopping, non-finite losses, gradient accumulation, full-split metrics."""

import json
import os
import signal

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from sklearn.linear_model import LinearRegression

from ftlab import checkpoint, tree
from ftlab.config import ConfigError
from ftlab.data import load_dataset
from ftlab.methods import build_method
from ftlab.models import build_model
from ftlab.train import losses, optim
from ftlab.train.loop import NonFiniteLossError, evaluate, train
from ftlab.train.state import TrainState
from ftlab.train.step import make_eval_step, make_train_step
from ftlab.train.writer import read_metrics
from tests.conftest import tiny_config

METHODS = {
    "full": {},
    "frozen": {"method.name": "frozen", "method.trainable": ("head/",)},
    "partial": {
        "method.name": "partial",
        "method.partial.last_k": 1,
        "method.trainable": ("head/",),
    },
    "bitfit": {"method.name": "bitfit", "method.trainable": ("head/",)},
    "lora": {
        "method.name": "lora",
        "method.trainable": ("head/",),
        "method.lora.targets": (r"block_\d+/kernel",),
        "method.lora.rank": 2,
        "method.lora.dropout": 0.1,
    },
}
DEFAULT_MODEL = {
    "model.features": (16, 32),
    "model.hidden": (64,),
}  # configs/digits_transfer.py's CNN


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The default CNN pretrained on digits 0-4, as in the default experiment."""
    workdir = tmp_path_factory.mktemp("pretrain")
    train(
        tiny_config(**DEFAULT_MODEL, **{"data.classes": (0, 1, 2, 3, 4), "train.num_steps": 60}),
        workdir,
    )
    return workdir / "params"


def fresh(cfg):
    """Data, model, method and a freshly initialised (trainable, frozen) split for ``cfg``."""
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_outputs, np.float32)
    variables = nn.meta.unbox(model.init(jax.random.key(cfg.seed), data.train.inputs[:1]))
    params = variables.pop("params")
    method = build_method(cfg.method, params)
    trainable, frozen = method.split(params, jax.random.key(0))
    return data, model, method, params, trainable, frozen, variables


def final_state(workdir, cfg):
    """The last checkpoint's state, restored with a freshly built target."""
    _, _, _, params, trainable, frozen, model_state = fresh(cfg)
    tx, _ = optim.optimizer(cfg.optim, cfg.train.num_steps)
    target = TrainState.create(trainable, frozen, tx, cfg.seed, model_state)
    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", save_every=cfg.checkpoint.every_steps)
    state, meta = ckpts.restore(target)
    ckpts.close()
    return state, meta, params


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_and_frozen_leaves_stay_bit_identical(tmp_path, name, pretrained):
    transfer = {
        "init.checkpoint": str(pretrained),
        "init.reinit": ("head/",),
        "train.num_steps": 40,
    }
    cfg = tiny_config(**DEFAULT_MODEL, **transfer, **{"optim.lr": 3e-2, **METHODS[name]})
    summary = train(cfg, tmp_path)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    first, last = records[0]["train/loss"], records[-1]["train/loss"]
    assert last < 0.8 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
    state, _, _ = final_state(tmp_path, cfg)
    # Frozen leaves: exactly the pretrained parameters they were loaded from.
    init_flat = tree.flatten(checkpoint.load_pytree(pretrained))
    for path, leaf in tree.flatten(state.frozen).items():
        np.testing.assert_array_equal(leaf, init_flat[path], err_msg=path)
    # Optimizer state covers the trainable leaves only: adam's mu and nu, one per trainable scalar.
    n_trainable = tree.count(state.trainable)
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in opt_leaves) == 2 * n_trainable
    assert summary["trainable_params"] == n_trainable
    if name != "full":
        assert n_trainable < summary["total_params"]
        assert tree.flatten(state.frozen), "a non-full method freezes something"


def test_exact_resume_after_ctrl_c_is_bit_identical(tmp_path):
    cfg = tiny_config(**{"model.dropout": 0.2, "train.num_steps": 20, "checkpoint.every_steps": 7})
    train(cfg, tmp_path / "straight")

    def ctrl_c_at_10(step):
        if step == 10:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by the loop

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", on_step=ctrl_c_at_10)
    _, meta, _ = final_state(tmp_path / "resumed", cfg)
    assert meta["step"] == 10  # Ctrl-C saved a checkpoint before exiting
    train(cfg, tmp_path / "resumed")
    a, _, _ = final_state(tmp_path / "straight", cfg)
    b, _, _ = final_state(tmp_path / "resumed", cfg)
    assert int(a.step) == int(b.step) == 20
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    summary_a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    summary_b = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary_a["test"] == summary_b["test"]


def test_early_stopping_restores_the_best_weights(tmp_path):
    # min_delta so large that no evaluation after the first counts as an improvement
    cfg = tiny_config(
        **{
            "train.num_steps": 60,
            "early_stopping.metric": "val/accuracy",
            "early_stopping.mode": "max",
            "early_stopping.patience": 2,
            "early_stopping.min_delta": 10.0,
        }
    )
    summary = train(cfg, tmp_path)
    assert summary["stopped_early"] and summary["steps"] == 15  # evals at 5 (best), 10, 15 (stop)
    assert summary["best_step"] == 5
    val_at = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if "val/loss" in r}
    assert summary["val"]["loss"] == pytest.approx(val_at[5]["val/loss"], rel=1e-6)
    assert summary["val"]["loss"] != pytest.approx(val_at[15]["val/loss"], rel=1e-6)


def _npz_with_nans(tmp_path, rows: int, nan_rows, seed: int, **overrides):
    """A tiny MLP config on random features in an .npz file, ``nan_rows`` set to NaN."""
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(rows, 6)).astype(np.float32)
    labels = (inputs[:, 0] > 0).astype(np.int64)
    inputs[nan_rows] = np.nan
    np.savez(tmp_path / "data.npz", inputs=inputs, labels=labels)
    return tiny_config(
        **{
            "data.source": "npz",
            "data.path": str(tmp_path / "data.npz"),
            "data.classes": (),
            "data.scale": 1.0,
            "model.name": "mlp",
            **overrides,
        }
    )


def test_non_finite_loss_stops_with_last_checkpoint_intact(tmp_path):
    # with shuffle off, the batches from step 9 on read rows 150 and after
    cfg = _npz_with_nans(
        tmp_path,
        200,
        slice(150, None),
        0,
        **{
            "data.val_fraction": 0.1,
            "data.test_fraction": 0.1,
            "data.shuffle": False,
            "data.stratify": False,
            # cleaning would drop the NaN rows; the trainer's guard must hold without it
            "data.clean.malformed": False,
            "data.clean.missing": "",
            "data.clean.duplicates": False,
            "data.clean.leakage": "",
            "train.num_steps": 30,
            "train.log_every": 1,
            "train.eval_every": 100,
            "checkpoint.every_steps": 4,
        },
    )
    data = load_dataset(cfg.data)
    first_bad = int(np.argmax(np.isnan(data.train.inputs).any(axis=1))) // cfg.train.batch_size
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss at step {first_bad + 1}"):
        train(cfg, tmp_path / "run")
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpts = checkpoint.Checkpoints(ckpt_dir, save_every=4)
    last = ckpts.latest_step()
    ckpts.close()
    assert last == (first_bad // 4) * 4 and last > 0
    state, _meta, _ = final_state(tmp_path / "run", cfg)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.trainable))
    assert not (tmp_path / "run" / "summary.json").exists()


def test_gradient_accumulation_matches_the_full_batch():
    data, model, method, _params, trainable, frozen, _ = fresh(tiny_config())
    tx = optax.sgd(0.1)
    loss = losses.per_example_loss("cross_entropy")
    batch = {"inputs": data.train.inputs[:16], "labels": data.train.labels[:16]}
    outs = []
    for accum in (1, 4):
        step = jax.jit(
            make_train_step(model, method, tx, optax.constant_schedule(0.1), loss, accum)
        )
        outs.append(step(TrainState.create(trainable, frozen, tx, 0), batch))
    (s1, m1), (s4, m4) = outs
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s4.trainable)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_metrics_cover_the_whole_split_not_the_last_batch():
    data, model, method, params, trainable, frozen, _ = fresh(tiny_config())
    state = TrainState.create(trainable, frozen, optax.sgd(0.1), 0)
    eval_step = jax.jit(make_eval_step(model, method, losses.per_example_loss("cross_entropy")))
    batched = evaluate(
        eval_step, state, data.val, data, batch_size=32
    )  # 32 does not divide the split
    assert len(data.val) % 32 != 0
    logits = model.apply({"params": params}, data.val.inputs)
    preds = np.asarray(logits).argmax(-1)
    assert batched["accuracy"] == pytest.approx(float(np.mean(preds == data.val.labels)))
    assert np.sum(batched["confusion_matrix"]) == len(data.val)
    ce = losses.per_example_loss("cross_entropy")(logits, {"labels": data.val.labels})
    assert batched["loss"] == pytest.approx(float(np.mean(ce)), rel=1e-5)


def test_regression_with_mse(tmp_path):
    cfg = tiny_config(
        **{
            "data.name": "diabetes",
            "data.classes": (),
            "data.scale": 0.0,
            "model.name": "mlp",
            "train.loss": "mse",
            "train.num_steps": 100,
            "train.eval_every": 10,
            "early_stopping.metric": "val/mse",
        }
    )
    summary = train(cfg, tmp_path)
    assert set(summary["test"]) >= {"mse", "mae", "loss"}
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r]
    # targets are standardised for training, so the loss starts near 1 (predicting the mean)
    assert records[-1]["train/loss"] < 0.7 * records[0]["train/loss"]
    # metrics are in the original units (disease progression, ~25..346), and the MLP is about as
    # good as scikit-learn's least-squares fit on the same split (an independent reference)
    data = load_dataset(cfg.data)
    test_targets = data.original_units(data.test.labels)
    reference = LinearRegression().fit(data.train.inputs, data.train.labels)
    reference_mse = float(
        np.mean((data.original_units(reference.predict(data.test.inputs)) - test_targets) ** 2)
    )
    baseline_mse = float(np.mean((test_targets - data.target_mean) ** 2))  # predict the mean
    assert summary["test"]["mse"] < min(1.15 * reference_mse, 0.85 * baseline_mse)
    assert baseline_mse > 1000  # really in original units, not standardised ones


def test_init_from_pretrained_checkpoint(tmp_path):
    cfg = tiny_config(**{"train.num_steps": 5})
    train(cfg, tmp_path / "pre")
    saved = tree.flatten(checkpoint.load_pytree(tmp_path / "pre" / "params"))
    ft = tiny_config(
        **{
            "train.num_steps": 5,
            "init.checkpoint": str(tmp_path / "pre" / "params"),
            "init.reinit": ("head/",),
            "method.name": "frozen",
            "method.trainable": ("head/",),
        }
    )
    train(ft, tmp_path / "ft")
    state, _, _ = final_state(tmp_path / "ft", ft)
    for path, leaf in tree.flatten(state.frozen).items():
        np.testing.assert_array_equal(leaf, saved[path], err_msg=path)
    bad = tiny_config(**{"init.checkpoint": str(tmp_path / "pre" / "params"), "model.hidden": (8,)})
    with pytest.raises(
        ConfigError, match=r"'block_2/(kernel|bias)' has shape .* add it to init.reinit"
    ):
        train(bad, tmp_path / "bad")


def test_workdir_with_a_different_config_is_refused(tmp_path):
    train(tiny_config(**{"train.num_steps": 5}), tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"different config \(changed: optim\.lr\)"):
        train(tiny_config(**{"train.num_steps": 5, "optim.lr": 0.5}), tmp_path)
    assert (tmp_path / "config.json").read_text() == before


def test_malformed_rows_are_skipped_and_listed_in_the_workdir(tmp_path):
    # three malformed rows (non-finite features)
    cfg = _npz_with_nans(
        tmp_path, 120, [3, 50, 90], 1, **{"train.num_steps": 4, "train.eval_every": 4}
    )
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").open()]
    assert sorted(r["row"] for r in rows) == [3, 50, 90]
    assert all("non-finite" in r["reason"] for r in rows)
    assert np.isfinite(summary["val"]["loss"])
