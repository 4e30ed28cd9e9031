"""report.md and a self-contained report.html for one run or a whole experiment.

Everything comes from what runs leave in their directories (summary.json, the PNGs,
data_report.json, label_issues.csv, misclassified.*), so a report can be rebuilt later
without training. Every section is optional: a key or file a run lacks skips it, never
fails the report. A variant repeated over seeds shows its first seed's pictures and details,
and says so; tables of scores average over the seeds.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftlab.eval.cells import fmt, human_bytes, is_number, mean_std, records_table, value_blocks
from ftlab.eval.document import (
    Block,
    Bullets,
    Heading,
    Image,
    Paragraph,
    Raw,
    Table,
    render_html,
    render_markdown,
)
from ftlab.eval.report import MISSING

__all__ = ["RunDir", "load_runs", "report_blocks", "write_report"]

PREVIEW_ROWS = 10  # rows of a CSV / JSON-lines file shown in the report
# Headline metrics first, in this order; other scalar metrics follow alphabetically.
_METRIC_ORDER = (
    "accuracy",
    "f1_macro",
    "precision_macro",
    "recall_macro",
    "token_accuracy",
    "perplexity",
    "chrf",
    "mse",
    "mae",
    "r2",
    "loss",
)
_METRIC_NAMES = {
    "f1_macro": "macro F1",
    "precision_macro": "macro precision",
    "recall_macro": "macro recall",
    "token_accuracy": "token accuracy",
    "chrf": "chrF",
    "mse": "MSE",
    "mae": "MAE",
    "r2": "R²",
}
_NOT_IN_RESULTS = ("group_accuracy_gap",)  # shown with the per-group metrics


@dataclasses.dataclass(frozen=True)
class RunDir:
    """One run's directory and its summary.json ({} when absent or unreadable)."""

    variant: str
    path: Path
    summary: dict
    seeds: int  # how many runs its variant has

    @property
    def label(self) -> str:
        return self.variant if self.seeds == 1 else f"{self.variant}/{self.path.name}"

    def held_out(self) -> tuple[str, dict]:
        """The split final scores are read on: test, or val for a run without a test split."""
        for split in ("test", "val"):
            if isinstance(self.summary.get(split), dict) and self.summary[split]:
                return split, self.summary[split]
        return "test", {}

    def file(self, name: str) -> Path | None:
        path = self.path / name
        return path if path.is_file() else None

    def analysis(self) -> dict:
        value = self.summary.get("analysis")
        return value if isinstance(value, dict) else {}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_runs(runs: dict[str, list[Path]]) -> dict[str, list[RunDir]]:
    """Each variant's run directories with their summaries; variants without runs dropped."""
    loaded = {}
    for variant, paths in runs.items():
        paths = [Path(p) for p in paths]
        if paths:
            loaded[variant] = [
                RunDir(variant, p, _dict(_read_json(p / "summary.json")), len(paths)) for p in paths
            ]
    return loaded


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _metric_keys(dicts: list[dict]) -> list[str]:
    keys = {
        k
        for d in dicts
        for k, v in d.items()
        if is_number(v) and k not in _NOT_IN_RESULTS and not k.startswith("_")
    }
    ordered = [k for k in _METRIC_ORDER if k in keys]
    return ordered + sorted(keys - set(ordered))


def _name(key: str) -> str:
    return _METRIC_NAMES.get(key, key.replace("_", " "))


def _first_note(runs: list[RunDir]) -> str:
    """Says whose pictures/details are shown when a variant has several seeds."""
    if len(runs) == 1:
        return ""
    return f" (first of {len(runs)} seeds: {runs[0].path.name})"


def _per_variant(
    variants: dict[str, list[RunDir]],
    title: str,
    build: Callable[[RunDir], list[Block]],
    level: int = 3,
) -> list[Block]:
    """Blocks that ``build(first_run)`` makes for each variant's first run, under a heading
    per variant when there are several; [] when no variant has any."""
    blocks: list[Block] = []
    for name, runs in variants.items():
        inner = build(runs[0])
        if not inner:
            continue
        if len(variants) > 1 or len(runs) > 1:
            blocks.append(Heading(f"{name}{_first_note(runs)}", level))
        blocks += inner
    return [Heading(title)] + blocks if blocks else []


def _distinct(variants: dict[str, list[RunDir]], name: str) -> list[tuple[list[str], Path]]:
    """Each distinct content of file ``name`` across all runs, with the runs that have it
    (variants of one data config share their data report)."""
    seen: dict[bytes, tuple[list[str], Path]] = {}
    for runs in variants.values():
        for run in runs:
            path = run.file(name)
            if path is not None:
                seen.setdefault(path.read_bytes(), ([], path))[0].append(run.label)
    return list(seen.values())


