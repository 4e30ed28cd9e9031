"""Multi-run experiments: stages run in order (e.g. pretraining), then variants compared.

A config lists ``stages`` and ``variants`` as ``(name, {dotted.key: value})`` pairs applied
on top of itself, and may declare a ``sweep`` (a grid of keys and zipped groups, see
``ftlab.sweep``) that expands into more variants; ``init.checkpoint = "stage:NAME"`` points a
run at the parameters a stage saved. Each run gets ``workdir/NAME`` (``workdir/NAME/seed_S``
when ``variant_seeds`` repeats variants over seeds, each seed drawing its own data split and
labelled subset).

Every run is derived and checked before the first one starts. Rerunning the same command
resumes: a run whose ``summary.json`` sits beside an identical ``config.json`` is finished and
only its summary is read; an interrupted one resumes from its checkpoint. Each distinct data
config (with the tokenizer) is loaded once and shared by the runs that use it.

The comparison (``ftlab.eval.compare``) goes to ``workdir/results.md`` (mean ± std over
seeds, paired deltas against ``config.baseline``), ``results.json`` and ``comparison.png``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from pathlib import Path

import jax
import ml_collections as mc

from ftlab import sweep, tree
from ftlab import workdir as workdir_lib
from ftlab.config import ConfigError, override_copy, to_dict
from ftlab.eval.compare import write_comparison
from ftlab.schema import validate
from ftlab.train.loop import check_writable, prepare, train

__all__ = ["DataCache", "Planned", "derive", "describe", "plan", "run_experiment"]

log = logging.getLogger("ftlab")

# What defines the experiment rather than one run: cleared in every run's config.
_EXPERIMENT_KEYS = {
    "stages": (),
    "variants": (),
    "variant_seeds": (),
    "sweep.grid": (),
    "sweep.zip": (),
    "baseline": "",
}


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of an experiment, before its config is derived."""

    kind: str  # "stage" | "variant"
    name: str
    seed: int | None
    workdir: Path
    overrides: dict


def plan(cfg: mc.ConfigDict, workdir: str | Path) -> list[Planned]:
    """Stages in order, then every compared variant (declared x sweep) once per seed."""
    workdir = Path(workdir)
    runs = [Planned("stage", n, None, workdir / n, dict(o)) for n, o in cfg.stages]
    for name, overrides in sweep.expand(cfg):
        for seed in list(cfg.variant_seeds) or [None]:
            extra = {} if seed is None else {"seed": seed, "data.split_seed": seed}
            where = workdir / name if seed is None else workdir / name / f"seed_{seed}"
            runs.append(Planned("variant", name, seed, where, {**overrides, **extra}))
    return runs


def _run_config(
    cfg: mc.ConfigDict, name: str, overrides: dict, workdir, stage_names: list[str]
) -> mc.ConfigDict:
    """The base plus the run's overrides, experiment keys cleared, stage references resolved
    (to ``workdir/STAGE/params``; ``workdir`` a local path or the bucket's)."""
    try:
        run = override_copy(cfg, {**overrides, **_EXPERIMENT_KEYS})
    except ConfigError as e:
        raise ConfigError(f"run {name!r}: {e}") from None
    for key in ("init.checkpoint", "distill.teacher"):  # parameters a stage saved
        section, field = key.split(".")
        ref = run[section][field]
        if not ref.startswith("stage:"):
            continue
        stage = ref.split(":", 1)[1]
        if stage not in stage_names:
            raise ConfigError(
                f"run {name!r}: config.{key} {ref!r} names no stage; stages: {stage_names}"
            )
        run[section][field] = str(workdir / stage / "params")
    return run


