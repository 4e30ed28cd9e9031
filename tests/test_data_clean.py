"""Cleaning and balancing on hand-built frames whose missing, duplicate, outlier, leaked and
malformed rows are known by construction; expected statistics come from numpy on the raw data."""

import json
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from ftlab.config import ConfigError
from ftlab.data.balance import class_weights, imbalance_report, resample
from ftlab.data.clean import (
    check_leakage,
    clean,
    handle_missing,
    map_labels,
    normalise,
    reject_malformed,
    remove_outliers,
    resize_images,
)
from ftlab.data.frames import DataError
from ftlab.data.splitting import make_splits, to_dataset

N = 40
MALFORMED_TRAIN = {43: "wrong type", 44: "empty text", 45: "wrong type"}


def _row(i, prefix="row", label=None):
    return {
        "text": f"{prefix} {i}",
        "features.a": (i % 10) / 10,
        "features.b": (i % 7) / 7,
        "label": label or ("pos" if i % 2 else "neg"),
    }


def dirty_splits():
    rows = [_row(i) for i in range(N)]
    rows += [
        {**_row(40), "features.a": np.nan},  # 40, 41: missing feature (imputable)
        {**_row(41), "features.a": np.nan},
        {**_row(42), "features.a": 0.5, "label": None},  # 42: missing label
        {**_row(43), "features.a": "abc"},  # 43: wrong type
        {**_row(44), "text": "   "},  # 44: empty text
        {**_row(45), "text": 42},  # 45: wrong type (text)
        dict(rows[0]),  # 46-48: exact duplicates of rows 0-2
        dict(rows[1]),
        dict(rows[2]),
        {**_row(49), "features.a": 1000.0},  # 49, 50: outliers
        {**_row(50), "features.a": 1000.0},
    ]
    train = pd.DataFrame(rows)
    val = pd.DataFrame([_row(i, "val") for i in range(10)])
    val.loc[0] = {**_row(10), "label": "pos"}  # leaked from train row 10, other label
    test = pd.DataFrame([_row(i, "test") for i in range(10)])
    test.loc[0] = _row(11)  # leaked from train row 11
    test.loc[5, "text"] = ""  # malformed in test
    return train, make_splits({"train": train, "val": val, "test": test})


def test_pipeline_counts_and_rejects_file(tmp_path):
    train, splits = dirty_splits()
    rejects = tmp_path / "logs" / "rejects.jsonl"
    cfg = {"missing": "median", "duplicates": True, "leakage": "remove", "outliers": "iqr"}
    cleaned, log = clean(splits, cfg, rejects_path=rejects)

    assert {k: log["malformed"][k] for k in ("train", "val", "test")} == {
        "train": 3,
        "val": 0,
        "test": 1,
    }
    assert log["malformed"]["reasons"] == {"wrong type": 2, "empty text": 2}
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    got = {(r["split"], r["row"], r["reason"].split(":")[0]) for r in lines}
    want = {("train", row, why) for row, why in MALFORMED_TRAIN.items()} | {
        ("test", 5, "empty text")
    }
    assert got == want and len(lines) == 4
    assert any(r["row"] == 43 and "'abc'" in r["reason"] for r in lines)

    kept_a = [
        float(v)
        for i, v in enumerate(train["features.a"])
        if i not in MALFORMED_TRAIN and not (isinstance(v, float) and math.isnan(v))
    ]
    assert log["missing"]["fill"]["features.a"] == pytest.approx(np.median(kept_a))
    assert log["missing"]["imputed"] == {"train": 2, "val": 0, "test": 0}
    assert log["missing"]["dropped"] == {"train": 1, "val": 0, "test": 0}
    assert log["duplicates"] == {"train": 3, "val": 0, "test": 0}
    assert (log["leakage"]["train_in_val"], log["leakage"]["train_in_test"]) == (1, 1)
    assert log["leakage"]["removed"] == {"train": 2, "val": 0}
    assert log["outliers"]["removed"] == {"train": 2}
    assert log["outliers"]["by_column"] == {"features.a": 2}
    assert cleaned.sizes() == {"train": 51 - 3 - 1 - 3 - 2 - 2, "val": 10, "test": 9}
    gone = {10, 11, 42, 46, 47, 48, 49, 50} | set(MALFORMED_TRAIN)
    assert set(cleaned.train.index) == set(range(51)) - gone
    assert log["label_map"]["class_names"] == ["neg", "pos"]
    assert cleaned.train["label"].tolist() == [
        ["neg", "pos"].index(v) for v in train.loc[cleaned.train.index, "label"]
    ]
    data = to_dataset(cleaned)
    assert data.train.inputs.shape == (40, 2) and data.class_names == ["neg", "pos"]


