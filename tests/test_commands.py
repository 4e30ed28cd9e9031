"""The commands on finished runs (eval, predict, export, compare) and on configs (list, sweep,
config arguments, default workdirs), called in-process through ``ftlab.cli.main``.

One small run per kind is trained once per module: digits (a CNN, image inputs), a table of
wine measurements from a csv (classification with string labels, and a regression), and the
GPT-2 E2E recipe shrunk by ``:lora,runlocal`` (a causal LM with LoRA).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes, load_wine

from ftlab import checkpoint, saved_run
from ftlab.cli import main
from ftlab.config import load_config
from ftlab.data import load_dataset
from ftlab.train.loop import train
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def listing(directory: Path) -> list[tuple[str, int, int]]:
    """Every file and folder under ``directory`` with its size and modification time."""
    return sorted(
        (str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    )


def run_main(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one line ``ftlab: ...`` the command printed (logging may add others before it)."""
    lines = [line for line in err.splitlines() if line.startswith("ftlab: ")]
    assert len(lines) == 1, err
    return lines[0]


# -- a digits run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits") / "run"
    summary = train(tiny_config(), workdir)
    return workdir, summary


def test_eval_of_the_best_checkpoint_reproduces_the_summary(digits_run, capsys):
    workdir, summary = digits_run
    saved = json.loads((workdir / "summary.json").read_text())
    before = listing(workdir)
    code, out, _ = run_main(["eval", workdir], capsys)
    assert code == 0
    printed = json.loads(out)
    assert printed["checkpoint"] == "best" and printed["step"] == saved["best_step"]
    assert printed["metrics"] == saved["test"]  # exactly, every metric
    assert printed["metrics"]["accuracy"] == summary["test"]["accuracy"]
    written = workdir / "eval" / "test_best.json"
    assert json.loads(written.read_text()) == printed
    # only new files: nothing that was there changed
    after = listing(workdir)
    assert set(before) <= set(after)
    assert {p for p, _, _ in after} - {p for p, _, _ in before} == {"eval", "eval/test_best.json"}

    # the same again, explicitly: a new file, never the old one overwritten
    code, out, _ = run_main(["eval", workdir, "--checkpoint", "best", "--split", "test"], capsys)
    assert code == 0 and json.loads(out)["metrics"] == saved["test"]
    assert (workdir / "eval" / "test_best-2.json").is_file()
    assert json.loads(written.read_text()) == printed


def test_eval_val_split_and_other_checkpoints(digits_run, capsys):
    workdir, _ = digits_run
    saved = json.loads((workdir / "summary.json").read_text())
    code, out, _ = run_main(["eval", workdir, "--split", "val"], capsys)
    assert code == 0 and json.loads(out)["metrics"] == saved["val"]
    assert (workdir / "eval" / "val_best.json").is_file()

    steps = saved_run._steps(workdir / "checkpoints" / "last")
    assert steps == [15, 20]  # tiny_config saves every 5 steps and keeps 2
    code, out, _ = run_main(["eval", workdir, "--checkpoint", "last"], capsys)
    last = json.loads(out)
    assert code == 0 and last["checkpoint"] == "last" and last["step"] == 20
    code, out, _ = run_main(["eval", workdir, "--checkpoint", "15"], capsys)
    earlier = json.loads(out)
    assert code == 0 and earlier["step"] == 15 and earlier["checkpoint"] == "15"
    assert (workdir / "eval" / "test_15.json").is_file()
    assert earlier["metrics"]["loss"] != last["metrics"]["loss"]  # other weights


