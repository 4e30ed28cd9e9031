"""Train / val / test frames from a source's splits, carved with a fixed seed where missing.

The test split is wrapped in ``HeldOut``: cleaning may *transform* it (with statistics
fitted on train) and leakage checks may compare row fingerprints with it, but its rows are
only handed out by ``for_final_evaluation()`` (or ``to_dataset`` for the final evaluation in
the loop). So a line that reads test data for anything else stands out in review.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from ftlab.config import ConfigError
from ftlab.data.frames import DataError, fingerprints, stack_inputs

SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val", "eval": "val"}


class HeldOut:
    """The test split, sealed. Only final evaluation reads its rows."""

    __slots__ = ("_frame",)

    def __init__(self, frame: pd.DataFrame):
        self._frame = frame

    def __len__(self) -> int:
        return len(self._frame)

    def __repr__(self) -> str:
        return f"HeldOut({len(self)} rows, read only by final evaluation)"

    def map(self, transform: Callable[[pd.DataFrame], pd.DataFrame]) -> HeldOut:
        """Apply a transform whose statistics were fitted on train (cleaning, normalising)."""
        return HeldOut(transform(self._frame))

    def fingerprints(self, columns: Iterable[str]) -> np.ndarray:
        """Row digests, for leakage checks: they say whether a row is here, nothing more."""
        return fingerprints(self._frame, columns)

    def describe(self, label: str = "label") -> dict[str, Any]:
        """Size and label counts, for the run log."""
        return describe(self._frame, label)

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self._frame.columns]

    def for_final_evaluation(self) -> pd.DataFrame:
        """The test rows. Call this only to compute the final test metrics."""
        return self._frame.copy()


@dataclasses.dataclass(frozen=True)
class Splits:
    """Frames for training and model selection, and the sealed test split."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: HeldOut
    label_names: list[str] | None = None  # class names known to the source, by label index
    origin: Mapping[str, str] = dataclasses.field(default_factory=dict)  # how each was made
    ignored: tuple[str, ...] = ()  # source splits that are none of train/val/test

    def replace(self, **changes: Any) -> Splits:
        return dataclasses.replace(self, **changes)

    def map(self, transform: Callable[[str, pd.DataFrame], pd.DataFrame]) -> Splits:
        """``transform(split name, frame)`` on every split (for steps fitted on train)."""
        return self.replace(
            train=transform("train", self.train),
            val=transform("val", self.val),
            test=self.test.map(lambda f: transform("test", f)),
        )

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# -- making the splits -------------------------------------------------------------------------


def _stratify_labels(frame: pd.DataFrame, label: str, stratify: bool) -> np.ndarray | None:
    if not stratify or label not in frame.columns or pd.api.types.is_float_dtype(frame[label]):
        return None  # float labels are regression targets: nothing to stratify by
    values = frame[label].to_numpy()
    mixed = values.dtype == object and len({type(v) for v in values}) > 1
    return values.astype(str) if mixed else values