def _who(labels: list[str], total: int) -> str:
    """ "all runs", or the first few run labels."""
    if len(labels) == total:
        return "all runs" if total > 1 else labels[0]
    return ", ".join(labels[:6]) + (f" and {len(labels) - 6} more" if len(labels) > 6 else "")


# --- sections -----------------------------------------------------------------------------


def _intro(title: str, variants: dict[str, list[RunDir]], env: dict) -> list[Block]:
    n_runs = sum(len(r) for r in variants.values())
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"Generated {when} from {n_runs} run{'s' if n_runs != 1 else ''}"]
    if any(len(runs) > 1 for runs in variants.values()):
        parts[0] += ": " + ", ".join(
            f"{name} ({len(runs)} seed{'s' if len(runs) != 1 else ''})"
            for name, runs in variants.items()
        )
    elif len(variants) > 1:
        parts[0] += ": " + ", ".join(variants)
    first = next(iter(variants.values()))[0].summary if variants else {}
    if first.get("task"):
        task = f"Task: {first['task']}"
        if isinstance(first.get("class_names"), list):
            task += f", {len(first['class_names'])} classes"
        parts.append(task)
    parts.append(_env_line(env))
    return [Heading(title, 1), Paragraph(". ".join(p for p in parts if p) + ".")]


def _env_line(env: dict) -> str:
    packages = _dict(env.get("packages"))
    devices = env.get("devices") if isinstance(env.get("devices"), list) else []
    on = ", ".join(f"{d.get('count')} × {d.get('kind')}" for d in devices if isinstance(d, dict))
    jax_version = packages.get("jax")
    if not jax_version and not env.get("backend"):
        return ""
    text = f"jax {jax_version or '?'} on {env.get('backend', '?')}"
    return text + (f" ({on})" if on else "")


def _results(variants: dict[str, list[RunDir]], comparison_md: str | None) -> list[Block]:
    blocks: list[Block] = []
    if comparison_md and comparison_md.strip():
        blocks.append(Raw(comparison_md))
    else:
        held = {name: [r.held_out() for r in runs] for name, runs in variants.items()}
        keys = _metric_keys([m for pairs in held.values() for _, m in pairs])
        if keys:
            several = any(len(runs) > 1 for runs in variants.values())
            headers = (
                ["variant", "split"] + (["seeds"] if several else []) + [_name(k) for k in keys]
            )
            rows = []
            for name, pairs in held.items():
                split = pairs[0][0] if pairs[0][1] else MISSING
                row = [name, split] + ([str(len(pairs))] if several else [])
                rows.append(row + [mean_std([m.get(k) for _, m in pairs]) for k in keys])
            blocks.append(Table(headers, rows))
            if several:
                blocks.append(Paragraph("Mean ± std over seeds."))
    blocks += _cost(variants)
    return [Heading("Results")] + blocks if blocks else []


_COST = (
    ("trainable_params", "trainable params", "first"),
    ("total_params", "total params", "first"),
    ("steps", "steps", "mean"),
    ("best_step", "best step", "mean"),
    ("wall_time_s", "wall time (s)", "mean"),
    ("examples_per_sec", "examples/s", "mean"),
    ("tokens_per_sec", "tokens/s", "mean"),
    ("peak_memory_bytes", "peak device memory", "bytes"),
)


def _cost(variants: dict[str, list[RunDir]]) -> list[Block]:
    present = [
        c
        for c in _COST
        if any(is_number(r.summary.get(c[0])) for v in variants.values() for r in v)
    ]
    if not present:
        return []
    rows = []
    for name, runs in variants.items():
        row = [name]
        for key, _, how in present:
            values = [r.summary.get(key) for r in runs]
            if how == "first":
                row.append(fmt(values[0]))
            elif how == "bytes":
                nums = [v for v in values if is_number(v)]
                row.append(human_bytes(max(nums)) if nums else MISSING)
            else:  # a plain mean: the spread of a step count or a speed says little
                nums = [float(v) for v in values if is_number(v)]
                row.append(fmt(sum(nums) / len(nums)) if nums else MISSING)
        rows.append(row)
    blocks: list[Block] = [
        Heading("Cost and speed", 3),
        Table(["variant"] + [h for _, h, _ in present], rows),
    ]
    if any(len(runs) > 1 for runs in variants.values()):
        blocks.append(Paragraph("Per run: means over seeds; peak memory the largest."))
    return blocks


