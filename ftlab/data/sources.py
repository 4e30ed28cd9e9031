"""Raw arrays from where the data lives: scikit-learn's bundled sets or a local ``.npz``.

(The data issue adds HF datasets, TFDS and files; they all end as (inputs, labels).)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ftlab.config import ConfigError

SKLEARN_SETS = {
    # name: (loader name, task)
    "digits": ("load_digits", "classification"),
    "breast_cancer": ("load_breast_cancer", "classification"),
    "wine": ("load_wine", "classification"),
    "iris": ("load_iris", "classification"),
    "diabetes": ("load_diabetes", "regression"),
}


@dataclasses.dataclass
class RawData:
    inputs: np.ndarray
    labels: np.ndarray
    task: str  # classification | regression
    class_names: list[str]


def from_sklearn(name: str) -> RawData:
    """One of scikit-learn's bundled sets (shipped in its wheel: works offline)."""
    if name not in SKLEARN_SETS:
        raise ConfigError(
            f"config.data.name: unknown scikit-learn set {name!r}; bundled: {', '.join(SKLEARN_SETS)}"
        )
    import sklearn.datasets

    loader, task = SKLEARN_SETS[name]
    bunch = getattr(sklearn.datasets, loader)()
    # digits keep their image shape, as NHWC with one channel (8, 8, 1)
    inputs = bunch.images[..., None] if name == "digits" else bunch.data
    if task == "classification":
        names = [str(n) for n in getattr(bunch, "target_names", np.unique(bunch.target))]
        return RawData(inputs.astype(np.float32), bunch.target.astype(np.int32), task, names)
    return RawData(inputs.astype(np.float32), bunch.target.astype(np.float32)[:, None], task, [])


def from_npz(path: str) -> RawData:
    """``inputs`` and ``labels`` arrays from a local ``.npz`` (integer labels: classification)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config.data.path: no such file {str(file)!r}")
    with np.load(file, allow_pickle=False) as z:
        missing = [k for k in ("inputs", "labels") if k not in z.files]
        if missing:
            raise ConfigError(f"config.data.path: {file} lacks array(s) {missing}; has {z.files}")
        inputs, labels = z["inputs"].astype(np.float32), z["labels"]
    if len(inputs) != len(labels):
        raise ConfigError(
            f"config.data.path: {file}: {len(inputs)} inputs but {len(labels)} labels"
        )
    if np.issubdtype(labels.dtype, np.integer):
        names = [str(c) for c in range(int(labels.max()) + 1)]
        return RawData(inputs, labels.astype(np.int32), "classification", names)
    labels = labels.astype(np.float32)
    return RawData(inputs, labels.reshape(len(labels), -1), "regression", [])
