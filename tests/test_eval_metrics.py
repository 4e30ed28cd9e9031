"""Tests for ftlab.eval.metrics, plots and report (hand-computed expectations)."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from ftlab.eval.metrics import classification_metrics, regression_metrics, scalars
from ftlab.eval.plots import (
    plot_confusion_matrix,
    plot_curves,
    plot_history,
    split_history,
)
from ftlab.eval.report import markdown_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# 3 classes, 8 items; class 2 is never predicted.
LABELS = np.array([0, 0, 0, 1, 1, 1, 2, 2])
PREDS = np.array([0, 0, 1, 1, 1, 0, 1, 0])
# Hand calculation:
#   confusion (rows true, cols pred): [[2,1,0],[1,2,0],[1,1,0]]
#   accuracy = (2+2)/8 = 0.5
#   precision: c0 = 2/4, c1 = 2/4, c2 = 0 (never predicted -> zero_division=0)
#   recall:    c0 = 2/3, c1 = 2/3, c2 = 0/2
#   f1:        c0 = c1 = 2*(1/2)*(2/3)/(1/2+2/3) = 4/7, c2 = 0
#   macro: precision 1/3, recall 4/9, f1 8/21
EXPECTED_CM = [[2, 1, 0], [1, 2, 0], [1, 1, 0]]


def test_classification_metrics_hand_example():
    m = classification_metrics(LABELS, PREDS, num_classes=3)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == EXPECTED_CM
    assert all(type(x) is int for row in m["confusion_matrix"] for x in row)
    assert m["precision_per_class"] == pytest.approx([0.5, 0.5, 0.0])
    assert m["recall_per_class"] == pytest.approx([2 / 3, 2 / 3, 0.0])
    assert m["f1_per_class"] == pytest.approx([4 / 7, 4 / 7, 0.0])
    assert m["precision_macro"] == pytest.approx(1 / 3)
    assert m["recall_macro"] == pytest.approx(4 / 9)
    assert m["f1_macro"] == pytest.approx(8 / 21)
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert type(m[key]) is float


def test_classification_metrics_absent_class_counts_in_macro():
    # Class 3 appears in neither array; labels=range(4) must still include it.
    m = classification_metrics(LABELS.tolist(), PREDS.tolist(), num_classes=4)
    assert len(m["f1_per_class"]) == 4
    assert m["f1_per_class"][3] == 0.0
    assert m["confusion_matrix"] == [row + [0] for row in EXPECTED_CM] + [[0] * 4]
    assert m["f1_macro"] == pytest.approx((8 / 7) / 4)
    assert m["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("labels", "preds", "match"),
    [
        ([0, 1, 3], [0, 1, 2], r"labels must be in \[0, 3\)"),
        ([0, 1, 2], [0, -1, 2], r"preds must be in \[0, 3\)"),
        ([0, 1, 2], [0, 1], "same length"),
        ([0, 1, 2], [0.0, 1.5, 2.0], "integer"),
    ],
)
def test_classification_metrics_rejects_bad_input(labels, preds, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.array(labels), np.array(preds), num_classes=3)


def test_regression_metrics_hand_example():
    # errors: 0.5, 0, -1, 2 -> mse = (0.25+0+1+4)/4, mae = 3.5/4; targets' variance 1.25,
    # so R^2 = 1 - 1.3125 / 1.25 (worse than predicting the mean)
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.5, 2, 2, 6]))
    assert m == pytest.approx({"mse": 1.3125, "mae": 0.875, "r2": 1 - 1.3125 / 1.25})
    assert all(type(v) is float for v in m.values())
    with pytest.raises(ValueError, match="same length"):
        regression_metrics([1.0, 2.0], [1.0])


def test_scalars_drops_lists_and_prefixes():
    m = classification_metrics(LABELS, PREDS, num_classes=3)
    m["n"] = np.int64(8)
    m["flag"] = True
    out = scalars(m, prefix="val")
    assert out == pytest.approx(
        {
            "val/accuracy": 0.5,
            "val/precision_macro": 1 / 3,
            "val/recall_macro": 4 / 9,
            "val/f1_macro": 8 / 21,
            "val/n": 8.0,
        }
    )
    assert all(type(v) is float for v in out.values())
    assert set(scalars({"loss": np.float32(0.25), "cm": [[1]]})) == {"loss"}


def _assert_png(path, min_h: int, min_w: int) -> None:
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w


def test_plot_confusion_matrix_writes_png(tmp_path):
    out = plot_confusion_matrix(
        EXPECTED_CM, ["neg", "neu", "pos"], tmp_path / "sub" / "cm.png", title="cm"
    )
    assert out == tmp_path / "sub" / "cm.png"
    _assert_png(out, 200, 200)
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(EXPECTED_CM, ["a", "b"], tmp_path / "bad.png")


def test_plot_curves_writes_png(tmp_path):
    series = {"lora": [(0, 1.0), (10, 0.6), (20, 0.4)], "full": [(0, 1.1), (20, 0.3)]}
    out = plot_curves(series, tmp_path / "curves.png", title="loss", ylabel="loss")
    _assert_png(out, 200, 300)


RECORDS = [
    {"step": 10, "train/loss": 0.9, "train/lr": 1e-3, "train/examples_per_sec": 512.0},
    {"step": 20, "train/loss": 0.7, "train/lr": 9e-4},
    {"step": 20, "val/loss": 0.8, "val/accuracy": 0.6, "val/f1_macro": 0.5},
    {"step": 30, "train/loss": 0.5, "val/examples_per_sec": 900.0},
    {"step": 40, "val/loss": 0.6, "val/accuracy": 0.75},
]


def test_split_history_selects_keys():
    losses, metrics = split_history(RECORDS)
    assert losses == {
        "train/loss": [(10, 0.9), (20, 0.7), (30, 0.5)],
        "val/loss": [(20, 0.8), (40, 0.6)],
    }
    assert metrics == {
        "val/accuracy": [(20, 0.6), (40, 0.75)],
        "val/f1_macro": [(20, 0.5)],
    }


def test_plot_history_writes_png(tmp_path):
    out = plot_history(RECORDS, tmp_path / "history.png", title="run")
    _assert_png(out, 200, 600)
    # Only train records: right panel is empty but the plot must still render.
    out2 = plot_history(RECORDS[:2], tmp_path / "train_only.png")
    _assert_png(out2, 200, 600)


def test_markdown_table_formats_and_marks_missing():
    rows = [
        {"method": "lora", "params": 1234567, "acc": 0.91234},
        {"method": "full", "params": 110000000},
    ]
    cols = [("method", "Method", ""), ("params", "Params", ",d"), ("acc", "Acc", ".3f")]
    assert markdown_table(rows, cols) == (
        "| Method | Params | Acc |\n"
        "| --- | --- | --- |\n"
        "| lora | 1,234,567 | 0.912 |\n"
        "| full | 110,000,000 | – |\n"
    )