def _carve(
    positions: np.ndarray, fraction: float, seed: int, labels: np.ndarray | None, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split off ``fraction`` of ``positions`` (stratified by ``labels[positions]``) with
    scikit-learn's train_test_split; the kept part stays in its shuffled order so that a
    second carve matches ``load_dataset``'s."""
    try:
        return train_test_split(
            positions,
            test_size=fraction,
            random_state=seed,
            stratify=None if labels is None else labels[positions],
        )
    except ValueError as e:
        hint = " (or set config.data.stratify=False)" if labels is not None else ""
        raise ConfigError(
            f"config.data.{key}: cannot carve {fraction:.3g} of {len(positions)} rows{hint}: {e}"
        ) from None


def make_splits(
    tables: Mapping[str, pd.DataFrame],
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    stratify: bool = True,
    label: str = "label",
) -> Splits:
    """Use the source's train/val/test where present ('validation', 'valid', 'dev' count as
    val); carve the missing ones from train with ``seed``. Fractions are of the source's
    training split; a fraction of 0 leaves that split empty. Carving both reproduces
    ``ftlab.data.load_dataset``'s partition (test first, then val from the rest)."""
    named: dict[str, pd.DataFrame] = {}
    ignored = []
    for name, frame in tables.items():
        canon = SPLIT_ALIASES.get(str(name).lower(), str(name).lower())
        if canon in ("train", "val", "test"):
            if canon in named:
                raise ConfigError(
                    f"config.data.splits: two source splits are '{canon}' ({list(tables)}); "
                    "map one explicitly, e.g. splits='train=train,val=validation,test=test'"
                )
            named[canon] = frame
        else:
            ignored.append(str(name))
    if "train" not in named:
        if len(tables) != 1:
            raise ConfigError(
                f"config.data.splits: no training split among {list(tables)}; "
                "name one, e.g. splits='train=NAME'"
            )
        named["train"], ignored = next(iter(tables.values())), []
    train = named["train"]
    label_names = train.attrs.get("label_names")
    origin = {k: "source" for k in named}
    carve_test = "test" not in named
    strata = _stratify_labels(train, label, stratify)
    positions = np.arange(len(train))
    for name, key in (("test", "test_fraction"), ("val", "val_fraction")):
        if name in named:
            continue
        fraction = test_fraction if name == "test" else val_fraction
        if fraction <= 0:
            named[name], origin[name] = train.iloc[:0], "empty"
            continue
        if name == "val" and carve_test and test_fraction > 0:
            fraction = fraction / (1.0 - test_fraction)  # of what the test carve left
        positions, out = _carve(positions, fraction, seed, strata, key)
        named[name] = train.iloc[np.sort(out)]
        how = ", stratified" if strata is not None else ""
        origin[name] = f"carved from train ({len(out)} rows, seed {seed}{how})"
    train = train.iloc[np.sort(positions)]
    if len(train) == 0:
        raise DataError("the training split is empty")
    return Splits(
        train=train,
        val=named["val"],
        test=HeldOut(named["test"]),
        label_names=list(label_names) if label_names is not None else None,
        origin=origin,
        ignored=tuple(ignored),
    )


# -- reporting ---------------------------------------------------------------------------------


def label_counts(labels: Iterable[Any]) -> dict[Any, int]:
    """Examples per label, labels in sorted order."""
    counts = Counter(v.item() if isinstance(v, np.generic) else v for v in labels)
    mixed = len({type(k) for k in counts}) > 1
    return {k: counts[k] for k in sorted(counts, key=str if mixed else None)}


def imbalance_ratio(counts: Mapping[Any, int]) -> float:
    """Largest class over smallest (inf when a class has no examples; 1.0 when balanced)."""
    values = [v for v in counts.values()]
    if not values:
        return float("nan")
    return float("inf") if min(values) == 0 else max(values) / min(values)


def describe(frame: pd.DataFrame, label: str = "label") -> dict[str, Any]:
    out: dict[str, Any] = {"size": len(frame)}
    if label in frame.columns and not pd.api.types.is_float_dtype(frame[label]):
        counts = label_counts(frame[label].dropna())
        out["labels"] = counts
        out["imbalance_ratio"] = imbalance_ratio(counts)
    return out


def split_report(splits: Splits, label: str = "label") -> dict[str, dict[str, Any]]:
    """Per split: size, label distribution and imbalance ratio (classification labels)."""
    report = {
        "train": describe(splits.train, label),
        "val": describe(splits.val, label),
        "test": splits.test.describe(label),
    }
    for name, info in report.items():
        info["origin"] = splits.origin.get(name, "")
    return report


def format_report(report: Mapping[str, Mapping[str, Any]], names: list[str] | None = None) -> str:
    lines = []
    for split, info in report.items():
        line = f"{split}: {info['size']} examples"
        if "labels" in info:
            shown = " ".join(
                f"{names[k] if names and isinstance(k, int) and 0 <= k < len(names) else k}:{v}"
                for k, v in info["labels"].items()
            )
            line += f" | labels {shown} | imbalance {info['imbalance_ratio']:.2f}"
        if info.get("origin"):
            line += f" | {info['origin']}"
        lines.append(line)
    return "\n".join(lines)


# -- hand-off to the array pipeline ------------------------------------------------------------


def to_dataset(splits: Splits, task: str = "auto", standardise_targets: bool = True) -> Any:
    """An ``ftlab.data.Dataset`` of arrays. Classification labels must already be integer
    indices (``clean.map_labels``). The returned Dataset's ``test`` is read only by the loop's
    final evaluation, as everywhere in ftlab."""
    from ftlab.data import Dataset, Split

    frames = {"train": splits.train, "val": splits.val, "test": splits.test._frame}
    labels = frames["train"]["label"] if "label" in frames["train"].columns else None
    if labels is None:
        raise ConfigError("config.data.columns: no 'label' column; map one, e.g. label=sentiment")
    if task == "auto":
        task = "regression" if pd.api.types.is_float_dtype(labels) else "classification"
    out: dict[str, Any] = {}
    for name, frame in frames.items():
        if task == "classification":
            if len(frame) and not pd.api.types.is_integer_dtype(frame["label"]):
                raise DataError(
                    f"split {name!r}: labels are {frame['label'].dtype}, not class indices; "
                    "map them first (ftlab.data.clean.map_labels)"
                )
            y = frame["label"].to_numpy(np.int32)
        else:
            y = (
                np.stack([np.asarray(v, np.float32).reshape(-1) for v in frame["label"]])
                if len(frame)
                else np.zeros((0, 1), np.float32)
            )
        out[name] = Split(stack_inputs(frame), y)
    if task == "classification":
        num = int(max(int(out["train"].labels.max()) + 1, len(splits.label_names or [])))
        names = list(splits.label_names or [str(i) for i in range(num)])
        data = Dataset(**out, task=task, num_outputs=len(names), class_names=names)
    else:
        data = Dataset(**out, task=task, num_outputs=out["train"].labels.shape[-1], class_names=[])
        if standardise_targets:
            data.target_mean = out["train"].labels.mean(axis=0)
            data.target_std = out["train"].labels.std(axis=0) + 1e-6
            for s in out.values():
                s.labels = ((s.labels - data.target_mean) / data.target_std).astype(np.float32)
    return data
