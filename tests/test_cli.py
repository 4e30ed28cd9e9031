"""The command line: the default experiment end to end (shrunk), and config errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "digits_transfer.py")


def test_default_experiment_end_to_end_writes_its_files(tmp_path):
    """`python -m ftlab train configs/digits_transfer.py:runlocal` with an absl-style override."""
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftlab",
            "train",
            f"--config={CONFIG}:runlocal",
            "--workdir",
            str(workdir),
            "--config.optim.warmup_steps=1",
        ],
        capture_output=True,
        check=False,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method lora: trainable" in proc.stderr  # the one-line method summary
    table = (workdir / "results.md").read_text()
    variants = (
        "scratch",
        "full",
        "linear_probe",
        "lora_r1",
        "lora_r2",
        "lora_r4",
        "random_features_probe",
    )
    for variant in variants:
        assert f"| {variant} |" in table
        for seed in (0, 1):
            run = workdir / variant / f"seed_{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["steps"] == 6 and 0.0 <= summary["test"]["accuracy"] <= 1.0
            assert len(summary["test"]["confusion_matrix"]) == 5
            config = json.loads((run / "config.json").read_text())
            assert config["optim"]["warmup_steps"] == 1 and config["seed"] == seed
            assert config["init"]["checkpoint"] in (
                "",
                str(workdir / "pretrain" / "params"),
            )
            lines = (run / "metrics.jsonl").read_text().splitlines()
            assert any("val/accuracy" in line for line in lines) and any(
                "train/loss" in line for line in lines
            )
            assert list((run / "tb").glob("events.out.tfevents*"))
            for png in ("learning_curves.png", "confusion_matrix.png"):
                assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert (run / "checkpoints" / "last" / "6").is_dir()
    assert (workdir / "pretrain" / "params").is_dir()
    assert (workdir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((workdir / "results.json").read_text())
    lora = results["lora_r2"][0]
    assert lora["trainable_params"] < results["full"][0]["trainable_params"] == lora["total_params"]


def run_cli(args, capsys):
    code = main(["train", CONFIG, *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.optim.lrr=1e-3",
            "unknown config key 'optim.lrr'; did you mean 'optim.lr'?",
        ),
        (
            "--config.optim.lr=-0.1",
            "config.optim.lr: learning rate must be > 0, got -0.1",
        ),
        ("--config.train.batch_size=0", "config.train.batch_size: must be > 0, got 0"),
        (
            "--config.method.name=lorra",
            "config.method.name: unknown value 'lorra'; choose one of full, frozen",
        ),
        (
            "--config.method.lora.targets=('attn/q_proj',)",
            "config.method.lora.targets: regex 'attn/q_proj' matches no kernel",
        ),
        (
            "--config.early_stopping.metric=val/mse",
            "config.early_stopping.metric: 'val/mse' is not computed for classification",
        ),
        (
            "--config.method.trainable=('heads/',)",
            "config.method.trainable: regex 'heads/' matches no parameter",
        ),
    ],
)
def test_config_errors_exit_2_with_the_key_named(tmp_path, capsys, override, message):
    # variants that set no method of their own run the base's: make it LoRA for the targets case
    args = ["--config.method.name=lora", override] if "lora.targets" in override else [override]
    code, err = run_cli(["--workdir", str(tmp_path / "w"), *args], capsys)
    assert code == 2
    assert message in err
    # Caught before anything compiles or is written: not even the workdir exists.
    assert not (tmp_path / "w").exists()


def test_missing_config_file(capsys, tmp_path):
    code = main(["train", str(tmp_path / "nope.py")])
    assert code == 2 and "nope.py" in capsys.readouterr().err
