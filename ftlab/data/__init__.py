"""From ``config.data`` to train / val / test splits ready for batching.

Splits are made once with a fixed seed; the test split is only read by the final
evaluation, never by training, early stopping or model selection. Normalisation
statistics come from the training split alone.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import ml_collections as mc
import numpy as np
from sklearn.model_selection import train_test_split

from ftlab.config import ConfigError
from ftlab.data.sources import RawData, from_npz, from_sklearn


@dataclasses.dataclass
class Split:
    """One split's examples as arrays with a common first dimension.

    ``inputs`` is an array (images, feature vectors, token ids) or a dict of arrays (BERT's
    ``input_ids`` + ``attention_mask``); ``weights`` optionally weights each example in the
    loss (class weights, a language-modelling example's target-token count); ``text`` keeps
    raw columns that evaluation by generation needs (``prompt``, ``response``).
    """

    inputs: Any
    labels: np.ndarray
    weights: np.ndarray | None = None
    text: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        inputs = (
            {k: v[index] for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else self.inputs[index]
        )
        return Split(
            inputs,
            self.labels[index],
            None if self.weights is None else self.weights[index],
            {k: v[index] for k, v in self.text.items()},
        )

    def arrays(self, with_text: bool = False) -> dict[str, np.ndarray]:
        """Flat ``{name: per-example array}`` for batching (``inputs/input_ids`` for a dict);
        ``with_text`` adds the raw columns (``text/text``) that text augmentation rewrites."""
        out = (
            {f"inputs/{k}": v for k, v in self.inputs.items()}
            if isinstance(self.inputs, dict)
            else {"inputs": self.inputs}
        )
        out["labels"] = self.labels
        if self.weights is not None:
            out["weights"] = self.weights
        if with_text:
            out.update({f"text/{k}": v for k, v in self.text.items()})
        return out

    def sample_inputs(self) -> Any:
        """The first example's inputs with a batch dimension (to initialise a model)."""
        return self.take(np.arange(1)).inputs


@dataclasses.dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    task: str
    num_outputs: int
    class_names: list[str]
    # Regression targets are standardised with train statistics for training;
    # metrics are reported in the original units: y = label * target_std + target_mean.
    target_mean: np.ndarray | None = None
    target_std: np.ndarray | None = None

    def original_units(self, values: np.ndarray) -> np.ndarray:
        if self.target_mean is None:
            return values
        return values * self.target_std + self.target_mean

    def report(self) -> str:
        """Sizes and label distribution per split, for the run's log."""
        lines = []
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            line = f"{name}: {len(split)} examples"
            if self.task == "classification":
                counts = Counter(split.labels.tolist())
                line += " | labels " + " ".join(
                    f"{self.class_names[c]}:{counts.get(c, 0)}" for c in range(self.num_outputs)
                )
            lines.append(line)
        return "\n".join(lines)


def _keep_classes(raw: RawData, classes: tuple[int, ...]) -> RawData:
    present = set(np.unique(raw.labels).tolist())
    unknown = [c for c in classes if c not in present]
    if unknown:
        raise ConfigError(f"config.data.classes: labels {unknown} do not occur in the data")
    keep = np.isin(raw.labels, classes)
    remap = {c: i for i, c in enumerate(classes)}
    labels = np.array([remap[c] for c in raw.labels[keep].tolist()], np.int32)
    return RawData(raw.inputs[keep], labels, raw.task, [raw.class_names[c] for c in classes])


def _few_per_class(split: Split, n: int, num_classes: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(split.labels == c)
        if len(idx) < n:
            raise ConfigError(
                f"config.data.train_per_class: {n} asked for, class {c} has {len(idx)} training examples"
            )
        chosen.append(rng.permutation(idx)[:n])
    return split.take(np.sort(np.concatenate(chosen)))


def load_dataset(cfg: mc.ConfigDict) -> Dataset:
    raw = from_sklearn(cfg.name) if cfg.source == "sklearn" else from_npz(cfg.path)
    classification = raw.task == "classification"
    if cfg.classes:
        if not classification:
            raise ConfigError("config.data.classes: only classification data has classes")
        raw = _keep_classes(raw, tuple(cfg.classes))
    index = np.arange(len(raw.labels))
    stratify = raw.labels if (classification and cfg.stratify) else None
    try:
        rest, test = (
            train_test_split(
                index,
                test_size=cfg.test_fraction,
                random_state=cfg.split_seed,
                stratify=stratify,
            )
            if cfg.test_fraction > 0
            else (index, index[:0])
        )
        val_size = cfg.val_fraction / (1.0 - cfg.test_fraction)
        train, val = train_test_split(
            rest,
            test_size=val_size,
            random_state=cfg.split_seed,
            stratify=None if stratify is None else raw.labels[rest],
        )
    except ValueError as e:
        raise ConfigError(f"config.data: cannot split {len(index)} examples: {e}") from None
    full = Split(raw.inputs, raw.labels)
    splits = {
        "train": full.take(np.sort(train)),
        "val": full.take(np.sort(val)),
        "test": full.take(np.sort(test)),
    }
    num_outputs = len(raw.class_names) if classification else raw.labels.shape[-1]
    if cfg.train_per_class > 0:
        if not classification:
            raise ConfigError("config.data.train_per_class: only for classification data")
        splits["train"] = _few_per_class(
            splits["train"], cfg.train_per_class, num_outputs, cfg.split_seed
        )
    if cfg.scale > 0:
        for s in splits.values():
            s.inputs = s.inputs * np.float32(cfg.scale)
    else:  # standardise every feature with the training split's statistics
        mean = splits["train"].inputs.mean(axis=0)
        std = splits["train"].inputs.std(axis=0) + 1e-6
        for s in splits.values():
            s.inputs = ((s.inputs - mean) / std).astype(np.float32)
    data = Dataset(**splits, task=raw.task, num_outputs=num_outputs, class_names=raw.class_names)
    if not classification:
        data.target_mean = splits["train"].labels.mean(axis=0)
        data.target_std = splits["train"].labels.std(axis=0) + 1e-6
        for s in splits.values():
            s.labels = ((s.labels - data.target_mean) / data.target_std).astype(np.float32)
    return data
