"""Multi-run experiments: stages run in order (e.g. pretraining), then variants compared.

A config lists ``stages`` and ``variants`` as ``(name, {dotted.key: value})`` pairs applied
on top of itself; ``init.checkpoint = "stage:NAME"`` points a run at the parameters a stage
saved. Each run gets ``workdir/NAME``; the comparison goes to ``workdir/results.md``,
``results.json`` and ``comparison.png``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections as mc

from ftlab.config import ConfigError, override_copy
from ftlab.eval import plots
from ftlab.eval.report import markdown_table
from ftlab.schema import validate
from ftlab.train.loop import train
from ftlab.train.writer import read_metrics

log = logging.getLogger("ftlab")


def derive(cfg: mc.ConfigDict, name: str, overrides: dict, workdir: Path, stage_names: list[str]) -> mc.ConfigDict:
    """One run's config: the base plus its overrides, stage references resolved, validated."""
    try:
        run = override_copy(cfg, {**overrides, "stages": (), "variants": ()})
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
    validate(run)
    return run


def run_experiment(cfg: mc.ConfigDict, workdir: str | Path) -> dict:
    """Train a plain config, or every stage then every variant of a multi-run one."""
    workdir = Path(workdir)
    if not cfg.stages and not cfg.variants:
        return train(cfg, workdir)
    validate(cfg)
    stage_names = [name for name, _ in cfg.stages]
    # Derive (and so validate) every run before the first one starts.
    stages = [(n, derive(cfg, n, o, workdir, stage_names)) for n, o in cfg.stages]
    variants = [(n, derive(cfg, n, o, workdir, stage_names)) for n, o in cfg.variants]
    for name, run in stages:
        log.info("== stage %s", name)
        train(run, workdir / name)
    results = {}
    for name, run in variants:
        log.info("== variant %s", name)
        results[name] = train(run, workdir / name)
    if results:
        write_comparison(workdir, results, cfg.early_stopping.metric)
    return results


def write_comparison(workdir: Path, results: dict[str, dict], curve_metric: str) -> None:
    rows = []
    for name, s in results.items():
        test = s["test"] or s["val"]
        rows.append(
            {
                "variant": name,
                "accuracy": test.get("accuracy"),
                "f1_macro": test.get("f1_macro"),
                "mse": test.get("mse"),
                "trainable": s["trainable_params"],
                "total": s["total_params"],
                "steps": s["steps"],
                "wall_time_s": s["wall_time_s"],
            }
        )
    classification = rows[0]["accuracy"] is not None
    columns = [("variant", "variant", "")]
    columns += (
        [("accuracy", "test accuracy", ".3f"), ("f1_macro", "test macro F1", ".3f")]
        if classification
        else [("mse", "test MSE", ".4f")]
    )
    columns += [
        ("trainable", "trainable params", ",d"),
        ("total", "total params", ",d"),
        ("steps", "steps", "d"),
        ("wall_time_s", "wall time (s)", ".1f"),
    ]
    table = markdown_table(rows, columns)
    (workdir / "results.md").write_text(table)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    series = {
        name: [(r["step"], r[curve_metric]) for r in read_metrics(workdir / name / "metrics.jsonl") if curve_metric in r]
        for name in results
    }
    plots.plot_curves(series, workdir / "comparison.png", f"{curve_metric} by variant", curve_metric)
    log.info("comparison written to %s:\n%s", workdir / "results.md", table)
