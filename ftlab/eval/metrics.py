"""Evaluation metrics computed on full (gathered) numpy arrays.

Metrics are computed once over the whole evaluation set rather than averaged
over batches, because macro precision/recall/F1 are not batch-decomposable.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from sklearn import metrics as skm

__all__ = ["classification_metrics", "group_metrics", "regression_metrics", "scalars"]


def _as_1d(values: Any) -> np.ndarray:
    """Flatten to 1-D so (N,) and (N, 1) inputs are treated alike."""
    arr = np.asarray(values)
    return arr.reshape(-1)


def _check_lengths(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    """Fail loudly instead of letting sklearn broadcast or truncate."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same length, got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{a_name} and {b_name} must not be empty")


def _as_class_ids(name: str, values: np.ndarray, num_classes: int) -> np.ndarray:
    """Validate class ids so out-of-range ids never silently drop out of the metrics."""
    if values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must be integer class ids, got dtype {values.dtype}")
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise ValueError(f"{name} must be integer class ids, got non-integer values")
        values = values.astype(np.int64)
    bad = (values < 0) | (values >= num_classes)
    if np.any(bad):
        idx = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} must be in [0, {num_classes}), "
            f"found {values[idx]!r} at index {idx} ({int(bad.sum())} out of range)"
        )
    return values


def classification_metrics(labels: Any, preds: Any, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro/per-class precision/recall/F1 and the confusion matrix.

    ``labels=range(num_classes)`` is passed to sklearn so per-class lists and the
    confusion matrix always have ``num_classes`` entries, even when some class is
    absent from both arrays; classes never predicted score 0 (``zero_division=0``).
    Confusion matrix rows are true classes, columns predicted classes.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    y_true = _as_1d(labels)
    y_pred = _as_1d(preds)
    _check_lengths("labels", y_true, "preds", y_pred)
    y_true = _as_class_ids("labels", y_true, num_classes)
    y_pred = _as_class_ids("preds", y_pred, num_classes)

    class_ids = list(range(num_classes))
    p, r, f1, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=class_ids, average=None, zero_division=0
    )
    p_m, r_m, f1_m, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=class_ids, average="macro", zero_division=0
    )
    cm = skm.confusion_matrix(y_true, y_pred, labels=class_ids)
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision_macro": float(p_m),
        "recall_macro": float(r_m),
        "f1_macro": float(f1_m),
        "precision_per_class": [float(x) for x in p],
        "recall_per_class": [float(x) for x in r],
        "f1_per_class": [float(x) for x in f1],
        "confusion_matrix": [[int(x) for x in row] for row in cm],
    }


def regression_metrics(targets: Any, preds: Any) -> dict[str, float]:
    """Mean squared and mean absolute error, and R^2 (1 - MSE / variance of the targets; 0 for
    predicting the mean), over the full evaluation set."""
    y_true = _as_1d(targets).astype(np.float64)
    y_pred = _as_1d(preds).astype(np.float64)
    _check_lengths("targets", y_true, "preds", y_pred)
    return {
        "mse": float(skm.mean_squared_error(y_true, y_pred)),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "r2": float(skm.r2_score(y_true, y_pred)) if len(y_true) > 1 else float("nan"),
    }


def _is_scalar_number(value: Any) -> bool:
    """True for python/numpy real scalars (incl. 0-d arrays), False for bools and lists."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):  # int, float, np.floating, np.integer
        return True
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return np.issubdtype(value.dtype, np.number) and value.dtype != np.bool_
    return False


def scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Keep only scalar entries (as floats) so a metrics dict can go to a logger.

    Lists such as per-class scores and the confusion matrix are dropped; bools
    are dropped too. With ``prefix`` keys become ``f"{prefix}/{key}"``.
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not _is_scalar_number(value):
            continue
        name = f"{prefix}/{key}" if prefix else str(key)
        out[name] = float(value)
    return out


def group_metrics(labels: Any, preds: Any, groups: Any, num_classes: int) -> dict[str, Any]:
    """Accuracy and macro F1 per subgroup (a ``group`` column: fairness checks), and the gap
    between the best and the worst group's accuracy."""
    labels, preds, groups = _as_1d(labels), _as_1d(preds), _as_1d(groups).astype(str)
    _check_lengths("labels", labels, "groups", groups)
    per_group: dict[str, dict[str, float]] = {}
    for g in sorted(set(groups.tolist())):
        keep = groups == g
        m = classification_metrics(labels[keep], preds[keep], num_classes)
        per_group[g] = {
            "n": int(keep.sum()),
            "accuracy": m["accuracy"],
            "f1_macro": m["f1_macro"],
        }
    accuracies = [v["accuracy"] for v in per_group.values()]
    return {"by_group": per_group, "group_accuracy_gap": max(accuracies) - min(accuracies)}
