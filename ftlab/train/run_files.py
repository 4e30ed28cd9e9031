"""What a run leaves in its workdir besides checkpoints and metrics: its log, the data report,
where its starting weights came from, speed and memory, and the analysis of its final outputs.

Kept apart from the loop so that ``loop.py`` reads as the run itself.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections as mc
import numpy as np

from ftlab import tree
from ftlab import workdir as workdir_lib
from ftlab.config import ConfigError
from ftlab.data import Dataset, Split
from ftlab.eval import plots
from ftlab.train.writer import read_metrics

log = logging.getLogger("ftlab")


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
    if data.task not in ("causal_lm", "seq2seq"):
        return None
    inputs = data.train.inputs
    if data.task == "seq2seq":  # encoder + decoder positions (speech: no source tokens)
        keys = ("input_ids", "decoder_input_ids")
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            return None
        return int(sum(np.shape(inputs[k])[-1] for k in keys if k in inputs))
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
    (workdir / "data_report.json").write_text(json.dumps(tree.jsonable(report), indent=2))


def resolve_init(checkpoint: str) -> tuple[Path, list[dict]]:
    """``init.checkpoint`` as a ``params`` folder, and the lineage it brings.

    It may name a ``params`` folder or an earlier run's directory (its best parameters,
    LoRA merged), local or a URL (``gs://bucket/run``); the lineage lists that run and, in
    turn, the runs it started from.
    """
    remote = workdir_lib.is_remote(checkpoint)
    path = workdir_lib.as_path(checkpoint if remote else Path(checkpoint).expanduser())
    if (path / "params").is_dir():
        run_dir, params = path, path / "params"
    elif path.is_dir():
        run_dir, params = path.parent, path
    else:
        raise ConfigError(
            f"config.init.checkpoint: {checkpoint} is neither a run directory (holding "
            "params/) nor a params folder"
        )

    def where(p) -> str:
        return str(p) if remote else str(p.resolve())

    entry: dict[str, Any] = {"run": where(run_dir), "params": where(params)}
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

    if data.task in ("causal_lm", "seq2seq"):
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


class Speed:
    """Training throughput over the steps after the first (which compiles), with evaluation
    and checkpointing excluded: the rate a longer run would see."""

    def __init__(self, batch_size: int, tokens_per_example: int | None):
        self.batch_size, self.tokens = batch_size, tokens_per_example
        self.steps, self.seconds = 0, 0.0
        self.started: float | None = None
        self.first = True

    def stepped(self, metrics) -> None:
        if self.first:  # wait for the compiled first step; time from there on
            jax.block_until_ready(metrics)
            self.first = False
            self.started = time.perf_counter()
            return
        if self.started is None:
            self.started = time.perf_counter()
        self.steps += 1

    def pause(self, state) -> None:
        if self.started is not None:
            jax.block_until_ready(state)
            self.seconds += time.perf_counter() - self.started
            self.started = None

    def resume(self) -> None:
        if self.started is None and not self.first:
            self.started = time.perf_counter()

    def summary(self) -> dict:
        rate = self.steps * self.batch_size / self.seconds if self.steps and self.seconds else None
        return {
            "examples_per_sec": rate,
            "tokens_per_sec": rate * self.tokens if rate and self.tokens else None,
        }


def write_outputs(
    cfg: mc.ConfigDict, workdir: Path, summary: dict, data: Dataset, outputs: np.ndarray | None
) -> None:
    """summary.json, plots, the analysis of the held-out predictions, the fit verdict, label
    issues, the data report and report.md / report.html (process 0)."""
    from ftlab.eval import analysis, diagnosis
    from ftlab.eval.run_report import write_report

    records = read_metrics(workdir / "metrics.jsonl")
    summary["verdict"] = diagnosis.fit_verdict(records, chance_loss=chance_loss(data))
    if summary["verdict"]["verdict"] in ("overfitting", "underfitting"):
        log.warning("%s: %s", summary["verdict"]["verdict"], summary["verdict"]["evidence"])
    split_name, split = held_out(data)
    if data.task == "classification" and outputs is not None:
        summary["analysis"] = analysis.run_analysis(
            workdir,
            split_name,
            split.labels,
            softmax(outputs),
            data.class_names,
            split.inputs,
            {k: v for k, v in split.text.items() if k != "group"},
            groups=split.text.get("group"),
            fairness_threshold=cfg.eval.fairness_threshold,
        )
    if cfg.eval.label_issues and data.task == "classification":
        summary["label_issues"] = label_issues(cfg, workdir, data)
    summary["environment"] = analysis.environment()
    write_data_report(workdir, cfg, data, summary["steps"])
    (workdir / "summary.json").write_text(json.dumps(tree.jsonable(summary), indent=2))
    plots.plot_history(records, workdir / "learning_curves.png", workdir.name)
    final = summary["test"] or summary["val"]
    if "confusion_matrix" in final:
        plots.plot_confusion_matrix(
            np.array(final["confusion_matrix"]),
            data.class_names,
            workdir / "confusion_matrix.png",
            f"{workdir.name}: {split_name} confusion matrix",
        )
    write_report(workdir, workdir.name, {workdir.name: [workdir]})


def label_issues(cfg: mc.ConfigDict, workdir: Path, data: Dataset) -> dict:
    """Confident learning over out-of-fold predictions of a simple model on the training split:
    ``label_issues.csv`` lists the rows to review before retraining."""
    from ftlab.data import label_issues

    features = label_issues.featurize(data.train.inputs)
    probs = label_issues.out_of_fold_probs(
        features,
        data.train.labels,
        data.num_outputs,
        folds=cfg.eval.label_issue_folds,
        seed=cfg.seed,
    )
    issues = label_issues.find_label_issues(probs, data.train.labels)
    path = workdir / "label_issues.csv"
    label_issues.write_label_issues(path, issues, data.class_names)
    flagged = len(issues["index"]) if isinstance(issues, dict) else len(issues)
    log.info(
        "label issues: %d of %d training rows flagged, listed in %s", flagged, len(data.train), path
    )
    return {"flagged": flagged, "of": len(data.train), "file": path.name}
