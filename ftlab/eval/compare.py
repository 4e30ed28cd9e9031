"""Comparing runs: one table for any task, from the summaries runs leave behind.

``results`` maps a variant name to its runs' summaries (the dicts ``ftlab.train.loop.train``
returns and writes to ``RUN/summary.json``; one per seed). The table's metric columns follow
the task (``summary["task"]``, else inferred from the metric names):

- classification: accuracy, macro F1, and the largest per-group accuracy gap when measured;
- regression: MSE, MAE, R²;
- causal LM and sequence to sequence (T5): loss, perplexity, token accuracy, plus BLEU / chrF /
  ROUGE-L when the run decoded (so GPT-2 and T5 runs on E2E share one table).

Scores are on the held-out split (test, or val when there is none), mean ± std over seeds.
Every row also gives trainable parameters and their share of the total, steps, wall time,
throughput and peak device memory. Δ is the paired difference (same seed, so the same split
and labelled subset) in the primary metric (accuracy, MSE, perplexity, or BLEU when decoded)
from a baseline variant; runs that scored their starting model before training add a "before
training" row and each run's gain over its own start. A metric a run lacks shows "–".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ftlab import tree
from ftlab.config import ConfigError
from ftlab.eval import plots
from ftlab.eval.report import markdown_table

__all__ = [
    "Comparison",
    "compare",
    "compare_runs",
    "held_out",
    "primary_metric",
    "render",
    "task_of",
    "write_comparison",
]

log = logging.getLogger("ftlab")

PRIMARY = {
    "classification": "accuracy",
    "regression": "mse",
    "causal_lm": "perplexity",
    "seq2seq": "perplexity",
}
LOWER_IS_BETTER = {"mse", "mae", "loss", "perplexity", "group_accuracy_gap", "wer"}
TASK_METRICS = {
    "classification": [
        ("accuracy", "accuracy"),
        ("f1_macro", "macro F1"),
        ("group_accuracy_gap", "largest group accuracy gap"),
    ],
    "regression": [("mse", "MSE"), ("mae", "MAE"), ("r2", "R²")],
    "causal_lm": [
        ("loss", "loss"),
        ("perplexity", "perplexity"),
        ("token_accuracy", "token accuracy"),
    ],
}
TASK_METRICS["seq2seq"] = TASK_METRICS["causal_lm"]  # on the decoder's target tokens
# Tasks whose runs share one table: a causal LM and an encoder-decoder writing the same texts
# (GPT-2 and T5 on E2E) have the same token metrics and decoding scores.
COMPARABLE = {"seq2seq": "causal_lm"}
GENERATION_METRICS = [("bleu", "BLEU"), ("chrf", "chrF"), ("rougeL", "ROUGE-L"), ("wer", "WER")]
# Shown only when some run measured them (the rest always, "–" where missing).
LABELS = {k: h for cols in (*TASK_METRICS.values(), GENERATION_METRICS) for k, h in cols}
OPTIONAL = {"m_group_accuracy_gap", "examples_per_sec", "tokens_per_sec"}
BEFORE_ROW = "before training"


# ------------------------------------------------------------------- summaries


def held_out(summary: dict) -> tuple[str, dict]:
    """(split name, metrics) of the run's final held-out scores: test, else val."""
    if summary.get("test"):
        return "test", summary["test"]
    return "val", summary.get("val") or {}


def task_of(summary: dict) -> str:
    """The run's task: ``summary["task"]``, else inferred from its metric names."""
    task = summary.get("task")
    if task:
        return task
    _, metrics = held_out(summary)
    for key, name in (
        ("accuracy", "classification"),
        ("mse", "regression"),
        ("perplexity", "causal_lm"),
    ):
        if key in metrics:
            return name
    return "unknown"


def _has_generation(runs: list[dict]) -> bool:
    return any(key in held_out(r)[1] for r in runs for key, _ in GENERATION_METRICS)


def primary_metric(task: str, runs: list[dict]) -> str:
    """Accuracy (classification), MSE (regression), perplexity (causal LM), or BLEU when
    the causal-LM runs decoded, WER when speech runs transcribed; loss for anything else."""
    if any("wer" in held_out(r)[1] for r in runs):
        return "wer"
    if task in ("causal_lm", "seq2seq") and any("bleu" in held_out(r)[1] for r in runs):
        return "bleu"
    return PRIMARY.get(task, "loss")


