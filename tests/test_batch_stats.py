"""Models with BatchNorm: batch statistics travel in the state, checkpoints and pretrained runs."""

import jax
import numpy as np

from ftlab import checkpoint, tree
from ftlab.data import load_dataset
from ftlab.models import build_model
from ftlab.train.loop import init_variables, train
from tests.conftest import tiny_config
from tests.test_train import final_state

RESNET = {"model.name": "resnet", "model.features": (8, 16), "model.depths": (1, 1)}


def test_resnet_trains_and_updates_batch_stats(tmp_path):
    cfg = tiny_config(**RESNET, **{"train.num_steps": 30, "optim.lr": 1e-2})
    summary = train(cfg, tmp_path)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_outputs, np.float32)
    fresh = model.init(jax.random.key(0), data.train.inputs[:1])
    state, _, _ = final_state(tmp_path, cfg)
    stats = tree.flatten(state.model_state)
    assert stats and all(p.startswith("batch_stats/") for p in stats)
    init_stats = tree.flatten({"batch_stats": fresh["batch_stats"]})
    assert set(stats) == set(init_stats)
    moved = [p for p in stats if not np.allclose(stats[p], init_stats[p])]
    assert len(moved) == len(stats), "every running mean/var is updated in training"
    assert summary["test"]["accuracy"] > 0.5  # 5 classes: well above chance after 30 steps
    saved = tree.flatten(checkpoint.load_pytree(tmp_path / "model_state"))
    for path, value in saved.items():  # the exported statistics are the final ones
        np.testing.assert_array_equal(value, stats[path])


def test_pretrained_batch_stats_come_with_the_parameters(tmp_path):
    pre = tiny_config(**RESNET, **{"train.num_steps": 10})
    train(pre, tmp_path / "pre")
    ft = tiny_config(
        **RESNET,
        **{
            "init.checkpoint": str(tmp_path / "pre" / "params"),
            "init.reinit": ("classifier/",),
            "method.name": "frozen",
            "method.trainable": ("classifier/",),
        },
    )
    data = load_dataset(ft.data)
    model = build_model(ft.model, data.num_outputs, np.float32)
    params, model_state = init_variables(ft, model, data.train.inputs[:1])
    saved = tree.flatten(checkpoint.load_pytree(tmp_path / "pre" / "model_state"))
    loaded = tree.flatten(model_state)
    assert set(saved) == set(loaded)
    for path in saved:
        np.testing.assert_array_equal(loaded[path], saved[path], err_msg=path)
    saved_params = tree.flatten(checkpoint.load_pytree(tmp_path / "pre" / "params"))
    flat = tree.flatten(params)
    np.testing.assert_array_equal(flat["stem_conv/kernel"], saved_params["stem_conv/kernel"])
    assert not np.array_equal(flat["classifier/kernel"], saved_params["classifier/kernel"])