def test_predict_a_folder_of_images(digits_run, tmp_path, capsys):
    from PIL import Image

    workdir, _ = digits_run
    cfg = saved_run.load_config(workdir)
    test = saved_run.source_splits(cfg).splits.test.for_final_evaluation()
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(test["image"]):  # digits are integers 0..16: exact as PNG
        pixels = np.asarray(image, np.uint8).reshape(8, 8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
    code, out, _ = run_main(["predict", workdir, "--input", folder], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["file"] for r in records) == sorted(p.name for p in folder.iterdir())
    labels = [str(test["label"].iloc[int(r["file"][:3])]) for r in records]
    accuracy = np.mean([r["label"] == label for r, label in zip(records, labels)])
    saved = json.loads((workdir / "summary.json").read_text())
    assert accuracy == pytest.approx(saved["test"]["accuracy"])


def test_run_directory_errors_exit_2_and_change_nothing(digits_run, tmp_path, capsys):
    workdir, _ = digits_run
    no_config = tmp_path / "no_config"
    shutil.copytree(workdir / "checkpoints", no_config / "checkpoints")
    no_checkpoints = tmp_path / "no_checkpoints"
    no_checkpoints.mkdir()
    shutil.copy(workdir / "config.json", no_checkpoints / "config.json")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    existing_output = tmp_path / "out.jsonl"
    existing_output.write_text("old")
    cases = [
        (["eval", tmp_path / "nowhere"], "run directory '" + str(tmp_path / "nowhere")),
        (["eval", no_config], "has no config.json"),
        (["eval", no_checkpoints], "has no checkpoints"),
        (["eval", workdir, "--checkpoint", "7"], "no checkpoint at step 7; saved steps: [15, 20]"),
        (["eval", workdir, "--checkpoint", "newest"], "'newest' is not best, last or a step"),
        (["eval", workdir, "--split", tmp_path / "missing.csv"], "missing.csv"),
        (["eval", workdir, "--split", "train"], "'train' is neither val, test nor an existing"),
        (["eval", workdir, "--config=configs/gpt2_e2e.py"], "takes a run directory"),
        (["eval", workdir, "--config.optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["eval"], "eval: the following arguments are required: RUN_DIR"),
        (["export", workdir], "give --hf DIR and / or --peft DIR"),
        (["export", workdir, "--hf", taken], "is not an empty directory"),
        (["export", workdir, "--hf", tmp_path / "hf"], "model is 'cnn', not a Hugging Face"),
        (
            ["export", workdir, "--peft", tmp_path / "p"],
            "method is 'full'; only a LoRA (DoRA, QLoRA) or IA3 run",
        ),
        (["predict", workdir, "--input", tmp_path / "none.csv"], "no such file or directory"),
        (["predict", workdir, "--input", taken, "--output", existing_output], "exists"),
        (["compare", workdir, tmp_path / "nowhere"], "does not exist"),
    ]
    before = listing(workdir)
    for args, message in cases:
        code, out, err = run_main(args, capsys)
        assert code == 2, (args, err)
        assert message in error_line(err), (args, err)
        assert out == ""
    assert listing(workdir) == before
    assert (taken / "keep.txt").read_text() == "mine" and existing_output.read_text() == "old"
    assert not (tmp_path / "hf").exists() and not (tmp_path / "p").exists()
    assert [p for p, _, _ in listing(no_checkpoints)] == ["config.json"]


# -- tabular runs from a csv -------------------------------------------------------------------


def _wine_csv(path: Path) -> pd.DataFrame:
    wine = load_wine(as_frame=True)
    frame = wine.frame.drop(columns="target")
    frame.columns = [c.replace("/", "_") for c in frame.columns]
    frame["kind"] = [str(wine.target_names[i]) for i in wine.target]
    # 30 rows three times: copies in one split are duplicates, across splits leaks, both at once
    frame = pd.concat([frame, frame.iloc[:30], frame.iloc[:30]], ignore_index=True)
    frame.to_csv(path, index=False)
    return frame


def _table_config(csv: Path, cache: Path, **overrides):
    return tiny_config(
        **{
            "data.source": "hf",
            "data.path": str(csv),
            "data.cache_dir": str(cache),
            "data.columns": "features=*,label=kind",
            "data.classes": (),
            "data.scale": 0.0,  # standardised with the training split's statistics
            "model.name": "mlp",
            "train.num_steps": 10,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def wine_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("wine")
    frame = _wine_csv(where / "wine.csv")
    cfg = _table_config(where / "wine.csv", where / "cache")
    summary = train(cfg, where / "run")
    return where / "run", cfg, frame, summary


def _test_rows(cfg, frame: pd.DataFrame) -> pd.DataFrame:
    """The csv rows that made the run's test split (its row numbers are the frame's index)."""
    test = saved_run.source_splits(cfg).splits.test.for_final_evaluation()
    return frame.loc[test.index]


def test_eval_of_a_file_goes_through_the_runs_pipeline(wine_run, tmp_path, capsys):
    workdir, cfg, frame, _ = wine_run
    assert json.loads((workdir / "summary.json").read_text())["class_names"] == [
        "class_0",
        "class_1",
        "class_2",
    ]
    rows = _test_rows(cfg, frame)
    rows.to_csv(tmp_path / "held_out.csv", index=False)
    # the training and validation splits are the run's, exactly, whatever rows take test's place
    run_data = load_dataset(cfg.data)
    assert run_data.clean_log["duplicates"]["train"] > 0
    assert run_data.clean_log["leakage"]["removed"]["train"] > 0
    for labelled in (True, False):
        file = saved_run.file_rows(cfg, tmp_path / "held_out.csv", labelled=labelled, what="x")
        data, _ = saved_run.rows_dataset(cfg, file)
        for split in ("train", "val"):
            ours, theirs = getattr(data, split), getattr(run_data, split)
            np.testing.assert_array_equal(ours.inputs, theirs.inputs)
            np.testing.assert_array_equal(ours.labels, theirs.labels)
    code, out, _ = run_main(["eval", workdir, "--split", tmp_path / "held_out.csv"], capsys)
    assert code == 0
    result = json.loads(out)
    # the run's own test rows, given as a file, score exactly as the run's test split did
    assert result["metrics"] == json.loads((workdir / "summary.json").read_text())["test"]
    assert (workdir / "eval" / "held_out_best.json").is_file()


def test_predict_classification_probabilities(wine_run, tmp_path, capsys):
    workdir, cfg, frame, _ = wine_run
    rows = _test_rows(cfg, frame)
    rows.drop(columns="kind").to_csv(tmp_path / "new.csv", index=False)
    before = listing(workdir)
    code, out, _ = run_main(["predict", workdir, "--input", tmp_path / "new.csv"], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["row"] for r in records] == list(range(len(rows)))
    names = ["class_0", "class_1", "class_2"]
    assert all(set(r) == {"row", "label", *[f"prob_{n}" for n in names]} for r in records)
    probs = np.array([[r[f"prob_{n}"] for n in names] for r in records])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert [r["label"] for r in records] == [names[i] for i in probs.argmax(1)]
    # the same predictions the run's test metrics were computed from
    accuracy = np.mean([r["label"] == k for r, k in zip(records, rows["kind"])])
    saved = json.loads((workdir / "summary.json").read_text())
    assert accuracy == pytest.approx(saved["test"]["accuracy"])
    assert listing(workdir) == before  # predict writes nothing into the run

    # csv output; duplicated rows are each predicted (never dropped as duplicates)
    twice = pd.concat([rows, rows]).drop(columns="kind")
    twice.to_json(tmp_path / "twice.jsonl", orient="records", lines=True)
    code, _, _ = run_main(
        ["predict", workdir, "--input", tmp_path / "twice.jsonl", "--output", tmp_path / "p.csv"],
        capsys,
    )
    assert code == 0
    written = pd.read_csv(tmp_path / "p.csv")
    assert len(written) == 2 * len(rows)
    assert list(written["label"]) == [r["label"] for r in records] * 2


def test_predict_needs_the_runs_input_columns(wine_run, tmp_path, capsys):
    workdir, _, frame, _ = wine_run
    frame.drop(columns=["kind", "hue"]).head(5).to_csv(tmp_path / "partial.csv", index=False)
    before = listing(workdir)
    code, out, err = run_main(["predict", workdir, "--input", tmp_path / "partial.csv"], capsys)
    assert code == 2 and out == ""
    assert "lacks the column(s) the run needs: 'hue' (the run's 'features.hue')" in error_line(err)
    # eval of a file also needs the labels
    code, _, err = run_main(["eval", workdir, "--split", tmp_path / "partial.csv"], capsys)
    assert code == 2 and "'kind'" in error_line(err) and "'hue'" in error_line(err)
    assert listing(workdir) == before


def test_predict_regression_in_original_units(tmp_path, capsys):
    diabetes = load_diabetes(as_frame=True, scaled=False)
    frame = diabetes.frame.rename(columns={"target": "progression"})
    frame.to_csv(tmp_path / "diabetes.csv", index=False)
    cfg = _table_config(
        tmp_path / "diabetes.csv",
        tmp_path / "cache",
        **{
            "data.columns": "features=*,label=progression",
            "train.loss": "mse",
            "train.num_steps": 40,
            "optim.lr": 3e-2,
            "early_stopping.metric": "val/mse",
        },
    )
    summary = train(cfg, tmp_path / "run")
    rows = _test_rows(cfg, frame)
    rows.drop(columns="progression").to_csv(tmp_path / "new.csv", index=False)
    code, out, _ = run_main(["predict", tmp_path / "run", "--input", tmp_path / "new.csv"], capsys)
    assert code == 0
    values = np.array([json.loads(line)["prediction"] for line in out.splitlines()])
    assert len(values) == len(rows)
    mse = float(np.mean((values - rows["progression"].to_numpy()) ** 2))
    assert mse == pytest.approx(summary["test"]["mse"], rel=1e-4)  # original units (~25..346)
    assert 25 < values.mean() < 346


# -- a GPT-2 LoRA run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpt2") / "run"
    cfg = load_config(f"{CONFIGS / 'gpt2_e2e.py'}:lora,runlocal")
    summary = train(cfg, workdir)
    return workdir, summary


def test_export_round_trip_of_a_gpt2_lora_run(gpt2_run, tmp_path, capsys):
    from ftlab.interop.peft import load_peft_adapter
    from ftlab.interop.pretrained import load_pretrained

    workdir, _ = gpt2_run
    before = listing(workdir)
    hf, peft = tmp_path / "hf", tmp_path / "peft"
    code, out, _ = run_main(["export", workdir, "--hf", hf, "--peft", peft], capsys)
    assert code == 0 and f"hf: {hf}" in out and f"peft: {peft}" in out
    assert listing(workdir) == before
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    assert (peft / "adapter_config.json").is_file()

    loaded = load_pretrained(hf)
    merged = checkpoint.load_pytree(workdir / "params")  # the run's final parameters, merged
    cfg = saved_run.load_config(workdir)
    restored = saved_run.restore(workdir, cfg, saved_run.choose_checkpoint(workdir, cfg))
    batch = np.asarray(restored.run.data.test.inputs[:4])
    with jax.default_matmul_precision("highest"):
        reference = np.asarray(loaded.model.apply({"params": merged}, batch))
        exported = np.asarray(loaded.model.apply({"params": loaded.params}, batch))
        np.testing.assert_allclose(exported, reference, atol=1e-6, rtol=0)

        state, method = restored.state, restored.run.method
        base = method.base_params(state.trainable, state.frozen)
        adapter = load_peft_adapter(peft, base, loaded.hf_config)
        peft_method, trainable, frozen = adapter.split(base)
        adapted = np.asarray(peft_method.apply(loaded.model, trainable, frozen, batch, train=False))
        np.testing.assert_allclose(adapted, reference, atol=1e-5, rtol=0)

    # a second export into the same targets is refused, before any work
    code, _, err = run_main(["export", workdir, "--peft", peft], capsys)
    assert code == 2 and "not an empty directory" in error_line(err)


def test_eval_and_predict_of_a_causal_lm(gpt2_run, tmp_path, capsys):
    workdir, _ = gpt2_run
    code, out, _ = run_main(["eval", workdir], capsys)
    assert code == 0
    metrics = json.loads(out)["metrics"]
    assert metrics == json.loads((workdir / "summary.json").read_text())["test"]
    assert "bleu" in metrics and metrics["generated_examples"] == 4  # decoded as in training
    assert (workdir / "eval" / "test_best_generations.jsonl").is_file()

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"meaning_representation": "name[Alimentum], area[city centre]"})
        + "\n"
        + json.dumps({"meaning_representation": "name[Blue Spice], eatType[pub]"})
        + "\n"
    )
    code, out, _ = run_main(["predict", workdir, "--input", prompts], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["row"] for r in records] == [0, 1]
    assert records[1]["prompt"] == "name[Blue Spice], eatType[pub]"
    assert all(isinstance(r["output"], str) for r in records)

    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no prompt here"}) + "\n")
    code, _, err = run_main(["predict", workdir, "--input", tmp_path / "bad.jsonl"], capsys)
    assert code == 2 and "'meaning_representation'" in error_line(err)


# the T5 E2E recipe shrunk as tests/test_recipes.py and tests/test_t5.py run it (one compilation
# of each step for the three, through the session's compilation cache)
T5_SHORT = (
    "--config.train.num_steps=4",
    "--config.train.eval_every=2",
    "--config.checkpoint.every_steps=2",
)


def test_eval_predict_and_compare_of_a_t5_run(gpt2_run, tmp_path, capsys):
    workdir = tmp_path / "t5"
    args = ["train", CONFIGS / "t5_e2e.py:lora,runlocal", "--workdir", workdir, *T5_SHORT]
    assert run_main(args, capsys)[0] == 0
    summary = json.loads((workdir / "summary.json").read_text())
    code, out, _ = run_main(["eval", workdir], capsys)
    assert code == 0
    metrics = json.loads(out)["metrics"]
    assert metrics == summary["test"]  # token metrics and the decoded ones, as in training
    assert "bleu" in metrics and "perplexity" in metrics and metrics["generated_examples"] == 4
    assert (workdir / "eval" / "test_best_generations.jsonl").is_file()

    sources = tmp_path / "sources.jsonl"
    sources.write_text(
        json.dumps({"meaning_representation": "name[Alimentum], area[city centre]"}) + "\n"
    )
    code, out, _ = run_main(["predict", workdir, "--input", sources], capsys)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["row"] for r in records] == [0] and isinstance(records[0]["output"], str)
    assert records[0]["prompt"] == "name[Alimentum], area[city centre]"

    # GPT-2 and T5 on E2E: one table (token metrics and BLEU), not "different tasks"
    code, out, _ = run_main(["compare", gpt2_run[0], workdir], capsys)
    assert code == 0 and "BLEU" in out and "perplexity" in out


# -- compare, list, sweep, config arguments ----------------------------------------------------


def test_compare_runs_of_one_task_and_refuse_mixed_tasks(digits_run, wine_run, gpt2_run, capsys):
    digits, _ = digits_run
    wine = wine_run[0]  # both classification
    out_dir = digits.parent / "comparison"
    args = ["compare", digits, wine, "--out", out_dir, "--baseline", f"{digits.parent.name}/run"]
    code, out, _ = run_main(args, capsys)
    assert code == 0
    assert f"| {wine.parent.name}/run |" in out and "(baseline)" in out
    assert (out_dir / "results.md").is_file()
    code, out, err = run_main(["compare", digits, gpt2_run[0]], capsys)
    assert code == 2 and out == "" and "different tasks" in error_line(err)


def test_list_describes_a_config_without_running_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["list", CONFIGS / "digits_transfer.py:runlocal"], capsys)
    assert code == 0
    for name in ("pretrain", "scratch", "lora_r4", "random_features_probe"):
        assert name in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.py")))
