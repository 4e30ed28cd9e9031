"""Multi-run experiments: stages run in order (e.g. pretraining), then variants compared.

A config lists ``stages`` and ``variants`` as ``(name, {dotted.key: value})`` pairs applied
on top of itself; ``init.checkpoint = "stage:NAME"`` points a run at the parameters a stage
saved. Each run gets ``workdir/NAME`` (``workdir/NAME/seed_S`` when ``variant_seeds`` repeats
variants over seeds, each seed drawing its own data split and labelled subset). The
comparison goes to ``workdir/results.md`` (mean ± std over seeds), ``results.json`` and
``comparison.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections as mc
import numpy as np

from ftlab.config import ConfigError, override_copy
from ftlab.eval import plots
from ftlab.eval.report import markdown_table
from ftlab.schema import validate
from ftlab.train.loop import prepare, train
from ftlab.train.writer import read_metrics

log = logging.getLogger("ftlab")


def derive(
    cfg: mc.ConfigDict,
    name: str,
    overrides: dict,
    workdir: Path,
    stage_names: list[str],
) -> mc.ConfigDict:
    """One run's config: the base plus its overrides, stage references resolved, validated."""
    try:
        run = override_copy(cfg, {**overrides, "stages": (), "variants": (), "variant_seeds": ()})
    except ConfigError as e:
        raise ConfigError(f"run {name!r}: {e}") from None
    ref = run.init.checkpoint
    if ref.startswith("stage:"):
        stage = ref.split(":", 1)[1]
        if stage not in stage_names:
            raise ConfigError(
                f"run {name!r}: config.init.checkpoint {ref!r} names no stage; stages: {stage_names}"
            )
        run.init.checkpoint = str(workdir / stage / "params")
    try:
        prepare(run)
    except ConfigError as e:
        raise ConfigError(f"run {name!r}: {e}") from None
    return run


def run_experiment(cfg: mc.ConfigDict, workdir: str | Path) -> dict:
    """Train a plain config, or every stage then every variant of a multi-run one."""
    workdir = Path(workdir)
    if not cfg.stages and not cfg.variants:
        return train(cfg, workdir)
    validate(cfg)
    stage_names = [name for name, _ in cfg.stages]
    seeds = list(cfg.variant_seeds)
    # Derive (and so validate) every run before the first one starts.
    stages = [(n, workdir / n, derive(cfg, n, o, workdir, stage_names)) for n, o in cfg.stages]
    variants = []
    for name, overrides in cfg.variants:
        for seed in seeds or [None]:
            extra = {} if seed is None else {"seed": seed, "data.split_seed": seed}
            where = workdir / name if seed is None else workdir / name / f"seed_{seed}"
            variants.append(
                (
                    name,
                    where,
                    derive(cfg, name, {**overrides, **extra}, workdir, stage_names),
                )
            )
    for name, where, run in stages:
        log.info("== stage %s", name)
        train(run, where)
    results: dict[str, list[dict]] = {}
    for name, where, run in variants:
        log.info("== variant %s (%s)", name, where.relative_to(workdir))
        summary = train(run, where)
        results.setdefault(name, []).append({**summary, "workdir": str(where)})
    if results and jax.process_index() == 0:
        write_comparison(workdir, results, cfg.early_stopping.metric)
    return results


def _mean_std(values: list[float | None], sign: str = "") -> str | None:
    if any(v is None for v in values):
        return None
    if len(values) == 1:
        return f"{values[0]:{sign}.3f}"
    return f"{np.mean(values):{sign}.3f} ± {np.std(values):.3f}"


def write_comparison(workdir: Path, results: dict[str, list[dict]], curve_metric: str) -> None:
    """Markdown table (mean ± std over seeds), JSON of every run, and validation curves."""

    def score(run: dict) -> float | None:
        final = run["test"] or run["val"]
        return final.get("accuracy", final.get("mse"))

    baseline_name, baseline = next(iter(results.items()))
    rows = []
    for name, runs in results.items():
        tests = [r["test"] or r["val"] for r in runs]
        paired = [score(r) - score(b) for r, b in zip(runs, baseline)]  # same seed, same split
        rows.append(
            {
                "variant": name,
                "delta": _mean_std(paired, "+") if name != baseline_name else None,
                "accuracy": _mean_std([t.get("accuracy") for t in tests]),
                "f1_macro": _mean_std([t.get("f1_macro") for t in tests]),
                "mse": _mean_std([t.get("mse") for t in tests]),
                "trainable": runs[0]["trainable_params"],
                "total": runs[0]["total_params"],
                "steps": int(np.mean([r["steps"] for r in runs])),
                "wall_time_s": float(np.mean([r["wall_time_s"] for r in runs])),
            }
        )
    classification = rows[0]["accuracy"] is not None
    columns = [("variant", "variant", "")]
    columns += (
        [("accuracy", "test accuracy", ""), ("f1_macro", "test macro F1", "")]
        if classification
        else [("mse", "test MSE", "")]
    )
    columns += [
        ("delta", f"Δ vs {baseline_name} (paired)", ""),
        ("trainable", "trainable params", ",d"),
        ("total", "total params", ",d"),
        ("steps", "steps", "d"),
        ("wall_time_s", "wall time per run (s)", ".1f"),
    ]
    n_seeds = len(next(iter(results.values())))
    table = markdown_table(rows, columns)
    if n_seeds > 1:
        table += (
            f"\nMean ± std over {n_seeds} seeds (each its own split and labelled subset); "
            f"Δ is the per-seed difference from {baseline_name}'s test score on the same split.\n"
        )
    (workdir / "results.md").write_text(table)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    series = {
        name: [
            (r["step"], r[curve_metric])
            for r in read_metrics(Path(runs[0]["workdir"]) / "metrics.jsonl")
            if curve_metric in r
        ]
        for name, runs in results.items()
    }
    title = f"{curve_metric} by variant" + (" (first seed)" if n_seeds > 1 else "")
    plots.plot_curves(series, workdir / "comparison.png", title, curve_metric)
    log.info("comparison written to %s:\n%s", workdir / "results.md", table)
