"""Error analysis of one classification run, and the software it ran on.

A score says how often a model is wrong; these say where: which classes it mixes up, which
examples it gets wrong most confidently (often label noise), whether subgroups are treated
alike. ``run_analysis`` writes what needs a file and returns a JSON-able dict for summary.json.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.eval import metrics as metrics_lib
from ftlab.eval import plots

__all__ = [
    "environment",
    "fairness_metrics",
    "misclassified",
    "most_confused_pairs",
    "run_analysis",
    "save_misclassified",
]

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "numpy",
)
MAX_SHOWN = 16  # a 4x4 grid stays readable; more mistakes are counted, not shown
_TEXT_LIMIT = 500  # characters of a raw text column kept per misclassified example


def _spread(values: list[float]) -> float | None:
    """max - min, or None when fewer than two groups have the rate."""
    return max(values) - min(values) if len(values) >= 2 else None


def fairness_metrics(
    labels: Any, preds: Any, groups: Any, positive: int = 1, threshold: float = 0.1
) -> dict[str, Any]:
    """Group fairness of a binary classifier: demographic parity (does every group get the
    positive prediction equally often?) and equal opportunity (are the truly positive
    examples of every group found equally often, i.e. equal true-positive rates?).

    Each difference is max - min over groups (None when fewer than two groups have the rate:
    a group without positive examples has no TPR); ``flagged`` names those above
    ``threshold``.
    """
    labels = np.asarray(labels).reshape(-1)
    preds = np.asarray(preds).reshape(-1)
    groups = np.asarray(groups).reshape(-1).astype(str)
    if not len(labels) == len(preds) == len(groups):
        raise ValueError(
            f"labels, preds and groups must have the same length, got "
            f"{len(labels)}, {len(preds)} and {len(groups)}"
        )
    if not len(labels):
        raise ValueError("fairness_metrics needs at least one example")
    by_group: dict[str, dict[str, Any]] = {}
    for g in sorted(set(groups.tolist())):
        keep = groups == g
        predicted = preds[keep] == positive
        actual = labels[keep] == positive
        by_group[g] = {
            "n": int(keep.sum()),
            "n_positive": int(actual.sum()),
            "positive_rate": float(predicted.mean()),
            "true_positive_rate": float(predicted[actual].mean()) if actual.any() else None,
        }
    differences = {
        "demographic_parity_difference": _spread([r["positive_rate"] for r in by_group.values()]),
        "equal_opportunity_difference": _spread(
            [
                r["true_positive_rate"]
                for r in by_group.values()
                if r["true_positive_rate"] is not None
            ]
        ),
    }
    return {
        **differences,
        "by_group": by_group,
        "positive": int(positive),
        "threshold": float(threshold),
        "flagged": [k for k, v in differences.items() if v is not None and v > threshold],
    }


def most_confused_pairs(
    confusion_matrix: Any, class_names: list[str], k: int = 5
) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal cells of a confusion matrix (rows true, columns
    predicted): which true class is most often taken for which other one, and what share of
    the true class's examples that is. Ties go to the lower (true, predicted) ids."""
    cm = np.asarray(confusion_matrix)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {n} class names")
    totals = cm.sum(axis=1)
    cells = [(int(cm[i, j]), i, j) for i in range(n) for j in range(n) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [
        {
            "true": class_names[i],
            "predicted": class_names[j],
            "count": count,
            "share_of_true": count / float(totals[i]),
        }
        for count, i, j in cells[:k]
    ]


def _as_probs(scores: Any) -> np.ndarray:
    """Probabilities (N, C); logits are accepted and soft-maxed, so a caller can pass either."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"probs must be (examples, classes), got shape {arr.shape}")
    is_prob = np.all(arr >= 0) and np.allclose(arr.sum(-1), 1.0, atol=1e-3)
    if is_prob:
        return arr
    shifted = np.exp(arr - arr.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def misclassified(labels: Any, probs: Any, k: int = MAX_SHOWN) -> list[int]:
    """Indices of up to ``k`` wrong predictions, the most confident first: confident
    mistakes are the ones worth looking at (a mislabelled example, a systematic confusion),
    and a fixed order makes reruns comparable. Ties keep the split's order."""
    p = _as_probs(probs)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(p):
        raise ValueError(f"{len(labels)} labels but {len(p)} rows of probabilities")
    preds = p.argmax(-1)
    wrong = np.flatnonzero(preds != labels)
    confidence = p[wrong, preds[wrong]]
    order = np.argsort(-confidence, kind="stable")
    return [int(i) for i in wrong[order][:k]]


def _image_batch(inputs: Any) -> np.ndarray | None:
    """The inputs as a batch of images, or None: (N, H, W) or (N, H, W, 1|3|4) numeric
    arrays (digits are (N, 8, 8, 1)); token ids (N, L) and feature vectors are not images."""
    if isinstance(inputs, dict) or inputs is None:
        return None
    arr = np.asarray(inputs)
    if not np.issubdtype(arr.dtype, np.number) or arr.ndim not in (3, 4):
        return None
    if arr.ndim == 4 and arr.shape[-1] not in (1, 3, 4):
        return None
    return arr if min(arr.shape[1:3]) >= 4 else None


def _jsonable(value: Any) -> Any:
    """A numpy scalar or array element as plain JSON (text clipped to stay readable)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and len(value) > _TEXT_LIMIT:
        return value[:_TEXT_LIMIT] + "…"
    return value


def save_misclassified(
    out_dir: Path,
    inputs: Any,
    labels: Any,
    probs: Any,
    class_names: list[str],
    texts: dict[str, Any] | None = None,
    k: int = MAX_SHOWN,
) -> dict[str, Any]:
    """Write the ``k`` most confident mistakes where a person can read them:
    ``misclassified.png`` (a grid titled "true → pred (p)") when the inputs are images,
    else ``misclassified.jsonl`` with the raw ``texts`` columns (token ids alone are not
    readable; small feature vectors are kept). Returns ``{"count", "shown", "file"}``
    (``file`` None when nothing was wrong)."""
    p = _as_probs(probs)
    labels = np.asarray(labels).reshape(-1)
    preds = p.argmax(-1)
    count = int(np.sum(preds != labels))
    index = misclassified(labels, p, k)
    result: dict[str, Any] = {"count": count, "total": len(labels), "shown": len(index)}
    if not index:
        return {**result, "file": None}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    titles = [
        f"{class_names[labels[i]]} → {class_names[preds[i]]} ({p[i, preds[i]]:.2f})" for i in index
    ]
    images = _image_batch(inputs)
    if images is not None:
        plots.plot_image_grid(
            [images[i] for i in index],
            titles,
            out_dir / "misclassified.png",
            f"most confident mistakes ({len(index)} of {count})",
        )
        return {**result, "file": "misclassified.png"}
    features = None
    if not texts and not isinstance(inputs, dict) and inputs is not None:
        arr = np.asarray(inputs)
        if arr.ndim == 2 and arr.shape[1] <= 32 and np.issubdtype(arr.dtype, np.floating):
            features = arr
    with open(out_dir / "misclassified.jsonl", "w") as f:
        for i in index:
            row = {
                "index": i,
                "true": class_names[labels[i]],
                "predicted": class_names[preds[i]],
                "confidence": round(float(p[i, preds[i]]), 4),
            }
            row.update({name: _jsonable(col[i]) for name, col in (texts or {}).items()})
            if features is not None:
                row["inputs"] = [round(float(x), 4) for x in features[i]]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {**result, "file": "misclassified.jsonl"}


def run_analysis(
    workdir: Path,
    split_name: str,
    labels: Any,
    probs: Any,
    class_names: list[str],
    inputs: Any,
    texts: dict[str, Any] | None = None,
    groups: Any = None,
    fairness_threshold: float = 0.1,
) -> dict[str, Any]:
    """Most confused class pairs, misclassified examples (written to ``workdir``) and, for a
    binary task with a group column (``groups``, else ``texts["group"]``), fairness metrics,
    on one split; the dict is JSON-able, for ``summary["analysis"]``."""
    p = _as_probs(probs)
    labels = np.asarray(labels).reshape(-1)
    preds = p.argmax(-1)
    cm = metrics_lib.classification_metrics(labels, preds, len(class_names))["confusion_matrix"]
    texts = dict(texts or {})
    if groups is None:
        groups = texts.get("group")
    result: dict[str, Any] = {
        "split": split_name,
        "most_confused": most_confused_pairs(cm, class_names),
    }
    if len(class_names) == 2 and groups is not None:
        result["fairness"] = fairness_metrics(labels, preds, groups, 1, fairness_threshold)
    result["misclassified"] = save_misclassified(
        Path(workdir), inputs, labels, p, class_names, texts
    )
    return result


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Versions, platform and accelerators, so a result can be tied to what produced it
    (no hostname or user: reports get shared)."""
    import jax

    devices = jax.devices()
    kinds = Counter(d.device_kind for d in devices)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "backend": jax.default_backend(),
        "devices": [{"kind": kind, "count": n} for kind, n in sorted(kinds.items())],
        "device_count": len(devices),
        "process_count": jax.process_count(),
    }
