"""Sweeps declared in the config: expansion and names, checks before any work, the ready-made
sweep configs, a GPT-2 sweep end to end (data loaded once), and resuming an interrupted sweep."""

import json
import re
from pathlib import Path

import pytest
from conftest import tiny_config

from ftlab import experiment, sweep
from ftlab.config import ConfigError, load_config
from ftlab.schema import base_config, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def swept(grid=(), zipped=(), variants=(), **overrides):
    c = base_config()
    c.sweep.grid, c.sweep.zip, c.variants = grid, zipped, variants
    for key, value in overrides.items():
        c[key] = value
    return c


# ------------------------------------------------------------------ expansion and names


def test_grid_times_zip_names_and_overrides():
    c = swept(
        grid=(("method.name", ("lora",)), ("method.lora.rank", (4, 8)), ("optim.lr", (1e-3, 0.5))),
        zipped=((("data.train_per_class", (2, 5)), ("train.batch_size", (10, 25))),),
    )
    points = sweep.points(c)
    assert [n for n, _ in points] == [
        "lora_r4_lr1e-3_n2",
        "lora_r4_lr1e-3_n5",
        "lora_r4_lr0.5_n2",
        "lora_r4_lr0.5_n5",
        "lora_r8_lr1e-3_n2",
        "lora_r8_lr1e-3_n5",
        "lora_r8_lr0.5_n2",
        "lora_r8_lr0.5_n5",
    ]
    assert points[1][1] == {
        "method.name": "lora",
        "method.lora.rank": 4,
        "optim.lr": 1e-3,
        "data.train_per_class": 5,
        "train.batch_size": 25,  # moves with data.train_per_class
    }
    assert sweep.expand(c) == points  # no declared variants: the points alone


def test_sweep_composes_with_variants_seeds_and_labels(tmp_path):
    c = swept(
        zipped=(
            (
                ("name", ("qv", "all")),
                ("method.lora.targets", (("attn/(q|v)",), ("attn/.*",))),
                ("method.lora.rank", (4, 2)),
            ),
        ),
        variants=(("small", {"optim.lr": 1e-3}), ("big", {"optim.lr": 1e-2})),
        variant_seeds=(0, 1),
    )
    names = [n for n, _ in sweep.expand(c)]
    assert names == ["small_qv", "small_all", "big_qv", "big_all"]
    assert dict(sweep.expand(c))["big_all"] == {
        "optim.lr": 1e-2,
        "method.lora.targets": ("attn/.*",),
        "method.lora.rank": 2,
    }
    runs = experiment.plan(c, tmp_path)
    assert len(runs) == 8
    assert runs[1].workdir == tmp_path / "small_qv" / "seed_1"
    assert runs[1].overrides["seed"] == 1 and runs[1].overrides["data.split_seed"] == 1
    text = experiment.describe(c)
    assert "sweep (2 points" in text and "small_qv, small_all, big_qv, big_all" in text
    assert "baseline: small_qv" in text and "total runs: 8" in text


@pytest.mark.parametrize(
    "key, value, name",
    [
        ("optim.lr", 3e-4, "lr3e-4"),
        ("optim.lr", 0.02, "lr0.02"),
        ("method.lora.alpha", 16.0, "alpha16"),
        ("method.lora.targets", (r"attn/(q|v)_proj/kernel",), "qv"),
        ("method.lora.targets", (r"block_\d+/kernel", "head/"), "block+head"),
        ("method.lora.rslora", True, "rslora"),
        ("optim.schedule", "linear", "schedule-linear"),
        ("data.classes", (5, 6), "classes5-6"),
    ],
)
def test_point_names(key, value, name):
    assert sweep.fragment(key, value) == name


# ------------------------------------------------------------- checks before any work


