"""Tests for ftlab.data.label_issues: confident learning finds labels flipped on purpose."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.datasets import load_digits

from ftlab.data.label_issues import (
    featurize,
    find_label_issues,
    out_of_fold_probs,
    write_label_issues,
)

NOISE_RATE = 0.1


def _flip(labels: np.ndarray, rate: float, num_classes: int, seed: int):
    """Labels with a random ``rate`` of them moved to another class, and which ones."""
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), size=int(rate * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return noisy, flipped


@pytest.mark.parametrize("seed", [0, 1])
def test_digits_flipped_labels_are_found(seed):
    images, labels = load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8, 1)  # as ftlab holds them: featurize flattens
    noisy, flipped = _flip(labels, NOISE_RATE, 10, seed)

    start = time.perf_counter()
    probs = out_of_fold_probs(images, noisy, 10, folds=3, seed=seed)
    issues = find_label_issues(probs, noisy)
    seconds = time.perf_counter() - start

    found = np.isin(issues["index"], flipped)
    precision = found.mean()
    recall = found.sum() / len(flipped)
    top = found[:50].mean()  # ranking: the least self-confident are the surest
    fixed = (issues["suggested_label"][found] == labels[issues["index"][found]]).mean()
    print(
        f"\nseed {seed}: {len(issues['index'])} flagged of {len(noisy)} ({len(flipped)} flipped): "
        f"precision {precision:.3f}, recall {recall:.3f}, top-50 precision {top:.3f}, "
        f"suggestion = true label on {fixed:.3f} of hits, {seconds:.2f} s"
    )
    assert precision > 0.5  # chance is the noise rate, 0.1
    assert recall > 0.5
    assert top >= precision - 0.05
    assert fixed > 0.9
    assert np.array_equal(issues["given_label"], noisy[issues["index"]])
    assert np.all(np.diff(issues["self_confidence"]) >= 0)
    assert probs.shape == (len(labels), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_confident_joint_rule_by_hand():
    probs = np.array(
        [
            [0.9, 0.1, 0.0],  # label 0, confidently 0
            [0.7, 0.3, 0.0],  # label 0, confidently 0
            [0.2, 0.8, 0.0],  # label 1, confidently 1
            [0.4, 0.6, 0.0],  # label 1, confidently 1
            [0.85, 0.1, 0.05],  # label 1, but p0 >= t0: flagged, suggest 0
            [0.5, 0.45, 0.05],  # label 0, no class clears its threshold: not counted
            [0.05, 0.5, 0.45],  # label 0, p1 >= t1 and p2 >= t2: the more probable, 1
            [0.0, 0.7, 0.3],  # label 2, p1 >= t1: flagged, suggest 1
            [0.0, 0.45, 0.55],  # label 2, confidently 2
        ]
    )
    labels = np.array([0, 0, 1, 1, 1, 0, 0, 2, 2])
    issues = find_label_issues(probs, labels)
    np.testing.assert_allclose(issues["thresholds"], [0.5375, 0.5, 0.425])
    assert issues["index"].tolist() == [6, 4, 7]  # self-confidence 0.05, 0.1, 0.3
    assert issues["given_label"].tolist() == [0, 1, 2]
    assert issues["suggested_label"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(issues["self_confidence"], [0.05, 0.1, 0.3])
    assert issues["confident_joint"].tolist() == [[2, 1, 0], [1, 2, 0], [0, 1, 1]]

    # A class nobody is labelled with has no threshold, so it is never suggested.
    absent = find_label_issues(probs[:7], labels[:7])
    assert absent["thresholds"][2] == np.inf
    assert 2 not in absent["suggested_label"]


def test_featurize():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    assert featurize(images).shape == (2, 48)
    assert featurize(images.astype(np.uint8)).shape == (2, 48)  # pixels, not tokens

    ids = np.array([[5, 2, 2, 0], [1, 1, 1, -100]])
    counts = featurize(ids)
    assert sp.issparse(counts) and counts.shape == (2, 6)
    assert counts.toarray().tolist() == [[1, 0, 2, 0, 0, 1], [0, 3, 0, 0, 0, 0]]

    masked = featurize({"input_ids": ids, "attention_mask": np.array([[1, 1, 1, 0]] * 2)})
    assert masked.toarray()[0].tolist() == [0, 0, 2, 0, 0, 1]  # the padding 0 is left out
    with pytest.raises(ValueError, match="input_ids"):
        featurize({"pixel_values": images})


def test_out_of_fold_probs_on_token_ids():
    """Token-id inputs: the class is which of two marker tokens a sequence holds."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 120)
    ids = rng.integers(10, 50, (120, 12))
    ids[:, 3] = np.where(labels == 0, 3, 4)
    probs = out_of_fold_probs({"input_ids": ids}, labels, num_classes=3, folds=3)
    assert probs.shape == (120, 3)
    assert np.all(probs[:, 2] == 0)  # class 2 never occurs
    assert (probs.argmax(axis=1) == labels).mean() > 0.95


def test_write_label_issues_csv(tmp_path):
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.95, 0.05]])
    labels = np.array([0, 0, 1, 1])
    issues = find_label_issues(probs, labels)
    assert issues["index"].tolist() == [3]

    path = write_label_issues(tmp_path, issues, ["cat", "dog"])
    assert path == tmp_path / "label_issues.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["index", "given_label", "suggested_label", "self_confidence"],
        ["3", "dog", "cat", "0.050000"],
    ]

    path = write_label_issues(tmp_path / "out" / "issues.csv", issues, None, ids=list("abcd"))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"index": "3", "id": "d", "given_label": "1", "suggested_label": "0",
         "self_confidence": "0.050000"}
    ]  # fmt: skip