def _number(value: Any) -> float | None:
    """A finite float, else None (missing, None, NaN, a list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _before(summary: dict, split: str) -> dict | None:
    """The starting model's metrics on ``split`` (the same split the run is scored on)."""
    before = summary.get("before")
    if not isinstance(before, dict):
        return None
    return before.get(split) or None


# --------------------------------------------------------------------- formatting


def _mean_std(values: list[Any], sign: str = "", spec: str = ".3f") -> str | None:
    """``0.912 ± 0.010`` over seeds (one value: itself); None when any value is missing."""
    numbers = [_number(v) for v in values]
    if not numbers or any(v is None for v in numbers):
        return None
    if len(numbers) == 1:
        return f"{numbers[0]:{sign}{spec}}"
    return f"{np.mean(numbers):{sign}{spec}} ± {np.std(numbers):{spec}}"


def format_bytes(value: Any) -> str | None:
    """Bytes as MiB or GiB; None (shown as "–") when not measured."""
    value = _number(value)
    if value is None:
        return None
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    return f"{value / 2**20:.1f} MiB"


def _share(trainable: Any, total: Any) -> str | None:
    trainable, total = _number(trainable), _number(total)
    if trainable is None or not total:
        return None
    pct = 100.0 * trainable / total
    return f"{pct:.2f}%" if pct >= 0.01 or pct == 0 else f"{pct:.2g}%"


def _mean(values: list[Any]) -> float | None:
    numbers = [_number(v) for v in values]
    if not numbers or any(v is None for v in numbers):
        return None
    return float(np.mean(numbers))


# ---------------------------------------------------------------------- the table


@dataclasses.dataclass
class Comparison:
    """The rows and columns of a comparison table, and what the notes under it say."""

    rows: list[dict]
    columns: list[tuple[str, str, str]]
    notes: list[str]
    task: str
    primary: str
    baseline: str | None


def _pairs(runs: list[dict], base: list[dict]) -> list[tuple[dict, dict]]:
    """Runs matched with the baseline's run of the same seed (by position without seeds)."""
    seeds = [r.get("seed") for r in runs]
    base_seeds = [b.get("seed") for b in base]
    if None not in seeds and None not in base_seeds:
        by_seed = dict(zip(base_seeds, base))
        return [(r, by_seed[s]) for r, s in zip(runs, seeds) if s in by_seed]
    return list(zip(runs, base))


def _score(summary: dict, metric: str) -> float | None:
    return _number(held_out(summary)[1].get(metric))


def _paired(runs: list[dict], base: list[dict], metric: str) -> str | None:
    pairs = _pairs(runs, base)
    diffs = [
        None if a is None or b is None else a - b
        for a, b in ((_score(r, metric), _score(q, metric)) for r, q in pairs)
    ]
    return _mean_std(diffs, "+")


def _gain(runs: list[dict], metric: str) -> str | None:
    gains = []
    for r in runs:
        split, _ = held_out(r)
        start = _before(r, split)
        after = _score(r, metric)
        first = None if start is None else _number(start.get(metric))
        gains.append(None if after is None or first is None else after - first)
    return _mean_std(gains, "+")


