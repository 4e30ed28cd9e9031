"""Class balance of the training split: a report, resampling and loss weights.

Every function takes the whole ``Splits`` and only ever reads or replaces ``splits.train``;
val and test come back as the very same objects. So resampling cannot reach evaluation data
by construction, and passing a bare frame is refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from ftlab.config import ConfigError
from ftlab.data.frames import DataError, feature_columns, feature_matrix
from ftlab.data.splitting import Splits, imbalance_ratio, label_counts

METHODS = ("oversample", "undersample", "smote")


def _train(splits: Any) -> pd.DataFrame:
    if not isinstance(splits, Splits):
        raise TypeError(
            f"balancing takes the Splits (it changes only their training split), got "
            f"{type(splits).__name__}"
        )
    if "label" not in splits.train.columns:
        raise ConfigError("config.data.columns: balancing needs a 'label' column")
    return splits.train


def imbalance_report(splits: Splits) -> dict[str, Any]:
    """Training examples per class, and the largest over the smallest class count."""
    counts = label_counts(_train(splits)["label"])
    return {"counts": counts, "imbalance_ratio": imbalance_ratio(counts)}


def target_counts(counts: dict[Any, int], method: str, ratio: float) -> dict[Any, int]:
    """Per class count after resampling so that every class holds at least ``ratio`` times
    the largest one (oversample, smote), or no class more than the smallest over ``ratio``
    (undersample). ratio=1 balances fully."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"config.data.balance.ratio: must be in (0, 1], got {ratio}")
    if method == "undersample":
        cap = math.floor(min(counts.values()) / ratio)
        return {c: min(n, cap) for c, n in counts.items()}
    floor = math.ceil(ratio * max(counts.values()))
    return {c: max(n, floor) for c, n in counts.items()}


def _features_frame(train: pd.DataFrame, x: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Rows for new feature vectors, laid out as the training frame's feature columns."""
    out: dict[str, Any] = {}
    start = 0
    for c in feature_columns(train):
        if c == "features":
            width = len(np.asarray(train[c].iloc[0]).reshape(-1))
            out[c] = pd.Series(list(x[:, start : start + width].astype(np.float32)), dtype=object)
            start += width
        else:
            out[c] = x[:, start]
            start += 1
    out["label"] = labels
    return pd.DataFrame(out)


def _smote(
    train: pd.DataFrame, targets: dict[Any, int], seed: int, k_neighbors: int
) -> pd.DataFrame:
    from imblearn.over_sampling import SMOTE

    cols = feature_columns(train)
    if not cols:
        raise ConfigError(
            "config.data.balance.method: SMOTE interpolates feature vectors; this data has no "
            "feature columns (use 'oversample' for text or images)"
        )
    x, _ = feature_matrix(train, cols)
    if np.isnan(x).any():
        raise DataError("SMOTE needs complete features; set config.data.clean.missing first")
    y = train["label"].to_numpy()
    growing = [c for c, n in targets.items() if n > (y == c).sum()]
    smallest = min(int((y == c).sum()) for c in growing) if growing else 0
    if growing and k_neighbors >= smallest:
        raise ConfigError(
            f"config.data.balance.k_neighbors: {k_neighbors} neighbours asked for, but a class "
            f"to grow has only {smallest} training examples; use at most {smallest - 1}"
        )
    sampler = SMOTE(sampling_strategy=targets, k_neighbors=k_neighbors, random_state=seed)
    x_new, y_new = sampler.fit_resample(x, y)
    added = _features_frame(train, x_new[len(x) :], y_new[len(x) :])
    added.index = pd.RangeIndex(-1, -1 - len(added), -1)  # synthetic rows: negative index
    return pd.concat([train, added])


def resample(
    splits: Splits,
    method: str = "oversample",
    ratio: float = 1.0,
    seed: int = 0,
    k_neighbors: int = 5,
) -> tuple[Splits, dict[str, Any]]:
    """Resample the training split to ``ratio`` (see ``target_counts``): random over- or
    under-sampling of whole rows (any modality), or SMOTE on feature vectors (new rows get a
    negative index). Returns the new Splits and a before/after report."""
    from imblearn.over_sampling import RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    train = _train(splits)
    if method not in METHODS:
        raise ConfigError(f"config.data.balance.method: {method!r} is not one of {METHODS}")
    before = label_counts(train["label"])
    targets = target_counts(before, method, ratio)
    if method == "smote":
        new = _smote(train, targets, seed, k_neighbors)
    else:
        sampler_cls = RandomOverSampler if method == "oversample" else RandomUnderSampler
        sampler = sampler_cls(sampling_strategy=targets, random_state=seed)
        positions, _ = sampler.fit_resample(
            np.arange(len(train))[:, None], train["label"].to_numpy()
        )
        new = train.iloc[np.sort(positions[:, 0])]
    after = label_counts(new["label"])
    report = {
        "method": method,
        "ratio": ratio,
        "before": before,
        "after": after,
        "imbalance_before": imbalance_ratio(before),
        "imbalance_after": imbalance_ratio(after),
    }
    return splits.replace(train=new), report


def class_weights(splits: Splits, num_classes: int | None = None) -> np.ndarray:
    """'balanced' weights per class index for a weighted loss: n / (k * count), from the
    training labels (scikit-learn's compute_class_weight). Labels must be class indices."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = _train(splits)["label"].to_numpy()
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError("class weights need class indices; map the labels first (map_labels)")
    k = num_classes or len(splits.label_names or []) or int(labels.max()) + 1
    absent = sorted(set(range(k)) - set(labels.tolist()))
    if absent:
        raise DataError(f"class weights: classes {absent} have no training examples")
    weights = compute_class_weight("balanced", classes=np.arange(k), y=labels)
    return weights.astype(np.float32)