def test_missing_drop_and_impute_use_train_statistics():
    _, splits = dirty_splits()
    splits, _ = reject_malformed(splits)
    dropped, counts = handle_missing(splits, "drop")
    assert counts["dropped"] == {"train": 3, "val": 0, "test": 0}
    assert {40, 41, 42}.isdisjoint(dropped.train.index)

    val = splits.val.copy()
    val.loc[3, "features.b"] = np.nan
    train_b = splits.train["features.b"].to_numpy(float)
    imputed, counts = handle_missing(splits.replace(val=val), "mean")
    assert imputed.val.loc[3, "features.b"] == pytest.approx(np.nanmean(train_b))
    assert counts["imputed"]["val"] == 1


def test_leakage_error_names_the_counts():
    _, splits = dirty_splits()
    with pytest.raises(DataError) as e:
        check_leakage(splits, mode="error")
    assert "1 training rows also in val" in str(e.value) and "[10, 11]" in str(e.value)


def test_zscore_outliers_only_leave_train():
    values = [float(i) for i in range(20)] + [1000.0]
    train = pd.DataFrame({"features.x": values, "label": [0, 1] * 10 + [0]})
    val = pd.DataFrame({"features.x": [1.0, 1000.0], "label": [0, 1]})
    splits = make_splits({"train": train, "val": val, "test": val})
    mean, std = np.mean(values), np.std(values)
    assert (1000 - mean) / std > 3 > (19 - mean) / std  # the construction's premise
    out, counts = remove_outliers(splits, "zscore")
    assert counts["removed"] == {"train": 1} and 20 not in out.train.index
    assert len(out.val) == 2 and len(out.test) == 2


def test_unseen_label_names_split_row_and_value():
    _, splits = dirty_splits()
    splits, _ = reject_malformed(splits)
    splits, _ = handle_missing(splits, "drop")
    val = splits.val.copy()
    val.loc[7, "label"] = "neutral"
    with pytest.raises(DataError) as e:
        map_labels(splits.replace(val=val))
    message = str(e.value)
    assert "'val'" in message and "row 7" in message and "'neutral'" in message
    with pytest.raises(DataError, match="row 0"):
        map_labels(splits, "pos=1")  # train row 0 is 'neg'
    mapped, info = map_labels(splits, "pos=0,neg=1")
    assert info["class_names"] == ["pos", "neg"]
    assert mapped.train.loc[1, "label"] == 0 and mapped.train.loc[0, "label"] == 1


def test_standardise_uses_train_statistics():
    rng = np.random.default_rng(1)
    frames = {
        s: pd.DataFrame({"features": list(rng.normal(3, 2, (n, 4))), "label": [0] * n})
        for s, n in (("train", 30), ("val", 5), ("test", 5))
    }
    splits = make_splits(frames)
    out, stats = normalise(splits, "standardise")
    x_train = np.stack(frames["train"]["features"])
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    got_train = np.stack(out.train["features"])
    np.testing.assert_allclose(got_train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(got_train.std(axis=0), 1, atol=1e-4)
    want_val = (np.stack(frames["val"]["features"]) - mean) / std
    np.testing.assert_allclose(np.stack(out.val["features"]), want_val, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], mean)
    minmax, _ = normalise(splits, "minmax")
    got = np.stack(minmax.train["features"])
    assert got.min() == pytest.approx(0) and got.max() == pytest.approx(1)