@pytest.mark.parametrize(
    "grid, zipped, message",
    [
        (
            (("optim.lrr", (1e-3,)),),
            (),
            "config.sweep.grid[0]: unknown config key 'optim.lrr'; did you mean 'optim.lr'?",
        ),
        ((("optim.lr", ()),), (), "config.sweep.grid[0]: 'optim.lr' has an empty list of values"),
        (("optim.lr",), (), "config.sweep.grid[0]: expected a (dotted_key, (values...)) pair"),
        (
            (),
            ((("optim.lr", (1e-3, 1e-2)), ("method.lora.rank", (4,))),),
            (
                "config.sweep.zip[0]: zipped value lists must have equal lengths, "
                "got optim.lr: 2, method.lora.rank: 1"
            ),
        ),
        ((), ((),), "config.sweep.zip[0]: expected a non-empty group"),
        (
            (),
            ((("method.lora.rnak", (4,)),),),
            "unknown config key 'method.lora.rnak'; did you mean 'method.lora.rank'?",
        ),
        ((("optim.lr", (1e-3, 0.001)),), (), "config.sweep: points share a name"),
        (
            (("optim.lr", (1e-3,)),),
            ((("optim.lr", (1e-2,)),),),
            "'optim.lr' is already swept by config.sweep.grid[0]",
        ),
        ((("variants", ((),)),), (), "'variants' cannot be swept"),
        ((("optim.lr", ("fast",)),), (), "config key 'optim.lr' expects float, got 'fast'"),
    ],
)
def test_bad_sweeps_are_config_errors(grid, zipped, message):
    with pytest.raises(ConfigError) as e:
        validate(swept(grid, zipped))
    assert message in str(e.value)


def test_baseline_must_name_a_compared_variant():
    c = swept(grid=(("method.lora.rank", (1, 2)),), baseline="r3")
    with pytest.raises(
        ConfigError, match=r"config.baseline: 'r3' names no variant; variants: r1, r2"
    ):
        validate(c)
    c.baseline = "r2"
    validate(c)
    assert sweep.baseline_name(c) == "r2"


def test_variant_and_sweep_name_collision():
    c = swept(
        zipped=((("name", ("z", "y_z")), ("optim.lr", (1e-3, 1e-2))),),
        variants=(("v", {}), ("v_y", {})),
    )
    with pytest.raises(ConfigError, match="config.sweep: variant and sweep names collide: v_y_z"):
        validate(c)


@pytest.mark.parametrize(
    "spec, names, baseline",
    [
        ("digits_lora_rank.py", [f"lora_r{r}" for r in (1, 2, 4, 8, 16, 32, 64)], "lora_r4"),
        ("digits_lora_rank.py:runlocal", ["lora_r1", "lora_r2", "lora_r4"], "lora_r4"),
        ("gpt2_e2e_lora_rank.py", [f"r{r}" for r in (1, 2, 4, 8, 16, 32, 64)], "r4"),
        ("gpt2_e2e_lora_rank.py:runlocal", ["r1", "r2", "r4", "r8"], "r4"),
        ("gpt2_e2e_lora_targets.py:runlocal", ["q", "k", "v", "o", "qk", "qv", "qkvo"], "qv"),
    ],
)
def test_ready_made_sweep_configs(spec, names, baseline):
    c = load_config(str(CONFIGS / spec))
    validate(c)
    compared = sweep.expand(c)
    assert [n for n, _ in compared] == names
    assert sweep.baseline_name(c) == baseline
    assert "total runs:" in experiment.describe(c)  # every run's keys check out


def test_methods_budget_config_and_lora_targets_regexes():
    c = load_config(str(CONFIGS / "digits_methods_budget.py"))
    validate(c)
    names = [n for n, _ in sweep.expand(c)]
    assert len(names) == 25 and names[:5] == [
        "n2_full",
        "n2_top1",
        "n2_lora",
        "n2_bitfit",
        "n2_linear_probe",
    ]
    assert "total runs: 76 (1 stage + 75)" in experiment.describe(c)
    runlocal = load_config(str(CONFIGS / "digits_methods_budget.py:runlocal"))
    assert len(sweep.expand(runlocal)) == 10 and runlocal.train.num_steps == 6
    # (W_q, W_k, W_v, W_o) of the targets ablation: GPT-2's names, never the MLP's c_proj
    targets = dict(sweep.expand(load_config(str(CONFIGS / "gpt2_e2e_lora_targets.py"))))
    paths = [f"h_0/attn/{p}/kernel" for p in ("q_proj", "k_proj", "v_proj", "c_proj")]
    paths.append("h_0/mlp/c_proj/kernel")
    matched = {
        name: [p for p in paths if re.search(o["method.lora.targets"][0], p)]
        for name, o in targets.items()
    }
    assert matched["o"] == ["h_0/attn/c_proj/kernel"]
    assert matched["qkvo"] == paths[:4]
    assert {o["method.lora.rank"] * len(matched[n]) for n, o in targets.items()} == {8}


