"""Tests for the run/experiment report (ftlab.eval.run_report, document, cells) on fake run
directories: no training, only the files a run leaves behind."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from ftlab.eval import plots
from ftlab.eval.cells import fmt, mean_std, value_blocks
from ftlab.eval.document import Bullets, Heading, Paragraph, Table, parse_markdown
from ftlab.eval.run_report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOID = {"meta", "img", "br", "hr", "link", "input"}
SECTIONS = [
    "Results",
    "Before vs after fine-tuning",
    "Learning curves",
    "Confusion matrices",
    "Per-group metrics",
    "Most confused classes",
    "Misclassified examples",
    "Fit diagnosis",
    "Label issues",
    "Data",
    "Lineage",
    "Environment",
]
COMPARISON = (
    "| variant | test accuracy | note |\n| --- | --- | --- |\n"
    "| scratch | 0.893 ± 0.039 | a \\| b |\n| lora | 0.903 ± 0.034 | – |\n\n"
    "Mean ± std over **2 seeds**.\n"
)


class Checker(HTMLParser):
    """Records tag balance errors, images and every src/href."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict] = []
        self.links: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def _check_html(path: Path) -> Checker:
    checker = Checker()
    checker.feed(path.read_text())
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert not checker.tags & {"script", "link", "iframe"}
    for link in checker.links:
        assert link.startswith(("data:image/png;base64,", "#")), link[:60]
    for img in checker.images:
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert data[:8] == PNG_MAGIC
    return checker