def test_a_saved_config_json_restores_the_config(config):
    from ftlab.config import ConfigError, from_dict, to_dict
    from ftlab.schema import base_config

    for arg in ("", ":runlocal"):
        cfg = load_config(f"{CONFIGS / config}{arg}")
        saved = json.loads(json.dumps(to_dict(cfg)))  # as config.json holds it: lists, dicts
        restored = from_dict(saved, base_config())
        assert restored == cfg and to_dict(restored) == saved
        assert restored.is_locked
    with pytest.raises(ConfigError, match="key 'optim.lrr' is not a config key"):
        from_dict({**saved, "optim": {**saved["optim"], "lrr": 1.0}}, base_config())


def test_config_arguments_are_checked_against_args(capsys):
    code, _, err = run_main(["train", CONFIGS / "gpt2_e2e.py:bogus"], capsys)
    assert code == 2
    line = error_line(err)
    assert "does not accept the argument 'bogus'" in line
    assert "accepted: lora, full, top2, runlocal" in line
    code, _, err = run_main(["list", f"--config={CONFIGS / 'vit_cifar10.py'}:runlocl"], capsys)
    assert code == 2 and "did you mean 'runlocal'?" in error_line(err)
    code, _, err = run_main(["train", CONFIGS / "gpt2_e2e.py:lora,runlocl"], capsys)
    assert code == 2 and "'runlocl'" in error_line(err)
    for config in CONFIGS.glob("*.py"):  # every config declares what it accepts
        module = config.read_text()
        assert "\nARGS = (" in module, config


