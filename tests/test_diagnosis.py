"""Tests for ftlab.eval.diagnosis on synthetic loss curves whose answer is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ftlab.eval.diagnosis import chance_loss, fit_verdict
from ftlab.train.writer import read_metrics

CHANCE = math.log(10)
STEPS = np.arange(0, 1001, 10)  # training loss logged every 10 steps
EVAL_EVERY = 50  # validation loss every 50 steps: 21 evaluations


def _records(train, val, eval_every: int = EVAL_EVERY) -> list[dict]:
    """metrics.jsonl rows as the loop writes them: train rows, and val rows at evaluations."""
    rows = []
    for s in STEPS:
        rows.append({"step": int(s), "train/loss": float(train(s)), "train/lr": 1e-3})
        if s > 0 and s % eval_every == 0:
            rows.append({"step": int(s), "val/loss": float(val(s)), "val/accuracy": 0.5})
    return rows


def _noisy(curve, scale: float, rng: np.random.Generator):
    return lambda s: curve(s) * (1 + scale * rng.standard_normal())


def _fine_train(s):
    return 0.08 + 2.2 * np.exp(-s / 120)


def _fine_val(s):
    return 0.2 + 2.1 * np.exp(-s / 100)


def _overfit_val(s, start: int = 400):
    return 0.25 + 2.0 * np.exp(-s / 80) + 0.0006 * max(0, s - start)


def _flat_high(s):
    return 2.2 + 0.1 * np.exp(-s / 50)


@pytest.mark.parametrize("seed", range(10))
def test_overfitting_found_near_its_start(seed):
    rng = np.random.default_rng(seed)
    records = _records(_noisy(_fine_train, 0.05, rng), _noisy(_overfit_val, 0.02, rng))
    result = fit_verdict(records, chance_loss=CHANCE)
    assert result["verdict"] == "overfitting", result
    assert abs(result["since_step"] - 400) <= 100, result
    assert "early_stopping.patience" in " ".join(result["remedies"])
    assert "optim.weight_decay" in " ".join(result["remedies"])
    assert "data.augment" in " ".join(result["remedies"])
    assert "step" in result["evidence"] and "%" in result["evidence"]


def test_overfitting_start_tracks_the_true_step():
    for start in (250, 500, 700):
        records = _records(_fine_train, lambda s, start=start: _overfit_val(s, start))
        result = fit_verdict(records, chance_loss=CHANCE)
        assert result["verdict"] == "overfitting"
        assert abs(result["since_step"] - start) <= EVAL_EVERY, (start, result)


def test_rising_val_with_flat_train_is_not_overfitting():
    """Validation loss that rises while training loss does not fall is not the classic
    over-fitting signature (train keeps improving on what val no longer rewards)."""
    records = _records(lambda s: 0.1, _overfit_val)
    assert fit_verdict(records, chance_loss=CHANCE)["verdict"] != "overfitting"


@pytest.mark.parametrize("chance", [CHANCE, None])
def test_underfitting_flat_and_high(chance):
    rng = np.random.default_rng(0)
    records = _records(_noisy(_flat_high, 0.03, rng), _noisy(lambda s: 2.25, 0.02, rng))
    result = fit_verdict(records, chance_loss=chance)
    assert result["verdict"] == "underfitting", result
    assert result["since_step"] is None
    remedies = " ".join(result["remedies"])
    for key in ("train.num_steps", "optim.lr", "method.lora.rank"):
        assert key in remedies
    # A flat curve: more steps is not the first thing to try.
    assert "optim.lr" in result["remedies"][0]


def test_underfitting_still_falling_puts_train_longer_first():
    records = _records(lambda s: CHANCE - 0.0006 * s, lambda s: CHANCE - 0.0005 * s)
    result = fit_verdict(records, chance_loss=CHANCE)
    assert result["verdict"] == "underfitting", result
    assert "still falling" in result["evidence"]
    assert "train.num_steps" in result["remedies"][0]


def test_unknown_chance_judges_by_progress_from_start():
    # Fell from 5.0 to ~1.0: clearly learning, even though we cannot compare it to chance.
    records = _records(lambda s: 1.0 + 4.0 * np.exp(-s / 100), lambda s: 1.2 + 4 * np.exp(-s / 90))
    assert fit_verdict(records, chance_loss=None)["verdict"] == "fine"


@pytest.mark.parametrize("seed", range(20))
def test_noisy_fine_curve_not_flagged(seed):
    rng = np.random.default_rng(100 + seed)
    records = _records(_noisy(_fine_train, 0.15, rng), _noisy(_fine_val, 0.05, rng))
    result = fit_verdict(records, chance_loss=CHANCE)
    assert result["verdict"] == "fine", result
    assert result["since_step"] is None and result["remedies"] == []


def test_too_few_evaluations_is_unknown():
    records = _records(_fine_train, _overfit_val, eval_every=400)  # steps 400 and 800 only
    result = fit_verdict(records, chance_loss=CHANCE)
    assert result["verdict"] == "unknown"
    assert "2" in result["evidence"]
    assert fit_verdict([], chance_loss=None)["verdict"] == "unknown"


def test_non_finite_and_unordered_rows(tmp_path):
    """Rows read back from metrics.jsonl, shuffled, with a NaN: the verdict does not change,
    and the result is JSON-able."""
    records = _records(_fine_train, _overfit_val)
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    records = read_metrics(path)
    records.append({"step": 505, "train/loss": float("nan")})
    np.random.default_rng(0).shuffle(records)
    result = fit_verdict(records, chance_loss=CHANCE)
    assert result["verdict"] == "overfitting"
    assert json.loads(json.dumps(result)) == result
    assert type(result["since_step"]) is int


def test_chance_loss():
    assert chance_loss("classification", 10) == pytest.approx(math.log(10))
    assert chance_loss("regression") == 1.0
    assert chance_loss("causal_lm") is None
    assert chance_loss("classification", None) is None