def _summary(seed: int, analysis: dict) -> dict:
    cm = [[4, 1], [2, 3]]
    return {
        "task": "classification",
        "class_names": ["neg", "pos"],
        "steps": 20,
        "best_step": 10,
        "trainable_params": 1234,
        "total_params": 5678,
        "wall_time_s": 3.0 + seed,
        "examples_per_sec": 1500.0,
        "peak_memory_bytes": 3 * 2**30,
        "val": {"loss": 0.5, "accuracy": 0.8},
        "test": {
            "loss": 0.4,
            "accuracy": 0.7 + seed / 10,
            "f1_macro": 0.65,
            "confusion_matrix": cm,
            "by_group": {
                "a": {"n": 5, "accuracy": 0.8, "f1_macro": 0.7},
                "b": {"n": 5, "accuracy": 0.6, "f1_macro": 0.5},
            },
            "group_accuracy_gap": 0.2,
        },
        "before": {"val": {"loss": 0.7, "accuracy": 0.5}, "test": {"loss": 0.7, "accuracy": 0.5}},
        "verdict": {
            "verdict": "overfitting",
            "since_step": 10,
            "evidence": "val loss rose 20% after step 10",
            "remedies": ["Stop early <now>", "Regularise"],
        },
        "lineage": [{"run": "/x/pretrain", "method": "full", "steps": 100}],
        "analysis": analysis,
        "environment": {
            "python": "3.11",
            "packages": {"jax": "0.10.2", "numpy": "2.0"},
            "backend": "cpu",
            "devices": [{"kind": "cpu", "count": 1}],
        },
    }


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, dict[str, list[Path]]]:
    """Two variants x two seeds; one variant's mistakes as an image grid, the other's as text."""
    root = tmp_path_factory.mktemp("exp")
    records = [{"step": s, "train/loss": 1 / (s + 1), "val/accuracy": s / 20} for s in range(5)]
    curves = plots.plot_history(records, root / "curves.png")
    matrix = plots.plot_confusion_matrix([[4, 1], [2, 3]], ["neg", "pos"], root / "cm.png")
    grid = plots.plot_image_grid(
        [np.eye(8), np.ones((8, 8, 3))], ["neg → pos (0.91)", "pos → neg (0.80)"], root / "g.png"
    )
    plots.plot_curves({"scratch": [(0, 0.5), (4, 0.8)]}, root / "comparison.png", "c", "acc")
    fairness = {
        "demographic_parity_difference": 0.25,
        "equal_opportunity_difference": 0.05,
        "by_group": {"a": {"n": 5, "n_positive": 2, "positive_rate": 0.6}},
        "threshold": 0.1,
        "flagged": ["demographic_parity_difference"],
    }
    confused = [{"true": "pos", "predicted": "neg", "count": 2, "share_of_true": 0.4}]
    runs: dict[str, list[Path]] = {}
    for variant in ("scratch", "lora"):
        for seed in (0, 1):
            d = root / variant / f"seed_{seed}"
            d.mkdir(parents=True)
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
            (d / "learning_curves.png").write_bytes(curves.read_bytes())
            (d / "confusion_matrix.png").write_bytes(matrix.read_bytes())
            if variant == "scratch":
                (d / "misclassified.png").write_bytes(grid.read_bytes())
                mis = {"count": 3, "total": 10, "shown": 2, "file": "misclassified.png"}
            else:
                rows = [{"index": 4, "true": "pos", "predicted": "neg", "text": "<i>meh</i>"}]
                (d / "misclassified.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
                mis = {"count": 1, "total": 10, "shown": 1, "file": "misclassified.jsonl"}
            analysis = {"split": "test", "most_confused": confused, "misclassified": mis}
            analysis["fairness"] = fairness
            (d / "summary.json").write_text(json.dumps(_summary(seed, analysis)))
            report = {
                "clean": {"dropped_duplicates": 3},
                "splits": {"train": {"n": 100}, "val": {"n": 20}},
                "class_weights": [1.0, 2.0],
            }
            (d / "data_report.json").write_text(json.dumps(report))
            (d / "label_issues.csv").write_text("index,label,suggested\n3,neg,pos\n7,pos,neg\n")
            runs.setdefault(variant, []).append(d)
    return root, runs


def test_experiment_report(experiment, tmp_path):
    root, runs = experiment
    title = "Digits <script>alert(1)</script> & co"
    md_path, html_path = write_report(
        tmp_path / "out", title, runs, COMPARISON, [root / "comparison.png"]
    )
    assert (md_path.name, html_path.name) == ("report.md", "report.html")
    md = md_path.read_text()
    headings = re.findall(r"^## (.+)$", md, re.MULTILINE)
    assert headings == SECTIONS
    # images are linked relative to the report and exist
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (md_path.parent / link).is_file(), link
    assert "first of 2 seeds: seed_0" in md
    assert "| scratch | 0.893 ± 0.039 | a \\| b |" in md  # the comparison, verbatim

    checker = _check_html(html_path)
    # comparison + 2 learning curves + 2 confusion matrices + 1 misclassified grid
    assert len(checker.images) == 6
    page = html_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<td>a | b</td>" in page  # escaped pipe parsed into one cell
    assert "&lt;i&gt;meh&lt;/i&gt;" in page  # misclassified text rows, escaped
    assert "Stop early &lt;now&gt;" in page
    assert "Flagged: demographic parity difference" in page
    assert "3.0 GiB" in page  # peak memory, human-readable
    for section in SECTIONS:
        assert f'href="#{re.sub(r"[^a-z0-9]+", "-", section.lower())}"' in page


def test_single_run_report_tolerates_missing_keys(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {"val": {"loss": 0.3, "mse": 0.25}, "test": {}, "steps": 7}
    (run / "summary.json").write_text(json.dumps(summary))
    empty = tmp_path / "empty"  # a run dir without any file: skipped, not an error
    empty.mkdir()
    md_path, html_path = write_report(tmp_path / "out", "one run", {"run": [run], "x": [empty]})
    md = md_path.read_text()
    headings = re.findall(r"^## (.+)$", md, re.MULTILINE)
    assert headings == ["Results", "Environment"]
    assert "| run | val | 0.25 | 0.3 |" in md  # held-out metrics: val when no test split
    assert "| x | – | – | – |" in md
    checker = _check_html(html_path)
    assert checker.images == []


def test_parse_markdown_blocks():
    blocks = parse_markdown("# T\n\npara one\nline two\n\n- a\n- b\n\n| x | y \\| z |\n|---|---|\n")
    assert blocks == [
        Heading("T", 1),
        Paragraph("para one line two"),
        Bullets(["a", "b"]),
        Table(["x", "y | z"], []),
    ]


def test_cells_formatting_and_generic_blocks():
    assert fmt(None) == "–" and fmt(12345) == "12,345" and fmt(0.123456) == "0.1235"
    assert fmt(True) == "yes" and fmt([1, 2.5]) == "1, 2.5" and fmt(123456.7) == "123,457"
    assert mean_std([0.5]) == "0.5" and mean_std([0.4, 0.6]) == "0.5 ± 0.1"
    assert mean_std([None, float("nan")]) == "–"
    blocks = value_blocks({"n": 3, "splits": {"train": {"n": 1}, "val": {"n": 2}}})
    assert blocks[0] == Table(["key", "value"], [["n", "3"]])
    assert blocks[1] == Heading("splits", 3)
    assert blocks[2] == Table(["", "n"], [["train", "1"], ["val", "2"]])