class DataCache:
    """``load_dataset`` results keyed by ``config.data`` and the tokenizer (``model.pretrained``).

    Runs that differ only in model, method or optimiser share one load (seeds change
    ``data.split_seed``, so each seed has its own). A dataset is dropped once the last run
    that needs it has trained (``expect``/``release``), and the least recently used ones are
    dropped while the cache holds more than ``max_bytes`` (they are loaded again if needed).
    """

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = _default_budget() if max_bytes is None else max_bytes
        self._data: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._sizes: dict[str, int] = {}
        self._pending: collections.Counter[str] = collections.Counter()
        self.loads = 0

    @staticmethod
    def key(run: mc.ConfigDict) -> str:
        return json.dumps(
            {"data": to_dict(run.data), "tokenizer": run.model.pretrained}, sort_keys=True
        )

    def get(self, run: mc.ConfigDict):
        from ftlab import data as data_lib

        key = self.key(run)
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        data = data_lib.load_dataset(run.data, tokenizer=run.model.pretrained)
        self.loads += 1
        self._data[key], self._sizes[key] = data, _nbytes(data)
        while len(self._data) > 1 and sum(self._sizes.values()) > self.max_bytes:
            old, _ = self._data.popitem(last=False)
            self._sizes.pop(old)
        return data

    def expect(self, run: mc.ConfigDict) -> None:
        """One more run will train on ``run``'s data."""
        self._pending[self.key(run)] += 1

    def release(self, run: mc.ConfigDict) -> None:
        """A run that needed ``run``'s data has trained; drop the data after the last one."""
        key = self.key(run)
        self._pending[key] -= 1
        if self._pending[key] <= 0 and key in self._data:
            del self._data[key], self._sizes[key]