def _before_after(variants: dict[str, list[RunDir]]) -> list[Block]:
    rows = []
    for name, runs in variants.items():
        with_before = [r for r in runs if isinstance(r.summary.get("before"), dict)]
        for split in ("val", "test"):
            pairs = [
                (_dict(r.summary["before"].get(split)), _dict(r.summary.get(split)))
                for r in with_before
            ]
            pairs = [(b, a) for b, a in pairs if b and a]
            if not pairs:
                continue
            keys = [k for k in _metric_keys([b for b, _ in pairs]) if k in pairs[0][1]]
            for key in keys:
                before = [b.get(key) for b, _ in pairs]
                after = [a.get(key) for _, a in pairs]
                delta = [
                    a - b if is_number(a) and is_number(b) else None for b, a in zip(before, after)
                ]
                delta_text = mean_std(delta)
                if delta_text != MISSING and not delta_text.startswith("-"):
                    delta_text = "+" + delta_text
                rows.append(
                    [name, split, _name(key), mean_std(before), mean_std(after), delta_text]
                )
    if not rows:
        return []
    return [
        Heading("Before vs after fine-tuning"),
        Paragraph(
            "The starting weights scored on the same splits before any training step "
            "(means over seeds)."
        ),
        Table(["variant", "split", "metric", "before", "after", "Δ"], rows),
    ]


def _images(
    variants: dict[str, list[RunDir]], title: str, name: str, extra: list[Path] | None = None
) -> list[Block]:
    blocks: list[Block] = [
        Image(Path(p), Path(p).stem.replace("_", " ")) for p in extra or [] if Path(p).is_file()
    ]
    for variant, runs in variants.items():
        path = runs[0].file(name)
        if path is not None:
            blocks.append(Image(path, f"{variant}{_first_note(runs)}"))
    return [Heading(title)] + blocks if blocks else []


def _groups(run: RunDir) -> list[Block]:
    split, held = run.held_out()
    blocks: list[Block] = []
    by_group = _dict(held.get("by_group"))
    if by_group:
        rows = [
            [g, fmt(m.get("n")), fmt(m.get("accuracy")), fmt(m.get("f1_macro"))]
            for g, m in by_group.items()
            if isinstance(m, dict)
        ]
        blocks.append(Table(["group", "n", "accuracy", "macro F1"], rows))
        if is_number(held.get("group_accuracy_gap")):
            blocks.append(
                Paragraph(
                    f"Accuracy gap between the best and the worst group ({split}): "
                    f"{fmt(held['group_accuracy_gap'])}."
                )
            )
    fairness = _dict(run.analysis().get("fairness"))
    if fairness:
        rows = [
            [
                g,
                fmt(r.get("n")),
                fmt(r.get("n_positive")),
                fmt(r.get("positive_rate")),
                fmt(r.get("true_positive_rate")),
            ]
            for g, r in _dict(fairness.get("by_group")).items()
            if isinstance(r, dict)
        ]
        if rows:
            headers = ["group", "n", "positives", "P(pred = positive)", "true-positive rate"]
            blocks.append(Table(headers, rows))
        flagged = [str(f) for f in fairness.get("flagged") or []]
        text = (
            f"Demographic-parity difference {fmt(fairness.get('demographic_parity_difference'))}, "
            f"equal-opportunity difference {fmt(fairness.get('equal_opportunity_difference'))} "
            f"(max − min over groups; threshold {fmt(fairness.get('threshold'))}). "
        )
        text += (
            f"**Flagged: {', '.join(f.replace('_', ' ') for f in flagged)}.**"
            if flagged
            else "Neither is above the threshold."
        )
        blocks.append(Paragraph(text))
    return blocks


def _confused(run: RunDir) -> list[Block]:
    pairs = [p for p in run.analysis().get("most_confused") or [] if isinstance(p, dict)]
    if not pairs:
        return []
    rows = [
        [
            str(p.get("true")),
            str(p.get("predicted")),
            fmt(p.get("count")),
            fmt(p.get("share_of_true")),
        ]
        for p in pairs
    ]
    split = run.analysis().get("split")
    blocks: list[Block] = [Paragraph(f"On the {split} split.")] if split else []
    return blocks + [Table(["true", "predicted as", "count", "share of true class"], rows)]


def _read_jsonl(path: Path, limit: int) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if len(rows) >= limit:
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _misclassified(run: RunDir) -> list[Block]:
    info = _dict(run.analysis().get("misclassified"))
    blocks: list[Block] = []
    if is_number(info.get("count")):
        total = f" of {fmt(info['total'])}" if is_number(info.get("total")) else ""
        split = run.analysis().get("split")
        blocks.append(
            Paragraph(
                f"{fmt(info['count'])}{total} examples misclassified"
                + (f" on the {split} split" if split else "")
                + "; the most confident mistakes first."
            )
        )
    image, jsonl = run.file("misclassified.png"), run.file("misclassified.jsonl")
    rows = _read_jsonl(jsonl, PREVIEW_ROWS) if jsonl is not None and image is None else []
    if image is not None:
        blocks.append(Image(image, "true → predicted (confidence)"))
    elif rows:
        blocks.append(records_table(rows))
    return blocks


