"""What a run leaves in its workdir besides checkpoints and metrics: its log, the data report,
where its starting weights came from, speed and memory, and the analysis of its final outputs.

Kept apart from the loop so that ``loop.py`` reads as the run itself.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections as mc
import numpy as np

from ftlab.config import ConfigError
from ftlab.data import Dataset, Split

log = logging.getLogger("ftlab")


def jsonable(value: Any) -> Any:
    """Numpy scalars, arrays and non-string keys as plain JSON values (recursively)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog(logging.Handler):
    """ftlab's log lines of one run, kept in memory until the workdir is known to be this
    run's (a bad config writes nothing), then appended to ``workdir/log.txt``."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        self._lines: list[str] = []
        self._file = None

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record) + "\n"
        if self._file is None:
            self._lines.append(line)
        else:
            self._file.write(line)
            self._file.flush()

    def attach(self, workdir: Path) -> None:
        if jax.process_index() != 0:
            return
        self._file = open(workdir / "log.txt", "a")  # noqa: SIM115 (closed in __exit__)
        self._file.writelines(self._lines)
        self._lines = []

    def __enter__(self):
        logger = logging.getLogger("ftlab")
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:  # the file gets INFO even when the
            logger.setLevel(logging.INFO)  # console shows only warnings
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("ftlab")
        logger.removeHandler(self)
        logger.setLevel(self._level)
        if self._file is not None:
            self._file.close()


def device_memory(key: str = "peak_bytes_in_use") -> int | None:
    """The largest value of ``key`` over this host's devices, or None where the backend
    reports no memory statistics (CPU)."""
    values = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except (RuntimeError, NotImplementedError):  # backends without statistics
            stats = None
        if stats and key in stats:
            values.append(int(stats[key]))
    return max(values) if values else None


def tokens_per_example(data: Dataset) -> int | None:
    """Sequence positions per training example (padding included) for token inputs."""
    if data.task != "causal_lm":
        return None
    inputs = data.train.inputs
    ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
    return int(np.shape(ids)[-1])


def write_data_report(workdir: Path, cfg: mc.ConfigDict, data: Dataset, steps: int) -> None:
    """``data_report.json``: what each data step did (cleaning, balance, splits, subsets) and
    the augmentation applied to training batches."""
    from ftlab.data import augment

    report = dict(data.report_log)
    images, words = augment.image_options(cfg.data), augment.text_options(cfg.data)
    if images.active or words.active:
        report["augmentation"] = {
            "options": {
                k: v for k, v in cfg.data.augment.to_dict().items() if v not in (0, 0.0, False, "")
            },
            "augmented_examples": steps * cfg.train.batch_size,
        }
    (workdir / "data_report.json").write_text(json.dumps(jsonable(report), indent=2))


def resolve_init(checkpoint: str) -> tuple[Path, list[dict]]:
    """``init.checkpoint`` as a ``params`` folder, and the lineage it brings.

    It may name a ``params`` folder or an earlier run's directory (its best parameters,
    LoRA merged); the lineage lists that run and, in turn, the runs it started from.
    """
    path = Path(checkpoint).expanduser()
    if (path / "params").is_dir():
        run_dir, params = path, path / "params"
    elif path.is_dir():
        run_dir, params = path.parent, path
    else:
        raise ConfigError(
            f"config.init.checkpoint: {checkpoint} is neither a run directory (holding "
            "params/) nor a params folder"
        )
    entry: dict[str, Any] = {"run": str(run_dir.resolve()), "params": str(params.resolve())}
    lineage: list[dict] = []
    summary = run_dir / "summary.json"
    if summary.exists():
        earlier = json.loads(summary.read_text())
        entry.update(
            {k: earlier[k] for k in ("task", "method", "steps", "best_step") if k in earlier}
        )
        held_out = earlier.get("test") or earlier.get("val") or {}
        entry["scores"] = {k: v for k, v in held_out.items() if isinstance(v, (int, float))}
        lineage = earlier.get("lineage") or []
    return params, [entry, *lineage]


def chance_loss(data: Dataset) -> float | None:
    """The loss of a model that knows nothing: uniform over classes or tokens, or predicting
    the mean of standardised targets (None for regression in raw units)."""
    from ftlab.eval import diagnosis

    if data.task == "causal_lm":
        return math.log(len(data.tokenizer)) if data.tokenizer is not None else None
    if data.task == "regression" and data.target_std is None:
        return None
    return diagnosis.chance_loss(data.task, data.num_outputs)


def held_out(data: Dataset) -> tuple[str, Split]:
    """The split final scores are reported on: test, or val when there is no test split."""
    return ("test", data.test) if len(data.test) else ("val", data.val)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
