"""Optional cleaning steps over ``Splits``; each returns ``(splits, counts)`` for the run log.

``clean()`` runs the configured ones in this order: malformed rows -> missing values ->
duplicates -> cross-split leakage -> outliers -> label map -> image resize -> normalisation.
Every statistic (imputation values, outlier bounds, scaler and image statistics) is fitted on
the training split and applied unchanged to val and test. Outlier rows are removed from train
only: val and test keep the hard cases the model will meet. A step that empties a split that
had rows is an error.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftlab.config import ConfigError
from ftlab.data.frames import (
    FEATURE_PREFIX,
    TEXT_COLUMNS,
    DataError,
    decode_image,
    feature_columns,
    feature_matrix,
    fingerprints,
    input_columns,
    scalar_feature_columns,
    set_feature_matrix,
    spec_get,
)
from ftlab.data.splitting import Splits
from ftlab.data.tables import parse_mapping

MISSING = ("drop", "mean", "median", "most_frequent")
LEAKAGE = ("remove", "error")
OUTLIERS = ("zscore", "iqr")
NORMALISE = ("standardise", "minmax", "image")
SPLITS = ("train", "val", "test")


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _keep(frame: pd.DataFrame, drop: np.ndarray) -> pd.DataFrame:
    return frame.loc[~np.asarray(drop, bool)]


# -- malformed rows ----------------------------------------------------------------------------


def _check_cell(column: str, value: Any) -> tuple[str | None, Any]:
    """(reason it is malformed or None, the value to keep: decoded/converted)."""
    if _is_missing(value):
        return None, value  # the missing-value step decides
    if column in TEXT_COLUMNS:
        if not isinstance(value, str):
            return f"wrong type: {column} is {type(value).__name__}, not text", value
        if not value.strip():
            return f"empty {column}", value
    elif column == "image":
        try:
            return None, decode_image(value)
        except (ValueError, TypeError) as e:
            return f"undecodable image: {e}", value
    elif column == "features":
        try:
            arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            return "wrong type: features is not a numeric vector", value
        if not np.all(np.isfinite(arr)):
            return "non-finite value in features", value
        return None, arr
    elif column.startswith(FEATURE_PREFIX):
        try:
            return None, float(value)
        except (TypeError, ValueError):
            return f"wrong type: {column} value {value!r} is not a number", value
    return None, value


def _short(value: Any) -> str:
    if isinstance(value, Mapping) and "path" in value:
        value = value.get("path") or "<bytes>"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _row_id(index: Any) -> Any:
    return index.item() if isinstance(index, np.generic) else index


def reject_malformed(
    splits: Splits, rejects_path: str | Path | None = None
) -> tuple[Splits, dict[str, Any]]:
    """Skip rows with an undecodable image, a wrong-typed value or empty text; each goes to
    ``rejects_path`` (jsonl: split, row, column, reason, value). Images are decoded to arrays
    and ``features.*`` columns converted to floats on the way."""
    rejects: list[dict[str, Any]] = []
    counts: dict[str, Any] = {}

    def step(split: str, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        bad = np.zeros(len(frame), bool)
        for column in frame.columns:
            col = str(column)
            if not (
                col in TEXT_COLUMNS
                or col in ("image", "features")
                or col.startswith(FEATURE_PREFIX)
            ):
                continue
            values = frame[column].tolist()
            for i, value in enumerate(values):
                reason, kept = _check_cell(col, value)
                if reason is None:
                    values[i] = kept
                elif not bad[i]:
                    bad[i] = True
                    rejects.append(
                        {
                            "split": split,
                            "row": _row_id(frame.index[i]),
                            "column": col,
                            "reason": reason,
                            "value": _short(value),
                        }
                    )
            frame[column] = pd.Series(values, index=frame.index, dtype=object)
        kept = _keep(frame, bad)
        for col in scalar_feature_columns(kept):
            kept[col] = pd.to_numeric(kept[col])
        counts[split] = int(bad.sum())
        return kept

    splits = splits.map(step)
    counts["reasons"] = dict(Counter(r["reason"].split(":")[0] for r in rejects))
    counts["rejected"] = rejects  # the rows themselves, for a caller that writes them later
    if rejects_path is not None:
        path = Path(rejects_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for r in rejects:
                f.write(json.dumps(r, default=str) + "\n")
        counts["rejects_file"] = str(path)
    return splits, counts


# -- missing values ----------------------------------------------------------------------------


def handle_missing(splits: Splits, strategy: str = "drop") -> tuple[Splits, dict[str, Any]]:
    """``drop`` rows with a missing value, or impute numeric ``features.*`` columns with the
    training split's mean / median / most frequent value (``most_frequent`` also fills
    ``group`` and non-numeric feature columns). Rows still missing a value are dropped: a
    missing label, text or image is never invented."""
    if strategy not in MISSING:
        raise ConfigError(f"config.data.clean.missing: {strategy!r} is not one of {MISSING}")
    train = splits.train
    imputable = []
    if strategy != "drop":
        for c in scalar_feature_columns(train):
            if pd.api.types.is_numeric_dtype(train[c]) or strategy == "most_frequent":
                imputable.append(c)
        if strategy == "most_frequent" and "group" in train.columns:
            imputable.append("group")
    fill: dict[str, Any] = {}
    for c in imputable:
        present = train[c].dropna()
        if present.empty:
            raise DataError(f"column {c!r} has no values in the training split to impute from")
        if strategy == "mean":
            fill[c] = float(present.mean())
        elif strategy == "median":
            fill[c] = float(present.median())
        else:
            value = present.mode().iloc[0]
            fill[c] = value.item() if isinstance(value, np.generic) else value
    counts: dict[str, Any] = {"strategy": strategy, "imputed": {}, "dropped": {}, "fill": fill}

    def step(split: str, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        counts["imputed"][split] = int(sum(frame[c].isna().sum() for c in fill))
        for c, value in fill.items():
            frame[c] = frame[c].fillna(value)
        missing = frame.map(_is_missing).any(axis=1).to_numpy() if len(frame) else np.zeros(0, bool)
        counts["dropped"][split] = int(missing.sum())
        return _keep(frame, missing)

    return splits.map(step), counts


# -- duplicates and leakage --------------------------------------------------------------------


def drop_duplicates(splits: Splits) -> tuple[Splits, dict[str, int]]:
    """Remove exact duplicate rows (all columns) within each split, keeping the first."""
    counts = {}

    def step(split: str, frame: pd.DataFrame) -> pd.DataFrame:
        dup = pd.Series(fingerprints(frame, frame.columns)).duplicated(keep="first").to_numpy()
        counts[split] = int(dup.sum())
        return _keep(frame, dup)

    return splits.map(step), counts


def check_leakage(
    splits: Splits, mode: str = "remove", columns: list[str] | None = None
) -> tuple[Splits, dict[str, Any]]:
    """Inputs shared across splits: ``remove`` them from train (and from val when in test),
    or raise (``error``). Compared on the input columns, so a copy with another label counts."""
    if mode not in LEAKAGE:
        raise ConfigError(f"config.data.clean.leakage: {mode!r} is not one of {LEAKAGE}")
    cols = list(columns or input_columns(splits.train))
    train_fp = fingerprints(splits.train, cols)
    val_fp = fingerprints(splits.val, cols)
    test_fp = splits.test.fingerprints(cols)
    in_val, in_test = np.isin(train_fp, val_fp), np.isin(train_fp, test_fp)
    val_in_test = np.isin(val_fp, test_fp)
    counts: dict[str, Any] = {
        "columns": cols,
        "train_in_val": int(in_val.sum()),
        "train_in_test": int(in_test.sum()),
        "val_in_test": int(val_in_test.sum()),
    }
    leaked = in_val | in_test
    if mode == "error" and (leaked.any() or val_in_test.any()):
        rows = [_row_id(r) for r in splits.train.index[leaked][:5]]
        raise DataError(
            f"leakage: {counts['train_in_val']} training rows also in val, "
            f"{counts['train_in_test']} also in test, {counts['val_in_test']} val rows in test "
            f"(compared on {cols}; first training rows: {rows}). Deduplicate the source or set "
            "config.data.clean.leakage='remove'"
        )
    counts["removed"] = {"train": int(leaked.sum()), "val": int(val_in_test.sum())}
    return (
        splits.replace(train=_keep(splits.train, leaked), val=_keep(splits.val, val_in_test)),
        counts,
    )


# -- outliers ----------------------------------------------------------------------------------


def _numeric_columns(frame: pd.DataFrame, columns: list[str] | None) -> list[str]:
    cols = list(columns) if columns else feature_columns(frame)
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise ConfigError(f"columns {missing} not in the data; it has {list(frame.columns)}")
    if not cols:
        raise ConfigError(
            "no numeric feature columns to work on; map them with config.data.columns "
            "(features=a+b, or features=*)"
        )
    return cols


def remove_outliers(
    splits: Splits, method: str = "zscore", threshold: float = 0.0, columns: list[str] | None = None
) -> tuple[Splits, dict[str, Any]]:
    """Drop training rows with any feature beyond ``threshold`` standard deviations (zscore,
    default 3) or ``threshold`` IQRs outside the quartiles (iqr, default 1.5). Val and test
    are left alone."""
    if method not in OUTLIERS:
        raise ConfigError(f"config.data.clean.outliers: {method!r} is not one of {OUTLIERS}")
    threshold = threshold or (3.0 if method == "zscore" else 1.5)
    cols = _numeric_columns(splits.train, columns)
    x, names = feature_matrix(splits.train, cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        if method == "zscore":
            mean, std = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
            z = np.abs(x - mean) / np.where(std > 0, std, np.inf)
            flags = z > threshold
        else:
            q1, q3 = np.nanpercentile(x, 25, axis=0), np.nanpercentile(x, 75, axis=0)
            iqr = q3 - q1
            flags = (x < q1 - threshold * iqr) | (x > q3 + threshold * iqr)
    rows = flags.any(axis=1)
    counts = {
        "method": method,
        "threshold": threshold,
        "removed": {"train": int(rows.sum())},
        "by_column": {n: int(k) for n, k in zip(names, flags.sum(axis=0)) if k},
    }
    return splits.replace(train=_keep(splits.train, rows)), counts


# -- labels ------------------------------------------------------------------------------------

_ABSENT = object()


def map_labels(
    splits: Splits, mapping: Mapping[Any, int] | str | None = None
) -> tuple[Splits, dict[str, Any]]:
    """Labels to class indices 0..k-1: by ``mapping`` (``{"neg": 0, "pos": 1}`` or
    ``"neg=0,pos=1"``), by the source's class names, or by the sorted training labels. A label
    outside the mapping is an error naming its split, row and value."""
    if "label" not in splits.train.columns:
        raise ConfigError("config.data.columns: no 'label' column; map one, e.g. label=sentiment")
    train_labels = splits.train["label"].dropna()
    if mapping:
        parsed = parse_mapping(mapping, "clean.label_map")
        try:
            table = {k: int(v) for k, v in parsed.items()}
        except (TypeError, ValueError):
            raise ConfigError(
                f"config.data.clean.label_map: class indices must be integers, got {parsed}"
            ) from None
        names = [k for k, _ in sorted(table.items(), key=lambda kv: kv[1])]
        source = "config.data.clean.label_map"
    elif splits.label_names and pd.api.types.is_integer_dtype(train_labels):
        names = list(splits.label_names)
        table = {i: i for i in range(len(names))}
        source = f"the source's class names {names}"
    else:
        values = train_labels.unique().tolist()
        mixed = len({type(v) for v in values}) > 1
        values = sorted(values, key=str if mixed else None)
        table = {v: i for i, v in enumerate(values)}
        names = [str(v) for v in values]
        source = f"the training labels {names}"

    def lookup(value: Any) -> Any:
        found = table.get(value, _ABSENT)
        return table.get(str(value), _ABSENT) if found is _ABSENT else found

    def convert(split: str, frame: pd.DataFrame) -> pd.DataFrame:
        out = []
        for row, value in zip(frame.index, frame["label"].tolist()):
            index = lookup(value)
            if index is _ABSENT:
                raise DataError(
                    f"split {split!r} row {_row_id(row)}: label {value!r} is not among "
                    f"{source}; add it to config.data.clean.label_map or fix the row"
                )
            out.append(index)
        frame = frame.copy()
        frame["label"] = np.asarray(out, np.int64)
        return frame

    return splits.map(convert).replace(label_names=names), {"class_names": names}


# -- images ------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    if image.shape[:2] == (h, w):
        return image
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    channels = image[..., None] if image.ndim == 2 else image
    planes = [
        np.asarray(Image.fromarray(channels[..., k].astype(np.float32), mode="F").resize((w, h)))
        for k in range(channels.shape[-1])
    ]
    out = np.stack(planes, axis=-1).astype(image.dtype)
    return out[..., 0] if image.ndim == 2 else out


def resize_images(splits: Splits, size: tuple[int, int]) -> tuple[Splits, dict[str, int]]:
    """Every image to ``size`` = (height, width), bilinear."""
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"config.data.clean.image_size: expected (height, width), got {size}")
    counts = {}

    def step(split: str, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        images = [np.asarray(v) for v in frame["image"]]
        counts[split] = int(sum(im.shape[:2] != tuple(size) for im in images))
        frame["image"] = pd.Series(
            [_resize(im, tuple(size)) for im in images], index=frame.index, dtype=object
        )
        return frame

    return splits.map(step), counts


# -- normalisation -----------------------------------------------------------------------------


def _as_float_image(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return arr[..., None] if arr.ndim == 2 else arr


def normalise(
    splits: Splits,
    method: str = "standardise",
    columns: list[str] | None = None,
    image_mean: tuple[float, ...] = (),
    image_std: tuple[float, ...] = (),
) -> tuple[Splits, dict[str, Any]]:
    """Scale inputs with training statistics: ``standardise`` / ``minmax`` the feature columns
    (scikit-learn scalers), or ``image``: per-channel (x - mean) / std, images first put in
    [0, 1] when uint8, mean/std from train unless given (e.g. ImageNet's)."""
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    if method not in NORMALISE:
        raise ConfigError(f"config.data.clean.normalise: {method!r} is not one of {NORMALISE}")
    if method == "image":
        if "image" not in splits.train.columns:
            raise ConfigError("config.data.clean.normalise: 'image' needs an image column")
        if len(image_mean) != len(image_std):
            raise ConfigError("config.data.clean.image_std: needs as many values as image_mean")
        if image_mean:
            mean, std = np.asarray(image_mean, np.float32), np.asarray(image_std, np.float32)
        else:
            pixels = np.concatenate(
                [
                    _as_float_image(v).reshape(-1, _as_float_image(v).shape[-1])
                    for v in splits.train["image"]
                ]
            )
            mean, std = pixels.mean(axis=0), pixels.std(axis=0) + 1e-6

        def scale(split: str, frame: pd.DataFrame) -> pd.DataFrame:
            frame = frame.copy()
            frame["image"] = pd.Series(
                [(_as_float_image(v) - mean) / std for v in frame["image"]],
                index=frame.index,
                dtype=object,
            )
            return frame

        return splits.map(scale), {"method": method, "mean": mean.tolist(), "std": std.tolist()}

    cols = _numeric_columns(splits.train, columns)
    scaler = StandardScaler() if method == "standardise" else MinMaxScaler()
    scaler.fit(feature_matrix(splits.train, cols)[0])

    def apply(split: str, frame: pd.DataFrame) -> pd.DataFrame:
        if not len(frame):
            return frame
        return set_feature_matrix(frame, cols, scaler.transform(feature_matrix(frame, cols)[0]))

    stats = (
        {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()}
        if method == "standardise"
        else {"min": scaler.data_min_.tolist(), "max": scaler.data_max_.tolist()}
    )
    return splits.map(apply), {"method": method, "columns": cols, **stats}


# -- the configured pipeline -------------------------------------------------------------------


def _check_not_empty(step: str, before: Mapping[str, int], after: Mapping[str, int]) -> None:
    for split in SPLITS:
        if before[split] > 0 and after[split] == 0:
            raise DataError(
                f"cleaning step {step!r} removed every row of split {split!r} "
                f"({before[split]} rows before); see config.data.clean.{step}"
            )


def clean(
    splits: Splits,
    cfg: Any = None,
    *,
    rejects_path: str | Path | None = None,
    task: str = "auto",
) -> tuple[Splits, dict[str, Any]]:
    """Run the steps ``cfg`` (``config.data.clean``: dict or ConfigDict) turns on; returns the
    cleaned splits and ``{step: counts}`` for the run log. Labels are mapped to class indices
    for classification (``auto``: unless the label column is float, i.e. regression)."""
    if task == "auto":
        labels = splits.train["label"] if "label" in splits.train.columns else None
        floats = labels is not None and pd.api.types.is_float_dtype(labels)
        task = "regression" if floats or labels is None else "classification"
    c = lambda key, default: spec_get(cfg, key, default)
    steps = []
    if c("malformed", True):
        steps.append(("malformed", lambda s: reject_malformed(s, rejects_path)))
    if c("missing", "drop"):
        steps.append(("missing", lambda s: handle_missing(s, c("missing", "drop"))))
    if c("duplicates", True):
        steps.append(("duplicates", drop_duplicates))
    if c("leakage", "remove"):
        steps.append(("leakage", lambda s: check_leakage(s, c("leakage", "remove"))))
    if c("outliers", ""):
        steps.append(
            (
                "outliers",
                lambda s: remove_outliers(s, c("outliers", ""), c("outlier_threshold", 0.0)),
            )
        )
    if task == "classification":
        steps.append(("label_map", lambda s: map_labels(s, c("label_map", None) or None)))
    if c("image_size", ()):
        steps.append(("image_size", lambda s: resize_images(s, tuple(c("image_size", ())))))
    if c("normalise", ""):
        steps.append(
            (
                "normalise",
                lambda s: normalise(
                    s,
                    c("normalise", ""),
                    image_mean=tuple(c("image_mean", ())),
                    image_std=tuple(c("image_std", ())),
                ),
            )
        )
    if len(splits.train) == 0:
        raise DataError("the training split is empty before cleaning")
    log: dict[str, Any] = {}
    for name, step in steps:
        before = splits.sizes()
        splits, log[name] = step(splits)
        _check_not_empty(name, before, splits.sizes())
    log["sizes"] = splits.sizes()
    return splits, log