def compare(
    results: dict[str, list[dict]], baseline: str | None = None, key: str = "config.baseline"
) -> Comparison:
    """The comparison of ``results`` (variant -> its runs' summaries, in display order).

    ``baseline`` names the variant deltas are taken against (None or "": the first); an
    unknown name is a ConfigError naming ``key`` and the variants.
    """
    if not results or not all(results.values()):
        raise ValueError("compare needs at least one run per variant")
    names = list(results)
    if baseline and baseline not in results:
        raise ConfigError(f"{key}: {baseline!r} names no variant; variants: {', '.join(names)}")
    baseline = baseline or names[0]
    every = [r for runs in results.values() for r in runs]
    first = results[names[0]]
    tasks = list(dict.fromkeys(task_of(r) for r in every))
    task = task_of(first[0])
    primary = primary_metric(task, first)
    splits = {held_out(r)[0] for r in every}
    split = "test" if splits == {"test"} else "val" if splits == {"val"} else "held-out"

    metric_cols = list(dict.fromkeys(col for t in tasks for col in TASK_METRICS.get(t, [])))
    if _has_generation(every):  # the decoding scores some run measured (BLEU ..., or WER)
        metric_cols += [
            col for col in GENERATION_METRICS if any(col[0] in held_out(r)[1] for r in every)
        ]
    if not metric_cols:
        metric_cols = [("loss", "loss")]
    with_before = any(_before(r, held_out(r)[0]) for r in first)
    with_gain = any(_before(r, held_out(r)[0]) for r in every)
    # the starting model is scored without decoding: no BLEU there, so compare perplexity
    starts = [_before(r, held_out(r)[0]) or {} for r in every]
    gain_metric = primary if any(primary in s for s in starts) else PRIMARY.get(task, "loss")
    many_seeds = any(len(runs) > 1 for runs in results.values())

    def metric_cells(summaries: list[dict], use_before: bool = False) -> dict:
        metrics = []
        for s in summaries:
            name, scores = held_out(s)
            metrics.append((_before(s, name) or {}) if use_before else scores)
        return {f"m_{k}": _mean_std([m.get(k) for m in metrics]) for k, _ in metric_cols}

    rows = []
    if with_before:
        started = [r for r in first if _before(r, held_out(r)[0])]
        rows.append(
            {
                "variant": BEFORE_ROW,
                "seeds": len(started),
                **metric_cells(started, use_before=True),
                "steps": 0,
            }
        )
    for name, runs in results.items():
        rows.append(
            {
                "variant": name,
                "seeds": len(runs),
                **metric_cells(runs),
                "delta": "(baseline)"
                if name == baseline
                else _paired(runs, results[baseline], primary),
                "gain": _gain(runs, gain_metric),
                "trainable": runs[0].get("trainable_params"),
                "share": _share(runs[0].get("trainable_params"), runs[0].get("total_params")),
                "total": runs[0].get("total_params"),
                "steps": _mean([r.get("steps") for r in runs]),
                "wall_time_s": _mean([r.get("wall_time_s") for r in runs]),
                "examples_per_sec": _mean([r.get("examples_per_sec") for r in runs]),
                "tokens_per_sec": _mean([r.get("tokens_per_sec") for r in runs]),
                "peak_memory": format_bytes(_mean([r.get("peak_memory_bytes") for r in runs])),
            }
        )
    direction = "lower is better" if primary in LOWER_IS_BETTER else "higher is better"
    label = LABELS.get(primary, primary)
    columns: list[tuple[str, str, str]] = [("variant", "variant", "")]
    if many_seeds:
        columns.append(("seeds", "seeds", "d"))
    columns += [(f"m_{k}", f"{split} {header}", "") for k, header in metric_cols]
    columns.append(("delta", f"Δ {label} vs {baseline} (paired)", ""))
    if with_gain:
        columns.append(("gain", f"Δ {LABELS.get(gain_metric, gain_metric)} vs before", ""))
    columns += [
        ("trainable", "trainable params", ",d"),
        ("share", "trainable %", ""),
        ("total", "total params", ",d"),
        ("steps", "steps", ".0f"),
        ("wall_time_s", "wall time per run (s)", ".1f"),
        ("examples_per_sec", "examples/s", ",.1f"),
        ("tokens_per_sec", "tokens/s", ",.0f"),
        ("peak_memory", "peak memory", ""),
    ]
    present = {k for row in rows for k, v in row.items() if v is not None}
    columns = [c for c in columns if c[0] not in OPTIONAL or c[0] in present]

    notes = [
        f"Scores on the {split} split"
        + (" (val where a run has no test split)" if split == "held-out" else "")
        + f"; Δ is the difference in {label} ({direction}) from {baseline}"
        + (", per seed on the same split and labelled subset." if many_seeds else ".")
    ]
    if many_seeds:
        seeds = sorted({len(runs) for runs in results.values()})
        notes.append(
            f"Mean ± std over {'/'.join(map(str, seeds))} seeds "
            "(each its own split and labelled subset)."
        )
    if with_before:
        notes.append(
            f"'{BEFORE_ROW}': {names[0]}'s starting model scored before its first step; "
            f"Δ vs before is each run's {LABELS.get(gain_metric, gain_metric)} minus its own "
            "starting model's."
        )
    if len(tasks) > 1:
        notes.append(f"Runs of different tasks: {', '.join(tasks)}.")
    return Comparison(rows, columns, notes, task, primary, baseline)


def render(comparison: Comparison) -> str:
    """The markdown table and its notes."""
    table = markdown_table(comparison.rows, comparison.columns)
    return table + "\n" + "\n".join(comparison.notes) + "\n"


def _read_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    from ftlab.train.writer import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        (r["step"], r[metric])
        for r in read_metrics(path)
        if _number(r.get(metric)) is not None and "step" in r
    ]


