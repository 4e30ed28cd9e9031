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


def test_a_multi_run_experiment_runs_into_a_url_and_commands_read_it(tmp_path, monkeypatch, capsys):
    """Stages and variants into a URL: the runs' files in the bucket, checkpoints and params
    straight there, a stage reference read from the bucket; a fresh machine resumes without
    retraining; ``ftlab eval`` and ``compare`` read the bucket's runs."""
    from ftlab.cli import main
    from ftlab.experiment import run_experiment

    remote = tmp_path / "bucket" / "exp"
    real = workdir_lib.is_remote
    monkeypatch.setattr(
        workdir_lib, "is_remote", lambda p: real(p) or os.fspath(p).startswith(str(remote))
    )
    monkeypatch.setenv("FTLAB_STAGE_DIR", str(tmp_path / "stage"))
    cfg = tiny_config(
        **{"train.num_steps": 6, "train.eval_every": 3, "checkpoint.every_steps": 3},
        stages=(("pre", {}),),
        variants=(("a", {"init.checkpoint": "stage:pre"}), ("b", {"optim.lr": 1e-3})),
    )
    results = run_experiment(cfg, str(remote))
    for run in ("pre", "a", "b"):
        for name in ("config.json", "summary.json", "metrics.jsonl", "report.html", "params"):
            assert (remote / run / name).exists(), (run, name)
        assert any((remote / run / "checkpoints" / "last").iterdir())
    stage = workdir_lib.Stage(str(remote)).local
    assert not any(stage.rglob("checkpoints")) and not any(stage.rglob("params"))
    for name in ("results.md", "results.json", "comparison.png", "report.html"):
        assert (remote / name).exists(), name
    saved = json.loads((remote / "results.json").read_text())
    assert [r["workdir"] for r in saved["a"]] == [f"{remote}/a"]
    lineage = json.loads((remote / "a" / "summary.json").read_text())["lineage"]
    assert lineage[0]["params"] == str(remote / "pre" / "params")  # read from the bucket

    summaries = sorted(remote.rglob("summary.json"))
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    shutil.rmtree(tmp_path / "stage")  # a fresh machine: the bucket is the only copy
    again = run_experiment(cfg, str(remote))
    assert [p.stat().st_mtime_ns for p in summaries] == mtimes  # nothing retrained
    assert again["a"][0]["test"] == results["a"][0]["test"]

    assert main(["eval", str(remote / "a"), "--split", "test"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["run"] == str(remote / "a")
    assert evaluated["metrics"] == results["a"][0]["test"]  # the bucket's best checkpoint
    assert [p.name for p in (remote / "a" / "eval").iterdir()] == ["test_best.json"]  # pushed
    assert main(["compare", str(remote / "a"), str(remote / "b")]) == 0
    table = capsys.readouterr().out
    assert "| a " in table and "| b " in table
