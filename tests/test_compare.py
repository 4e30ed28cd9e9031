"""The comparison table for every task, from synthetic run summaries (no training), and
``compare_runs`` over run directories."""

import json

import pytest

from ftlab.config import ConfigError
from ftlab.eval.compare import compare, compare_runs, render, write_comparison


def run(task, test, seed=None, val=None, **extra):
    """A summary as ``train`` returns it (the keys the comparison reads)."""
    summary = {
        "task": task,
        "steps": 20,
        "trainable_params": 1_000,
        "total_params": 100_000,
        "wall_time_s": 3.0,
        "examples_per_sec": 500.0,
        "tokens_per_sec": None,
        "peak_memory_bytes": None,
        "before": None,
        "val": val or dict(test),
        "test": test,
        "seed": seed,
    }
    summary.update(extra)
    return summary


def header_and_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(headers, cells))
    return headers, rows


def test_classification_with_groups_seeds_and_paired_deltas():
    results = {
        "full": [
            run(
                "classification", {"accuracy": 0.90, "f1_macro": 0.88, "group_accuracy_gap": 0.1}, 0
            ),
            run(
                "classification", {"accuracy": 0.80, "f1_macro": 0.78, "group_accuracy_gap": 0.2}, 1
            ),
        ],
        # listed in the other seed order: deltas pair runs by seed, not by position
        "lora": [
            run("classification", {"accuracy": 0.85, "f1_macro": 0.8}, 1, trainable_params=10),
            run("classification", {"accuracy": 0.95, "f1_macro": 0.9}, 0, trainable_params=10),
        ],
    }
    headers, rows = header_and_rows(render(compare(results)))
    assert headers[:5] == [
        "variant",
        "seeds",
        "test accuracy",
        "test macro F1",
        "test largest group accuracy gap",
    ]
    assert "Δ accuracy vs full (paired)" in headers
    assert rows["full"]["test accuracy"] == "0.850 ± 0.050"
    assert rows["full"]["Δ accuracy vs full (paired)"] == "(baseline)"
    assert rows["lora"]["Δ accuracy vs full (paired)"] == "+0.050 ± 0.000"
    assert rows["lora"]["test largest group accuracy gap"] == "–"  # not measured there
    assert rows["full"]["test largest group accuracy gap"] == "0.150 ± 0.050"
    assert rows["lora"]["trainable params"] == "10"
    assert rows["lora"]["trainable %"] == "0.01%"
    assert rows["full"]["trainable %"] == "1.00%"
    assert rows["full"]["peak memory"] == "–"  # None on CPU
    assert rows["full"]["examples/s"] == "500.0"
    assert "tokens/s" not in headers  # no run measured tokens
    assert "gain" not in " ".join(headers)  # no run scored its starting model


def test_regression_columns_and_a_declared_baseline():
    results = {
        "a": [run("regression", {"mse": 2.0, "mae": 1.0, "r2": 0.5})],
        "b": [run("regression", {"mse": 1.5, "mae": 0.9})],  # r2 missing: "–", no crash
    }
    headers, rows = header_and_rows(render(compare(results, baseline="b")))
    assert headers[1:4] == ["test MSE", "test MAE", "test R²"]
    assert "seeds" not in headers
    assert rows["a"]["Δ MSE vs b (paired)"] == "+0.500"
    assert rows["b"]["test R²"] == "–"
    with pytest.raises(ConfigError, match=r"config.baseline: 'c' names no variant; variants: a, b"):
        compare(results, baseline="c")


def test_causal_lm_without_generation_uses_perplexity():
    lm = {"loss": 2.0, "perplexity": 7.389, "token_accuracy": 0.4}
    results = {
        "r1": [run("causal_lm", lm, tokens_per_sec=12_345.0, peak_memory_bytes=3 * 2**30)],
        "r2": [run("causal_lm", {**lm, "perplexity": 7.0, "token_accuracy": None})],
    }
    comparison = compare(results)
    assert comparison.primary == "perplexity"
    headers, rows = header_and_rows(render(comparison))
    assert headers[1:4] == ["test loss", "test perplexity", "test token accuracy"]
    assert "BLEU" not in " ".join(headers)
    assert rows["r2"]["Δ perplexity vs r1 (paired)"] == "-0.389"
    assert rows["r2"]["test token accuracy"] == "–"
    assert rows["r1"]["tokens/s"] == "12,345"
    assert rows["r2"]["tokens/s"] == "–"
    assert rows["r1"]["peak memory"] == "3.00 GiB"
    assert "lower is better" in render(comparison)


