"""Tests for ftlab.eval.analysis: fairness, confusions, misclassified examples, environment."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from ftlab.eval.analysis import (
    environment,
    fairness_metrics,
    misclassified,
    most_confused_pairs,
    run_analysis,
    save_misclassified,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Group a: 4 positives (3 found), 6 examples of which 4 predicted positive.
# Group b: 2 positives (1 found), 4 examples of which 1 predicted positive.
#   P(pred=1): a 4/6, b 1/4 -> demographic parity difference 4/6 - 1/4 = 5/12
#   TPR:       a 3/4, b 1/2 -> equal opportunity difference 1/4
LABELS = np.array([1, 1, 1, 1, 0, 0, 1, 1, 0, 0])
PREDS = np.array([1, 1, 1, 0, 1, 0, 1, 0, 0, 0])
GROUPS = np.array(["a"] * 6 + ["b"] * 4)


def test_fairness_hand_computed():
    out = fairness_metrics(LABELS, PREDS, GROUPS, positive=1, threshold=0.3)
    assert out["demographic_parity_difference"] == pytest.approx(5 / 12)
    assert out["equal_opportunity_difference"] == pytest.approx(1 / 4)
    assert out["by_group"]["a"] == {
        "n": 6,
        "n_positive": 4,
        "positive_rate": pytest.approx(4 / 6),
        "true_positive_rate": pytest.approx(3 / 4),
    }
    assert out["by_group"]["b"]["positive_rate"] == pytest.approx(1 / 4)
    assert out["by_group"]["b"]["true_positive_rate"] == pytest.approx(1 / 2)
    assert out["flagged"] == ["demographic_parity_difference"]  # 1/4 is under 0.3
    low = fairness_metrics(LABELS, PREDS, GROUPS, threshold=0.1)["flagged"]
    assert low == ["demographic_parity_difference", "equal_opportunity_difference"]
    json.dumps(out)


def test_fairness_other_positive_class_and_missing_rates():
    # positive=0: a has 2 negatives (1 predicted 0), b has 2 (both predicted 0)
    out = fairness_metrics(LABELS, PREDS, GROUPS, positive=0)
    assert out["by_group"]["a"]["true_positive_rate"] == pytest.approx(1 / 2)
    assert out["equal_opportunity_difference"] == pytest.approx(1 / 2)
    # a group without positives has no TPR; with one group left there is no difference
    out = fairness_metrics([1, 1, 0, 0], [1, 0, 1, 0], ["a", "a", "b", "b"])
    assert out["by_group"]["b"]["true_positive_rate"] is None
    assert out["equal_opportunity_difference"] is None
    assert out["demographic_parity_difference"] == pytest.approx(0.0)
    assert out["flagged"] == []
    with pytest.raises(ValueError, match="same length"):
        fairness_metrics([1, 0], [1], ["a", "b"])


def test_most_confused_pairs():
    cm = [[5, 2, 0], [3, 4, 1], [0, 3, 6]]
    pairs = most_confused_pairs(cm, ["x", "y", "z"], k=3)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("y", "x", 3),  # ties on count go to the lower true class id
        ("z", "y", 3),
        ("x", "y", 2),
    ]
    assert pairs[0]["share_of_true"] == pytest.approx(3 / 8)
    assert pairs[1]["share_of_true"] == pytest.approx(3 / 9)
    assert most_confused_pairs(np.eye(3, dtype=int), ["x", "y", "z"]) == []
    with pytest.raises(ValueError, match="does not match"):
        most_confused_pairs(cm, ["x", "y"])


def test_misclassified_most_confident_first():
    labels = np.array([0, 1, 1, 0, 2])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # right
            [0.6, 0.3, 0.1],  # wrong, 0.6
            [0.1, 0.1, 0.8],  # wrong, 0.8
            [0.2, 0.7, 0.1],  # wrong, 0.7
            [0.1, 0.1, 0.8],  # right
        ]
    )
    assert misclassified(labels, probs) == [2, 3, 1]
    assert misclassified(labels, probs, k=2) == [2, 3]
    assert misclassified(labels, np.log(probs) + 3.0) == [2, 3, 1]  # logits work too


def _split(n: int = 20, classes: int = 3):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    probs = rng.dirichlet(np.ones(classes), n)
    return labels, probs, [f"c{i}" for i in range(classes)]


def test_save_misclassified_images_grid(tmp_path):
    labels, probs, names = _split()
    images = np.random.default_rng(1).normal(size=(20, 8, 8, 1))  # digits' (N, 8, 8, 1)
    out = save_misclassified(tmp_path, images, labels, probs, names)
    wrong = int(np.sum(probs.argmax(-1) != labels))
    assert out == {
        "count": wrong,
        "total": 20,
        "shown": min(16, wrong),
        "file": "misclassified.png",
    }
    assert (tmp_path / "misclassified.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "misclassified.jsonl").exists()


def test_save_misclassified_texts_jsonl(tmp_path):
    labels, probs, names = _split()
    token_ids = np.ones((20, 12), dtype=np.int32)  # not images, not readable
    texts = {"text": np.array([f"review {i} <b>" for i in range(20)], dtype=object)}
    out = save_misclassified(tmp_path, token_ids, labels, probs, names, texts, k=4)
    assert out["file"] == "misclassified.jsonl" and out["shown"] == 4
    rows = [
        json.loads(line) for line in (tmp_path / "misclassified.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4
    first = rows[0]
    assert set(first) == {"index", "true", "predicted", "confidence", "text"}
    assert first["text"] == f"review {first['index']} <b>"
    assert first["true"] == names[labels[first["index"]]]
    assert [r["confidence"] for r in rows] == sorted((r["confidence"] for r in rows), reverse=True)


def test_save_misclassified_nothing_wrong(tmp_path):
    labels = np.array([0, 1])
    out = save_misclassified(tmp_path, None, labels, np.eye(2), ["a", "b"])
    assert out == {"count": 0, "total": 2, "shown": 0, "file": None}
    assert not list(tmp_path.iterdir())


def test_run_analysis_binary_with_groups(tmp_path):
    probs = np.stack([1.0 - PREDS, PREDS], axis=-1) * 0.8 + 0.1  # argmax == PREDS
    features = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    out = run_analysis(tmp_path, "test", LABELS, probs, ["neg", "pos"], features, {"group": GROUPS})
    assert out["split"] == "test"
    assert out["fairness"]["demographic_parity_difference"] == pytest.approx(5 / 12)
    assert out["most_confused"][0] == {
        "true": "pos",
        "predicted": "neg",
        "count": 2,
        "share_of_true": pytest.approx(2 / 6),
    }
    assert out["misclassified"]["count"] == 3
    row = json.loads((tmp_path / "misclassified.jsonl").read_text().splitlines()[0])
    assert row["group"] in ("a", "b")
    json.dumps(out)
    # more than two classes: no fairness metrics
    labels, probs, names = _split()
    out = run_analysis(tmp_path / "multi", "val", labels, probs, names, None, groups=GROUPS)
    assert "fairness" not in out


def test_environment_is_jsonable_and_hostname_free():
    env = environment()
    for key in ("python", "platform", "packages", "backend", "devices", "process_count"):
        assert key in env
    assert env["packages"]["numpy"] == np.__version__
    assert env["device_count"] == sum(d["count"] for d in env["devices"])
    text = json.dumps(env)
    host = socket.gethostname()
    if len(host) > 4:
        assert host not in text