def test_resize_and_image_normalise():
    rng = np.random.default_rng(2)
    shapes = [(6, 6, 3), (8, 5, 3), (4, 4, 3)]
    train = pd.DataFrame(
        {"image": [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes], "label": [0, 1, 0]}
    )
    test = pd.DataFrame({"image": [rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)], "label": [1]})
    splits = make_splits({"train": train, "val": test, "test": test})
    resized, counts = resize_images(splits, (4, 4))
    assert counts == {"train": 2, "val": 1, "test": 1}
    assert all(im.shape == (4, 4, 3) for im in resized.train["image"])
    pixels = np.stack(list(resized.train["image"])).reshape(-1, 3) / 255.0
    out, stats = normalise(resized, "image")
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), rtol=1e-5)
    raw_test = resized.test.for_final_evaluation()["image"].iloc[0] / 255.0
    got_test = out.test.for_final_evaluation()["image"].iloc[0]
    want = (raw_test - pixels.mean(axis=0)) / (pixels.std(axis=0) + 1e-6)
    np.testing.assert_allclose(got_test, want, rtol=1e-4, atol=1e-5)


def test_empty_after_cleaning_is_an_error():
    train = pd.DataFrame({"text": ["", " ", 3], "label": [0, 1, 0]})
    good = pd.DataFrame({"text": ["ok"], "label": [0]})
    splits = make_splits({"train": train, "val": good, "test": good})
    with pytest.raises(DataError, match="'malformed' removed every row of split 'train'"):
        clean(splits, {})


# -- balancing ---------------------------------------------------------------------------------


def imbalanced(counts=(60, 30, 10)):
    rng = np.random.default_rng(0)
    labels = np.concatenate([[c] * n for c, n in enumerate(counts)])
    centres = np.array([[0, 0], [5, 5], [10, 0]], float)
    x = centres[labels] + rng.normal(size=(len(labels), 2))
    train = pd.DataFrame({"features.u": x[:, 0], "features.v": x[:, 1], "label": labels})
    held = train.iloc[::10].copy()
    return make_splits({"train": train, "val": held, "test": held.copy()})


@pytest.mark.parametrize(
    "method, ratio, want",
    [
        ("oversample", 0.5, {0: 60, 1: 30, 2: 30}),
        ("oversample", 1.0, {0: 60, 1: 60, 2: 60}),
        ("undersample", 0.5, {0: 20, 1: 20, 2: 10}),
        ("smote", 1.0, {0: 60, 1: 60, 2: 60}),
    ],
)
def test_resampling_reaches_requested_ratio(method, ratio, want):
    splits = imbalanced()
    assert imbalance_report(splits)["imbalance_ratio"] == pytest.approx(6.0)
    out, report = resample(splits, method, ratio, seed=0)
    assert Counter(out.train["label"].tolist()) == want
    assert report["after"] == want and report["before"] == {0: 60, 1: 30, 2: 10}
    assert out.val is splits.val and out.test is splits.test


def test_smote_only_adds_training_rows_inside_each_class():
    splits = imbalanced()
    out, _ = resample(splits, "smote", 1.0, seed=0)
    original = out.train.loc[out.train.index >= 0]
    pd.testing.assert_frame_equal(original, splits.train)
    synthetic = out.train.loc[out.train.index < 0]
    assert len(synthetic) == 30 + 50
    for c in (1, 2):
        mine = splits.train[splits.train["label"] == c]
        new = synthetic[synthetic["label"] == c]
        for col in ("features.u", "features.v"):  # interpolations stay within the class's box
            assert new[col].between(mine[col].min(), mine[col].max()).all()
    assert out.val is splits.val and out.test is splits.test
    assert len(out.test) == len(splits.test) == 10


def test_balancing_refuses_anything_but_splits_and_bad_settings():
    splits = imbalanced()
    with pytest.raises(TypeError, match="Splits"):
        resample(splits.train, "oversample")
    with pytest.raises(TypeError, match="Splits"):
        resample(splits.val, "smote")
    with pytest.raises(ConfigError, match="balance.ratio"):
        resample(splits, "oversample", 1.5)
    with pytest.raises(ConfigError, match="k_neighbors"):
        resample(imbalanced((60, 30, 4)), "smote", 1.0, k_neighbors=5)


def test_class_weights_are_balanced_weights():
    splits = imbalanced()
    weights = class_weights(splits)
    np.testing.assert_allclose(weights, [100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)], rtol=1e-6)
    with pytest.raises(DataError, match=r"\[3\]"):
        class_weights(splits, num_classes=4)
