"""PNG plots for evaluation results and training histories.

The Agg backend is selected before pyplot is imported so plotting works on
headless training hosts; every figure is closed so long runs don't leak memory.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "plot_confusion_matrix",
    "plot_curves",
    "plot_history",
    "plot_image_grid",
    "split_history",
]

Series = dict[str, list[tuple[int, float]]]

# Keys that are not quality metrics and would squash the metric axis.
_SKIP_SUFFIXES = ("/lr", "/learning_rate", "_per_sec", "/step_time", "/time")


def _save(fig: Any, path: str | Path) -> Path:
    """Save a figure as PNG (creating parent dirs) and always close it."""
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out


def plot_confusion_matrix(
    cm: Any, class_names: list[str], path: str | Path, title: str = ""
) -> Path:
    """Heatmap of a confusion matrix (rows true, cols predicted) annotated with counts."""
    mat = np.asarray(cm)
    n = len(class_names)
    if mat.shape != (n, n):
        raise ValueError(f"confusion matrix shape {mat.shape} does not match {n} class names")
    size = max(4.0, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        im = ax.imshow(mat, cmap="Blues", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), labels=class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title)
        vmax = float(mat.max()) if mat.size else 0.0
        for i in range(n):
            for j in range(n):
                value = mat[i, j]
                text = f"{int(value)}" if float(value).is_integer() else f"{value:.2f}"
                dark = vmax > 0 and float(value) > vmax / 2
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    color="white" if dark else "black",
                )
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)


def _draw_series(ax: Any, series: Series) -> int:
    """Draw each non-empty series sorted by x; return how many were drawn."""
    drawn = 0
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points, key=lambda p: p[0]))
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=name)
        drawn += 1
    if drawn:
        ax.legend()
    return drawn


def plot_curves(
    series: dict[str, list[tuple[int, float]]],
    path: str | Path,
    title: str,
    ylabel: str,
    xlabel: str = "step",
) -> Path:
    """One line per named series of (step, value) points, with a legend."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        _draw_series(ax, series)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)


def _is_plottable(value: Any) -> bool:
    """Finite real scalars only (no bools, lists, None or NaN)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(float(value))


def split_history(records: Sequence[dict[str, Any]]) -> tuple[Series, Series]:
    """Split metric records into (loss series, other val/* metric series).

    Losses are keys ending in "/loss"; metrics are the remaining "val/..." keys
    except learning-rate and throughput keys. A key absent from a record was not
    logged at that step; keys without any finite point are dropped.
    """
    losses: Series = {}
    metrics: Series = {}
    for rec in records:
        if "step" not in rec:
            continue
        step = int(rec["step"])
        for key, value in rec.items():
            if key == "step" or not _is_plottable(value):
                continue
            if key.endswith("/loss"):
                losses.setdefault(key, []).append((step, float(value)))
            elif key.startswith("val/") and not key.endswith(_SKIP_SUFFIXES):
                metrics.setdefault(key, []).append((step, float(value)))
    return losses, metrics


def plot_history(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels from JSON-lines metric records: losses (left), val metrics (right)."""
    losses, metrics = split_history(records)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        for ax, series, name, ylabel in (
            (ax_loss, losses, "loss", "loss"),
            (ax_metric, metrics, "validation metrics", "value"),
        ):
            if not _draw_series(ax, series):
                ax.text(
                    0.5,
                    0.5,
                    f"no {name} logged",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        if title:
            fig.suptitle(title)
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)


def _displayable(image: Any) -> tuple[np.ndarray, str | None]:
    """(H, W) or (H, W, C) -> an array imshow draws as-is, and a colormap for one channel.

    Inputs are usually normalised (mean/std) floats, so each image is rescaled to [0, 1] on
    its own range: the grid shows shapes, not absolute intensities.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[-1] not in (3, 4):
        raise ValueError(f"an image must be (H, W) or (H, W, 1|3|4), got {img.shape}")
    img = np.nan_to_num(img)
    low, high = float(img.min()), float(img.max())
    img = (img - low) / (high - low) if high > low else np.zeros_like(img)
    return img, ("gray_r" if img.ndim == 2 else None)


def plot_image_grid(
    images: Sequence[Any], titles: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """A grid of images (4 per row) with a small title over each, e.g. misclassified
    examples labelled "true → pred (p)"."""
    if len(images) != len(titles):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if not len(images):
        raise ValueError("plot_image_grid needs at least one image")
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for ax, image, name in zip(axes.flat, images, titles):
            img, cmap = _displayable(image)
            ax.imshow(img, cmap=cmap, interpolation="nearest")
            ax.set_title(name, fontsize=8)
        if title:
            fig.suptitle(title)
    except BaseException:
        plt.close(fig)
        raise
    return _save(fig, path)
