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
    tokenizer: Any = None  # text data: the tokenizer that made the token ids
    clean_log: dict = dataclasses.field(default_factory=dict)  # counts per cleaning step
    rejected: list = dataclasses.field(default_factory=list)  # rows cleaning skipped, and why
    # what each data step did (cleaning, balance, splits, subsets): the run's data_report.json
    report_log: dict = dataclasses.field(default_factory=dict)

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


def load_dataset(cfg: mc.ConfigDict, **kwargs: Any) -> Dataset:
    """The splits ``config.data`` describes (see ``ftlab.data.loading``)."""
    from ftlab.data.loading import load_dataset as load

    return load(cfg, **kwargs)