def _verdicts(variants: dict[str, list[RunDir]]) -> list[Block]:
    rows, remedies = [], {}
    for runs in variants.values():
        for run in runs:
            v = _dict(run.summary.get("verdict"))
            if not v:
                continue
            verdict = str(v.get("verdict", MISSING))
            rows.append([run.label, verdict, fmt(v.get("since_step")), fmt(v.get("evidence"))])
            if v.get("remedies"):
                entry = remedies.setdefault(verdict, ([], [str(x) for x in v["remedies"]]))
                entry[0].append(run.label)
    if not rows:
        return []
    blocks: list[Block] = [
        Heading("Fit diagnosis"),
        Table(["run", "verdict", "since step", "evidence"], rows),
    ]
    total = sum(len(r) for r in variants.values())
    for verdict, (labels, items) in remedies.items():
        blocks.append(Paragraph(f"What usually helps with **{verdict}** ({_who(labels, total)}):"))
        blocks.append(Bullets(items))
    return blocks


def _label_issues(variants: dict[str, list[RunDir]]) -> list[Block]:
    blocks: list[Block] = []
    total = sum(len(r) for r in variants.values())
    for labels, path in _distinct(variants, "label_issues.csv"):
        with open(path, newline="") as f:
            records = list(csv.DictReader(f))
        if not records:
            continue
        blocks.append(
            Paragraph(
                f"{_who(labels, total)}: {len(records)} training examples flagged as likely "
                f"mislabelled; the first {min(PREVIEW_ROWS, len(records))} (label_issues.csv):"
            )
        )
        blocks.append(records_table(records[:PREVIEW_ROWS]))
    return [Heading("Label issues")] + blocks if blocks else []


def _data_report(variants: dict[str, list[RunDir]]) -> list[Block]:
    blocks: list[Block] = []
    distinct = _distinct(variants, "data_report.json")
    total = sum(len(r) for r in variants.values())
    for labels, path in distinct:
        value = _read_json(path)
        inner = value_blocks(value, 4 if len(distinct) > 1 else 3)
        if not inner:
            continue
        if len(distinct) > 1:
            blocks.append(Heading(_who(labels, total), 3))
        blocks += inner
    return [Heading("Data")] + blocks if blocks else []


def _lineage(run: RunDir) -> list[Block]:
    lineage = run.summary.get("lineage")
    if not isinstance(lineage, list) or not lineage:
        return []
    return [
        Paragraph("Where the starting weights came from, nearest first."),
        *value_blocks([x if isinstance(x, dict) else {"value": x} for x in lineage]),
    ]


def _environment(env: dict, source: str) -> list[Block]:
    blocks = value_blocks(env)
    if not blocks:
        return []
    return [Heading("Environment"), Paragraph(source)] + blocks


def _find_environment(variants: dict[str, list[RunDir]]) -> tuple[dict, str]:
    """The first run's recorded environment, else this machine's (said so)."""
    for runs in variants.values():
        for run in runs:
            env = run.summary.get("environment")
            if isinstance(env, dict) and env:
                return env, f"As recorded by {run.label}."
    try:
        from ftlab.eval.analysis import environment

        return environment(), "No run recorded one: this is the machine that wrote the report."
    except (ImportError, RuntimeError):  # a report must not fail for want of a backend
        return {}, ""


def report_blocks(
    title: str,
    runs: dict[str, list[Path]],
    comparison_md: str | None = None,
    images: list[Path] | None = None,
) -> list[Block]:
    """Every section that has something to show, in reading order."""
    variants = load_runs(runs)
    env, source = _find_environment(variants)
    sections = [
        _intro(title, variants, env),
        _results(variants, comparison_md),
        _before_after(variants),
        _images(variants, "Learning curves", "learning_curves.png", images),
        _images(variants, "Confusion matrices", "confusion_matrix.png"),
        _per_variant(variants, "Per-group metrics", _groups),
        _per_variant(variants, "Most confused classes", _confused),
        _per_variant(variants, "Misclassified examples", _misclassified),
        _verdicts(variants),
        _label_issues(variants),
        _data_report(variants),
        _per_variant(variants, "Lineage", _lineage),
        _environment(env, source),
    ]
    return [block for section in sections for block in section]


def write_report(
    out_dir: Path,
    title: str,
    runs: dict[str, list[Path]],
    comparison_md: str | None = None,
    images: list[Path] | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/report.md`` (images linked) and ``out_dir/report.html`` (one file,
    images embedded); ``runs`` maps each variant to its run directories (one per seed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = report_blocks(title, runs, comparison_md, images)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(render_markdown(blocks, out_dir))
    html_path.write_text(render_html(title, blocks))
    return md_path, html_path