def write_comparison(
    out_dir: str | Path,
    results: dict[str, list[dict]],
    curve_metric: str = "val/loss",
    baseline: str | None = None,
    key: str = "config.baseline",
    locate: Callable[[str], Path] = Path,
) -> str:
    """results.md (table and notes), results.json (every run's summary) and comparison.png
    (``curve_metric`` of each variant's first run, from its ``workdir``'s metrics.jsonl, found
    locally by ``locate``: a remote experiment's runs sit in its stage) in ``out_dir``;
    returns the markdown."""
    out_dir = Path(out_dir)
    comparison = compare(results, baseline, key)
    text = render(comparison)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text)
    (out_dir / "results.json").write_text(json.dumps(tree.jsonable(results), indent=2))
    series = {}
    for name, runs in results.items():
        where = runs[0].get("workdir")
        points = _read_curve(locate(where), curve_metric) if where else []
        if points:
            series[name] = points
    if series:
        many = any(len(runs) > 1 for runs in results.values())
        title = f"{curve_metric} by variant" + (" (first seed)" if many else "")
        plots.plot_curves(series, out_dir / "comparison.png", title, curve_metric)
    log.info("comparison written to %s:\n%s", out_dir / "results.md", text)
    return text


# ------------------------------------------------------------------ ftlab compare


def _seed_of(path: Path) -> int | None:
    match = re.fullmatch(r"seed_(-?\d+)", path.name)
    return int(match.group(1)) if match else None


def _load_runs(run_dir: Path) -> list[dict]:
    """The summaries of one variant: the dir's own, or each of its ``seed_*`` subdirs'."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    own = run_dir / "summary.json"
    if own.exists():
        return [{**json.loads(own.read_text()), "workdir": str(run_dir), "seed": None}]
    seeds = sorted(
        (p for p in run_dir.glob("seed_*") if p.is_dir()),
        key=lambda p: (_seed_of(p) is None, _seed_of(p) or 0, p.name),
    )
    if not seeds:
        hint = (
            " (an experiment's folder? pass its variants' folders)"
            if (run_dir / "results.json").exists()
            else ""
        )
        raise ConfigError(f"{run_dir}: no summary.json, not a finished run{hint}")
    runs = []
    for seed_dir in seeds:
        summary = seed_dir / "summary.json"
        if not summary.exists():
            raise ConfigError(f"{seed_dir}: no summary.json, not a finished run")
        runs.append(
            {
                **json.loads(summary.read_text()),
                "workdir": str(seed_dir),
                "seed": _seed_of(seed_dir),
            }
        )
    return runs


def run_names(run_dirs: list[Path]) -> list[str]:
    """Each dir's name; names shared by several dirs become parent/name (else the path)."""
    plain = [d.name for d in run_dirs]
    names = [f"{d.parent.name}/{d.name}" if plain.count(d.name) > 1 else d.name for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for n, d in zip(names, run_dirs)]


def _curve_metric(run: dict) -> str:
    """The metric the run selected its checkpoint by (its config.json), else val/loss."""
    try:
        config = json.loads((Path(run["workdir"]) / "config.json").read_text())
        metric = config["early_stopping"]["metric"]
    except (OSError, KeyError, TypeError, ValueError):
        return "val/loss"
    return metric if isinstance(metric, str) and metric else "val/loss"


def compare_runs(
    run_dirs: list[str | Path],
    out_dir: str | Path | None = None,
    baseline: str | None = None,
    names: list[str] | None = None,
) -> str:
    """``ftlab compare RUN_DIR ...``: one row per run directory (a folder of ``seed_*``
    runs is one variant over several seeds), named by ``names`` (default: ``run_names``);
    writes results.md / results.json / comparison.png into ``out_dir`` when given; returns
    the markdown table."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ConfigError("compare: no run directories given")
    names = names or run_names(dirs)
    results = {name: _load_runs(d) for name, d in zip(names, dirs)}
    tasks = {name: task_of(runs[0]) for name, runs in results.items()}
    for name, runs in results.items():
        for run in runs[1:]:
            if task_of(run) != tasks[name]:
                raise ConfigError(f"{name}: its seeds ran different tasks")
    if len({COMPARABLE.get(t, t) for t in tasks.values()}) > 1:
        listed = ", ".join(f"{d} ({tasks[n]})" for n, d in zip(names, dirs))
        raise ConfigError(f"compare: runs of different tasks cannot be compared: {listed}")
    if baseline and baseline not in results:
        raise ConfigError(
            f"compare: baseline {baseline!r} names no run; runs: {', '.join(results)}"
        )
    if out_dir is None:
        return render(compare(results, baseline, key="baseline"))
    curve = _curve_metric(next(iter(results.values()))[0])
    return write_comparison(out_dir, results, curve, baseline, key="baseline")