def test_default_workdir_names_the_config_argument(tmp_path, capsys, monkeypatch):
    import ftlab.experiment

    seen = []
    monkeypatch.setattr(ftlab.experiment, "run_experiment", lambda cfg, w: seen.append(str(w)))
    monkeypatch.chdir(tmp_path)
    for spec in ("gpt2_e2e.py:full,runlocal", "gpt2_e2e.py:lora", "digits_transfer.py"):
        assert main(["train", str(CONFIGS / spec)]) == 0
    assert seen == ["runs/gpt2_e2e-full-runlocal", "runs/gpt2_e2e-lora", "runs/digits_transfer"]
    assert main(["sweep", str(CONFIGS / "digits_transfer.py:runlocal")]) == 0
    assert seen[-1] == "runs/digits_transfer-runlocal"
    # sweep runs multi-run configs only
    code, _, err = run_main(["sweep", CONFIGS / "gpt2_e2e.py:runlocal"], capsys)
    assert code == 2 and "nothing to sweep" in error_line(err)


@pytest.mark.parametrize("command", ["train", "sweep", "list", "eval", "predict", "export"])
def test_help_documents_overrides_and_config_arguments(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    assert "--config.KEY=VALUE" in out
    if command in ("train", "sweep", "list"):
        assert "config.py[:arg]" in out and "ARGS" in out
    else:
        assert "RUN_DIR" in out
