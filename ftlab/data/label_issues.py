"""Likely mislabelled examples, by confident learning (Northcutt, Jiang & Chuang, JAIR 2021).

A label is suspect when a model that never saw the example is confident it belongs to another
class. "Never saw" matters: a model scores its own training examples as it was told to, so the
probabilities come from cross-validation (each example predicted by the fold that held it out).
"Confident" is per class: class j's threshold is the mean probability of j over the examples
labelled j, so classes the model is generally unsure of are not held to the bar of easy ones.

The model is deliberately simple (logistic regression on standardised pixels or token counts):
it only has to rank examples, and it runs in seconds on CPU before any fine-tuning.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

__all__ = [
    "LABEL_ISSUES_FILE",
    "featurize",
    "find_label_issues",
    "out_of_fold_probs",
    "write_label_issues",
]

LABEL_ISSUES_FILE = "label_issues.csv"
CSV_COLUMNS = ("index", "given_label", "suggested_label", "self_confidence")


def _token_counts(ids: np.ndarray, mask: np.ndarray | None = None) -> sp.csr_matrix:
    """Bag of tokens: (examples, vocabulary) counts; negative ids and masked positions dropped."""
    ids = np.asarray(ids)
    rows = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
    cols = ids.reshape(-1).astype(np.int64)
    keep = cols >= 0
    if mask is not None:
        keep &= np.asarray(mask).reshape(-1).astype(bool)
    vocab = int(cols[keep].max()) + 1 if keep.any() else 1
    counts = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])),
        shape=(ids.shape[0], vocab),
    )
    counts.sum_duplicates()
    return counts


def featurize(inputs: Any) -> np.ndarray | sp.csr_matrix:
    """Inputs as a 2-D feature matrix for a linear model.

    Integer 2-D arrays are token ids (padding and negative ids aside): bag-of-tokens counts,
    sparse. A dict with ``input_ids`` (and optionally ``attention_mask``, whose zeros are left
    out) is treated the same. Anything else (images, float features, uint8 pixels) is
    flattened per example to float32.
    """
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(
                f"dict inputs need an 'input_ids' entry to featurize, got keys {sorted(inputs)}"
            )
        return _token_counts(inputs["input_ids"], inputs.get("attention_mask"))
    if sp.issparse(inputs):
        return sp.csr_matrix(inputs)
    arr = np.asarray(inputs)
    if arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8:
        return _token_counts(arr)
    return arr.reshape(len(arr), -1).astype(np.float32)


def out_of_fold_probs(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    folds: int = 5,
    seed: int = 0,
    *,
    max_iter: int = 200,
    C: float = 1.0,
) -> np.ndarray:
    """(examples, num_classes) class probabilities, each row from a model not trained on it.

    Logistic regression on standardised features (``featurize`` is applied first, so raw
    images, token ids or BERT-style dicts are accepted), over stratified folds shuffled with
    ``seed``. A class absent from ``labels`` gets probability 0 throughout.
    """
    x = featurize(features)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if x.shape[0] != len(y):
        raise ValueError(f"features and labels differ in length: {x.shape[0]} vs {len(y)}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError("confident learning needs at least two classes among the labels")
    scaler = MaxAbsScaler() if sp.issparse(x) else StandardScaler()
    model = make_pipeline(scaler, LogisticRegression(C=C, max_iter=max_iter))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, x, y, cv=cv, method="predict_proba")
    out = np.zeros((len(y), num_classes), dtype=np.float64)
    out[:, present] = probs
    return out


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Examples off the diagonal of the confident joint, most suspect first.

    Class j's threshold t_j is the mean of p_j over examples labelled j. An example counts
    towards class j when p_j >= t_j, and, if several classes clear their thresholds, j is the
    most probable of them. It is flagged when that class is not its given label; the
    suggestion is that class. Flagged examples are ordered by self-confidence, the probability
    of the given label, lowest first.

    Returns arrays ``index``, ``given_label``, ``suggested_label``, ``self_confidence`` (one
    entry per flagged example), plus ``thresholds`` (per class) and ``confident_joint``
    (given x suggested counts over every example that cleared a threshold).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    n, k = probs.shape
    if len(labels) != n:
        raise ValueError(f"probs and labels differ in length: {n} vs {len(labels)}")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}) for probs with {k} columns")
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros(k)
    np.add.at(sums, labels, probs[np.arange(n), labels])
    # A class nobody is labelled with has no estimate of its threshold: never suggest it.
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    above = probs >= thresholds
    confident = above.any(axis=1)
    suggested = np.where(above, probs, -np.inf).argmax(axis=1)
    joint = np.zeros((k, k), dtype=np.int64)
    np.add.at(joint, (labels[confident], suggested[confident]), 1)
    self_confidence = probs[np.arange(n), labels]
    flagged = np.flatnonzero(confident & (suggested != labels))
    flagged = flagged[np.argsort(self_confidence[flagged], kind="stable")]
    return {
        "index": flagged,
        "given_label": labels[flagged],
        "suggested_label": suggested[flagged],
        "self_confidence": self_confidence[flagged],
        "thresholds": thresholds,
        "confident_joint": joint,
    }


def write_label_issues(
    path: str | Path,
    issues: Mapping[str, np.ndarray],
    class_names: Sequence[str] | None,
    ids: Sequence[Any] | None = None,
) -> Path:
    """Write the flagged examples as CSV, most suspect first; returns the file written.

    ``path`` is a file, or a directory to hold ``label_issues.csv``. Labels are written by
    name when ``class_names`` is given (else as ids). ``ids`` (one per example of the data
    that was checked, e.g. source row ids) adds an ``id`` column after ``index`` so a row can
    be found again outside ftlab.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LABEL_ISSUES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)

    def name(label: int) -> str:
        return str(class_names[label]) if class_names is not None else str(int(label))

    header = list(CSV_COLUMNS)
    if ids is not None:
        header.insert(1, "id")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, given, suggested, confidence in zip(
            issues["index"],
            issues["given_label"],
            issues["suggested_label"],
            issues["self_confidence"],
            strict=True,
        ):
            row = [int(i), name(given), name(suggested), f"{float(confidence):.6f}"]
            if ids is not None:
                row.insert(1, ids[int(i)])
            writer.writerow(row)
    return path
