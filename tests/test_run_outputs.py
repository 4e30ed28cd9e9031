"""What a run leaves besides checkpoints: the before-training scores, speed, the data report,
its log, the fit verdict, lineage when it starts from another run, and a finished run left
alone; causal-LM token accuracy against the model's own logits."""

import json

import jax
import numpy as np
import pytest

from ftlab.config import ConfigError, apply_overrides, load_config
from ftlab.train.loop import build, train
from tests.conftest import tiny_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("first")
    cfg = tiny_config(**{"train.num_steps": 10, "eval.label_issues": True})
    return cfg, workdir, train(cfg, workdir)


def test_summary_has_before_speed_and_task(first):
    _cfg, workdir, _summary = first
    saved = json.loads((workdir / "summary.json").read_text())
    assert saved["task"] == "classification" and len(saved["class_names"]) == 5
    assert saved["examples_per_sec"] > 0 and saved["tokens_per_sec"] is None
    assert saved["peak_memory_bytes"] is None  # CPU reports no device memory
    # the starting model (random init here) was scored before any step: near chance
    before = saved["before"]
    assert set(before) == {"val", "test"}
    assert before["test"]["accuracy"] < saved["test"]["accuracy"]
    assert before["val"]["loss"] > saved["val"]["loss"]
    first_record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert first_record["step"] == 0 and "before_val/loss" in first_record
    assert saved["verdict"]["verdict"] in ("overfitting", "underfitting", "fine", "unknown")
    assert saved["environment"]["packages"]["jax"] == jax.__version__


def test_log_and_data_report_are_written(first):
    _, workdir, summary = first
    log_text = (workdir / "log.txt").read_text()
    assert "before training" in log_text and "done:" in log_text
    report = json.loads((workdir / "data_report.json").read_text())
    assert report["splits"]["train"]["size"] > 0
    assert "cleaning" in report and report["rejected_rows"] == 0
    assert (workdir / "report.html").exists() and (workdir / "report.md").exists()
    rows = (workdir / "label_issues.csv").read_text().splitlines()
    assert rows[0].startswith("index,given_label,suggested_label,self_confidence")
    assert len(rows) - 1 == summary["label_issues"]["flagged"] < summary["label_issues"]["of"]


def test_a_finished_run_is_left_alone(first):
    cfg, workdir, _summary = first
    files = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    again = train(cfg, workdir)
    assert again["test"] == json.loads((workdir / "summary.json").read_text())["test"]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == files


def test_refinetuning_from_a_run_directory_records_lineage(first, tmp_path):
    _, parent, parent_summary = first
    cfg = tiny_config(
        **{"train.num_steps": 3, "init.checkpoint": str(parent), "init.reinit": ("head/",)}
    )
    summary = train(cfg, tmp_path / "child")
    (entry,) = summary["lineage"]
    assert entry["run"] == str(parent.resolve())
    assert entry["scores"]["accuracy"] == parent_summary["test"]["accuracy"]
    grandchild = tiny_config(**{"train.num_steps": 3, "init.checkpoint": str(tmp_path / "child")})
    lineage = train(grandchild, tmp_path / "grandchild")["lineage"]
    assert [e["run"] for e in lineage] == [
        str((tmp_path / "child").resolve()),
        str(parent.resolve()),
    ]


def test_init_checkpoint_that_is_no_run_is_a_config_error(tmp_path):
    cfg = tiny_config(**{"init.checkpoint": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="init.checkpoint"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_causal_lm_token_accuracy_and_perplexity_match_the_logits():
    """The eval step's token counts against argmax and cross-entropy of the full logits,
    with label smoothing on (perplexity must use the plain cross-entropy)."""
    cfg = load_config(str(ROOT / "configs" / "gpt2_e2e.py") + ":runlocal")
    cfg = apply_overrides(cfg, {"eval.generate_examples": 0, "train.label_smoothing": 0.1})
    run = build(cfg)
    result = run.evaluate(run.state, run.data.val)
    split = run.data.val
    logits = np.asarray(
        run.method.apply(
            run.model, run.state.trainable, run.state.frozen, split.inputs, train=False
        ),
        np.float64,
    )
    labels = split.labels
    mask = labels >= 0
    hits = (logits.argmax(-1) == labels) & mask
    assert result["token_accuracy"] == pytest.approx(hits.sum() / mask.sum(), abs=1e-12)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
    assert result["perplexity"] == pytest.approx(np.exp(nll[mask].mean()), rel=1e-5)
    assert result["loss"] > nll[mask].mean()  # the smoothed loss is larger than plain NLL


def test_a_run_saved_before_new_config_keys_still_resumes(first):
    """A config.json written by an older ftlab lacks keys added since; at their defaults they
    are no change (else every upgrade would refuse to resume)."""
    from ftlab.train.loop import _config_changes

    cfg, workdir, _ = first
    saved = json.loads((workdir / "config.json").read_text())
    del saved["eval"]["before_training"]  # as if written before the key existed
    old = workdir.parent / "old_config.json"
    old.write_text(json.dumps(saved))
    assert _config_changes(old, cfg) == []
    changed = apply_overrides(cfg, {"eval.before_training": False})
    assert _config_changes(old, changed) == ["eval.before_training"]