def _default_budget() -> int:
    """A quarter of the host's memory (4 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def _nbytes(data) -> int:
    total = 0
    for name in ("train", "val", "test"):
        for value in getattr(data, name).arrays(with_text=True).values():
            total += getattr(value, "nbytes", 0)
    return total


def derive(
    cfg: mc.ConfigDict,
    name: str,
    overrides: dict,
    workdir: Path,
    stage_names: list[str],
    cache: DataCache | None = None,
) -> mc.ConfigDict:
    """One run's config: the base plus its overrides, stage references resolved, validated
    (data, model and method resolved without compiling; the data from ``cache`` if given)."""
    run = _run_config(cfg, name, overrides, workdir, stage_names)
    _check(run, name, cache)
    return run


def _check(run: mc.ConfigDict, name: str, cache: DataCache | None) -> None:
    try:
        validate(run)
        prepare(run, data=cache.get(run) if cache is not None else None)
    except ConfigError as e:
        raise ConfigError(f"run {name!r}: {e}") from None


def _finished(name: str, run: mc.ConfigDict, where: Path) -> dict | None:
    """The summary of a finished run of this config in ``where``; None when there is none
    yet. A different run already in ``where`` is an error now, before anything trains."""
    config = where / "config.json"
    if not config.exists():
        return None
    saved = tree.flatten(json.loads(config.read_text()))
    now = tree.flatten(json.loads(json.dumps(to_dict(run))))
    changed = sorted(
        k.replace("/", ".") for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)
    )
    if changed:
        raise ConfigError(
            f"run {name!r}: {where} already holds a run with a different config (changed: "
            f"{', '.join(changed)}); use a new --workdir, or the same config to resume"
        )
    summary = where / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None


def run_experiment(cfg: mc.ConfigDict, workdir: str | Path) -> dict:
    """Train a plain config, or every stage then every variant of a multi-run one; returns
    ``{variant: [summary per seed]}`` (a plain config: its summary).

    A URL workdir (``gs://bucket/experiment``) is staged as one (``ftlab.workdir``): the runs'
    small files sit in the stage below it, their checkpoints and params go to the bucket, and
    every run's files are pushed when it ends."""
    if not plan(cfg, "WORKDIR"):
        return train(cfg, workdir)
    validate(cfg)
    check_writable(workdir)  # before any data is loaded
    with workdir_lib.opened(workdir) as root:
        return _run_all(cfg, root)


def _run_all(cfg: mc.ConfigDict, root: workdir_lib.Workdir) -> dict:
    planned = plan(cfg, root.local)
    stage_names = [name for name, _ in cfg.stages]
    cache = DataCache()
    # Derive (and so validate) every run before the first one starts; finished runs are
    # only read back, so resuming an interrupted sweep reruns the unfinished points alone.
    jobs = []
    for p in planned:
        run = _run_config(cfg, p.name, p.overrides, root.store, stage_names)
        done = _finished(p.name, run, p.workdir)
        if done is None:
            _check(run, p.name, cache)
            cache.expect(run)
        jobs.append((p, run, done))
    todo = sum(done is None for _, _, done in jobs)
    log.info(
        "experiment: %d runs (%d stage runs, %d variant runs), %d to train, %d finished",
        len(jobs),
        len(cfg.stages),
        len(jobs) - len(cfg.stages),
        todo,
        len(jobs) - todo,
    )
    results: dict[str, list[dict]] = {}
    for i, (p, run, done) in enumerate(jobs, 1):
        label = f"{p.kind} {p.name}" + ("" if p.seed is None else f" seed {p.seed}")
        rel = p.workdir.relative_to(root.local)
        if done is None:
            log.info("== [%d/%d] %s (%s)", i, len(jobs), label, rel)
            summary = train(run, root.child(rel), data=cache.get(run))
            cache.release(run)
            root.sync()  # a remote experiment: this run's files are in the bucket now
        else:
            log.info("== [%d/%d] %s: finished already, summary read", i, len(jobs), label)
            summary = done
        if p.kind == "variant":
            where = f"{root.url}/{rel.as_posix()}" if root.url else str(p.workdir)
            results.setdefault(p.name, []).append({**summary, "workdir": where, "seed": p.seed})
    if results and jax.process_index() == 0:

        def staged(where: str) -> Path:  # a run's files: in the stage of a remote experiment
            return root.local / where.removeprefix(f"{root.url}/") if root.url else Path(where)

        metric, baseline = cfg.early_stopping.metric, cfg.baseline or None
        table = write_comparison(root.local, results, metric, baseline=baseline, locate=staged)
        _write_report(root.local, results, table, staged)
    return results


def _write_report(
    workdir: Path, results: dict[str, list[dict]], table_md: str, locate=Path
) -> None:
    """The experiment's report.md / report.html: the comparison, then every variant's curves,
    confusion matrices, analysis, verdict and data report (first seed's pictures)."""
    from ftlab.eval.run_report import write_report

    runs = {name: [locate(r["workdir"]) for r in rs] for name, rs in results.items()}
    images = [workdir / "comparison.png"] if (workdir / "comparison.png").exists() else []
    write_report(workdir, workdir.name, runs, table_md, images)


def _overrides_text(overrides: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "(the base config)"


def describe(cfg: mc.ConfigDict) -> str:
    """What ``run_experiment`` would run (``ftlab list CONFIG``): stages, declared variants,
    sweep points with their overrides, seeds, the compared variants and the number of runs.
    Keys and values are checked (every run's config is derived); no data is read."""
    compared = sweep.expand(cfg)
    stage_names = [name for name, _ in cfg.stages]
    for p in plan(cfg, Path("WORKDIR")):
        _run_config(cfg, p.name, p.overrides, Path("WORKDIR"), stage_names)
    if not cfg.stages and not compared:
        return "a single run (no stages, variants or sweep)\ntotal runs: 1\n"
    lines = []
    if cfg.stages:
        lines.append(f"stages ({len(cfg.stages)}, run first, in order):")
        lines += [f"  {n}: {_overrides_text(dict(o))}" for n, o in cfg.stages]
    if cfg.variants:
        lines.append(f"variants ({len(cfg.variants)}):")
        lines += [f"  {n}: {_overrides_text(dict(o))}" for n, o in cfg.variants]
    found = sweep.axes(cfg)
    points = sweep.points(cfg)
    if found:
        shape = " x ".join(f"{'+'.join(a.keys)} ({len(a.points)})" for a in found)
        lines.append(f"sweep ({len(points)} points: {shape}):")
        lines += [f"  {n}: {_overrides_text(o)}" for n, o in points]
    seeds = list(cfg.variant_seeds)
    if found and cfg.variants:
        how = f"{len(cfg.variants)} variants x {len(points)} sweep points"
    elif found:
        how = "the sweep points"
    else:
        how = "the variants"
    lines.append(f"compared ({len(compared)}: {how}):")
    lines.append("  " + ", ".join(n for n, _ in compared))
    if compared:
        lines.append(f"baseline: {sweep.baseline_name(cfg, [n for n, _ in compared])}")
    lines.append(
        f"seeds: {', '.join(map(str, seeds))} (each compared variant once per seed)"
        if seeds
        else "seeds: one run per variant (config.seed)"
    )
    per = len(compared) * max(len(seeds), 1)
    stages = len(cfg.stages)
    lines.append(
        f"total runs: {stages + per}"
        + (f" ({stages} stage{'s' * (stages != 1)} + {per})" if stages and per else "")
    )
    return "\n".join(lines) + "\n"
