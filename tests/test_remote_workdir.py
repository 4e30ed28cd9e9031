"""A URL workdir (gs://...) is staged locally (ftlab.workdir). Tested through the same code on
a local "remote": ``is_remote`` is told to treat one local directory as a URL."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from ftlab import checkpoint
from ftlab import workdir as workdir_lib
from ftlab.train.loop import train
from ftlab.train.writer import read_metrics
from tests.conftest import tiny_config


def test_a_staged_workdir_resumes_bit_exactly_and_holds_every_file(tmp_path, monkeypatch):
    remote = tmp_path / "bucket" / "run"
    real = workdir_lib.is_remote
    monkeypatch.setattr(
        workdir_lib, "is_remote", lambda p: real(p) or os.fspath(p).startswith(str(remote))
    )
    monkeypatch.setenv("FTLAB_STAGE_DIR", str(tmp_path / "stage"))
    cfg = tiny_config(**{"model.dropout": 0.2, "train.num_steps": 10})
    straight = train(cfg, tmp_path / "local")

    def ctrl_c_at_7(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: a forced save at step 7

    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(remote), on_step=ctrl_c_at_7)
    stage = workdir_lib.Stage(str(remote)).local
    assert stage.is_dir() and not (stage / "checkpoints").exists()  # checkpoints go direct
    assert {5, 7} <= {int(p.name) for p in (remote / "checkpoints" / "last").iterdir()}
    assert max(r["step"] for r in read_metrics(remote / "metrics.jsonl")) == 7  # pushed
    assert (remote / "config.json").exists() and (remote / "log.txt").exists()
    assert not (remote / "summary.json").exists()

    shutil.rmtree(tmp_path / "stage")  # a fresh machine: the remote is the only copy
    resumed = train(cfg, str(remote))
    for name in ("metrics.jsonl", "summary.json", "report.html", "learning_curves.png", "tb"):
        assert (remote / name).exists(), name
    assert "resumed from" in (remote / "log.txt").read_text()
    steps = [r["step"] for r in read_metrics(remote / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # each step once
    a = checkpoint.load_pytree(tmp_path / "local" / "params")
    b = checkpoint.load_pytree(remote / "params")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert resumed["test"] == straight["test"]
    assert json.loads((remote / "summary.json").read_text())["test"] == straight["test"]
    assert train(cfg, str(remote))["wall_time_s"] == resumed["wall_time_s"]  # finished: read


def test_a_multi_run_experiment_into_a_url_is_refused():
    from ftlab.config import ConfigError
    from ftlab.experiment import run_experiment

    cfg = tiny_config(variants=(("a", {}), ("b", {"optim.lr": 1e-3})))
    with pytest.raises(ConfigError, match="a URL workdir holds one run"):
        run_experiment(cfg, "gs://bucket/experiment")