def test_causal_lm_with_generation_uses_bleu_and_before_training():
    def lm(bleu, chrf=None):
        scores = {"loss": 2.0, "perplexity": 7.4, "token_accuracy": 0.4, "bleu": bleu}
        if chrf is not None:
            scores.update(chrf=chrf, rougeL=0.5)
        return scores

    before = {"val": {"loss": 5.0, "perplexity": 150.0}, "test": {"perplexity": 148.0, "bleu": 1.0}}
    results = {
        "lora": [run("causal_lm", lm(40.0, 55.0), before=before, peak_memory_bytes=200 * 2**20)],
        "full": [run("causal_lm", lm(42.5), before=before)],
    }
    comparison = compare(results)
    assert comparison.primary == "bleu"
    headers, rows = header_and_rows(render(comparison))
    assert headers[4:7] == ["test BLEU", "test chrF", "test ROUGE-L"]
    assert list(rows) == ["before training", "lora", "full"]
    assert rows["before training"]["test perplexity"] == "148.000"
    assert rows["before training"]["test loss"] == "–"
    assert rows["before training"]["trainable params"] == "–"
    assert rows["full"]["test chrF"] == "–"
    assert rows["full"]["Δ BLEU vs lora (paired)"] == "+2.500"
    assert rows["lora"]["Δ BLEU vs before"] == "+39.000"
    assert rows["lora"]["peak memory"] == "200.0 MiB"
    assert "higher is better" in render(comparison)
    # the starting model is scored without decoding (no BLEU): its change is in perplexity
    before["test"].pop("bleu")
    _, rows = header_and_rows(render(compare(results)))
    assert rows["lora"]["Δ perplexity vs before"] == "-140.600"


def test_task_inferred_from_metric_names_and_val_when_no_test():
    old = {"steps": 5, "trainable_params": 3, "total_params": 6, "wall_time_s": 1.0}
    results = {"old": [{**old, "val": {"mse": 1.0, "mae": 1.0}, "test": {}}]}
    comparison = compare(results)
    assert comparison.task == "regression" and comparison.primary == "mse"
    headers, rows = header_and_rows(render(comparison))
    assert "val MSE" in headers
    assert rows["old"]["peak memory"] == "–" and rows["old"]["val R²"] == "–"


def write_run(path, summary, metric="val/loss"):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "config.json").write_text(json.dumps({"early_stopping": {"metric": metric}}))
    lines = [{"step": s, metric: 1.0 / s} for s in (5, 10)]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_compare_runs_over_directories(tmp_path):
    def acc(a):
        return run("classification", {"accuracy": a, "f1_macro": a})

    write_run(tmp_path / "a" / "lora", acc(0.8))
    write_run(tmp_path / "b" / "lora", acc(0.9))
    for seed, a in ((0, 0.7), (1, 0.75)):  # one variant over two seeds
        write_run(tmp_path / "sweep" / "full" / f"seed_{seed}", acc(a))
    out = tmp_path / "cmp"
    dirs = [tmp_path / "a" / "lora", tmp_path / "b" / "lora", tmp_path / "sweep" / "full"]
    text = compare_runs(dirs, out, baseline="b/lora")
    _, rows = header_and_rows(text)
    assert list(rows) == ["a/lora", "b/lora", "full"]
    assert rows["full"]["seeds"] == "2" and rows["full"]["test accuracy"] == "0.725 ± 0.025"
    assert rows["a/lora"]["Δ accuracy vs b/lora (paired)"] == "-0.100"
    assert (out / "results.md").read_text() == text
    assert set(json.loads((out / "results.json").read_text())) == {"a/lora", "b/lora", "full"}
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert compare_runs(dirs[:2]) == render(
        compare({"a/lora": [acc(0.8)], "b/lora": [acc(0.9)]}, key="baseline")
    )  # no out_dir: nothing written, the same table

    with pytest.raises(ConfigError, match="baseline 'x' names no run; runs: a/lora, b/lora, full"):
        compare_runs(dirs, baseline="x")
    write_run(tmp_path / "gpt", run("causal_lm", {"loss": 1.0, "perplexity": 2.7}))
    with pytest.raises(
        ConfigError, match=r"different tasks.*lora \(classification\).*gpt \(causal_lm\)"
    ):
        compare_runs([dirs[0], tmp_path / "gpt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: no summary.json"):
        compare_runs([dirs[0], tmp_path / "empty"])
    (tmp_path / "sweep" / "full" / "seed_2").mkdir()  # an unfinished seed
    with pytest.raises(ConfigError, match=r"seed_2: no summary.json"):
        compare_runs([tmp_path / "sweep" / "full"])


def test_write_comparison_without_curves(tmp_path):
    """Runs whose workdirs hold no metrics.jsonl: the table is written, no plot, no crash."""
    results = {"x": [run("causal_lm", {"loss": 1.0, "perplexity": 2.7}, workdir=str(tmp_path))]}
    text = write_comparison(tmp_path / "out", results)
    assert "test perplexity" in text and not (tmp_path / "out" / "comparison.png").exists()