# --------------------------------------------------------- end to end: GPT-2 on E2E


@pytest.fixture(scope="module")
def gpt2_sweep(tmp_path_factory):
    """gpt2_e2e.py:runlocal, LoRA rank 1, 2, 4, 8 x two learning rates as a sweep (the case
    whose comparison used to crash: causal LM summaries have no accuracy or MSE)."""
    from ftlab.data import loading

    loads = []
    real = loading.load_dataset

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    c = load_config(str(CONFIGS / "gpt2_e2e.py:lora,runlocal"))
    c.sweep.grid = (("method.lora.rank", (1, 2, 4, 8)), ("optim.lr", (1e-3, 3e-3)))
    c.train.num_steps = 2
    c.train.eval_every = 2
    c.checkpoint.every_steps = 2
    c.eval.generate_examples = 1
    c.eval.max_new_tokens = 4
    c.eval.num_beams = 1
    workdir = tmp_path_factory.mktemp("gpt2_sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading, "load_dataset", counting)
        results = experiment.run_experiment(c, workdir)
    return workdir, results, loads


def test_gpt2_sweep_writes_a_causal_lm_table(gpt2_sweep):
    workdir, results, loads = gpt2_sweep
    names = [f"r{r}_lr{lr}" for r in (1, 2, 4, 8) for lr in ("1e-3", "3e-3")]
    assert list(results) == names
    table = (workdir / "results.md").read_text()
    header = table.splitlines()[0]
    for column in ("test perplexity", "test token accuracy", "test BLEU", "Δ BLEU vs r1_lr1e-3"):
        assert column in header
    for name in names:
        assert f"| {name} |" in table
        summary = json.loads((workdir / name / "summary.json").read_text())
        assert summary["steps"] == 2
        config = json.loads((workdir / name / "config.json").read_text())
        assert config["sweep"] == {"grid": [], "zip": []} and config["variants"] == []
    assert (
        results["r8_lr1e-3"][0]["trainable_params"]
        == 8 * results["r1_lr1e-3"][0]["trainable_params"]
    )
    assert set(json.loads((workdir / "results.json").read_text())) == set(names)
    assert (workdir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert len(loads) == 1  # eight runs, one data config: loaded once


# ------------------------------------------------------------ resuming a sweep


def test_interrupted_sweep_reruns_only_unfinished_points(tmp_path, monkeypatch):
    c = tiny_config(**{"train.num_steps": 4, "train.eval_every": 2, "checkpoint.every_steps": 2})
    c.sweep.grid = (("optim.lr", (1e-2, 3e-2, 1e-1)),)
    real = experiment.train
    calls = []

    def interrupted(run, where, **kwargs):
        calls.append(where.local.name)  # an experiment passes each run its Workdir
        if len(calls) == 2:  # the second point dies half-way

            def stop(step):
                if step == 1:
                    raise RuntimeError("power cut")

            kwargs["on_step"] = stop
        return real(run, where, **kwargs)

    monkeypatch.setattr(experiment, "train", interrupted)
    with pytest.raises(RuntimeError, match="power cut"):
        experiment.run_experiment(c, tmp_path)
    assert calls == ["lr0.01", "lr0.03"]
    first = tmp_path / "lr0.01" / "summary.json"
    mtime = first.stat().st_mtime_ns
    assert not (tmp_path / "lr0.03" / "summary.json").exists()

    calls.clear()

    def counted(run, where, **kwargs):
        calls.append(where.local.name)  # an experiment passes each run its Workdir
        return real(run, where, **kwargs)

    monkeypatch.setattr(experiment, "train", counted)
    results = experiment.run_experiment(c, tmp_path)
    assert calls == ["lr0.03", "lr0.1"]  # the finished point is read back, not retrained
    assert first.stat().st_mtime_ns == mtime
    assert list(results) == ["lr0.01", "lr0.03", "lr0.1"]
    assert "| lr0.01 |" in (tmp_path / "results.md").read_text()

    # a changed config in the same workdir is refused before anything trains
    calls.clear()
    c.train.num_steps = 6
    with pytest.raises(
        ConfigError, match=r"run 'lr0.01': .* different config \(changed: train.num_steps\)"
    ):
        experiment.run_experiment(c, tmp_path)
    assert calls == []
