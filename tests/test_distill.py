"""Knowledge distillation (ftlab/train/distill.py): the loss against the formula in numpy,
the frozen teacher, optimizer state, alpha = 1 as plain training, exact resume, output-size
mismatches, and both configs' ``:runlocal``."""

import json
import os
import signal
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from ftlab import checkpoint, tree
from ftlab.cli import main
from ftlab.config import ConfigError, apply_overrides, load_config, to_dict
from ftlab.experiment import run_experiment
from ftlab.train import distill, losses
from ftlab.train.loop import _train_batches, build, prepare, train
from ftlab.train.writer import read_metrics
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


# -- the loss on fixed logits, against numpy ------------------------------------------------


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(student, teacher, t):
    """KL(softmax(teacher/t) || softmax(student/t)) per row, in float64."""
    lt, ls = _log_softmax(teacher / t), _log_softmax(student / t)
    return (np.exp(lt) * (lt - ls)).sum(-1)


@pytest.mark.parametrize("alpha, temperature", [(0.5, 1.0), (0.3, 4.0), (0.0, 2.0)])
def test_classification_loss_equals_the_formula(alpha, temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(6, 5)).astype(np.float32) * 3
    teacher = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=6)
    batch = {"labels": labels}
    ce = losses.cross_entropy(student, labels)
    total, parts = distill.distill_loss(
        student, teacher, batch, ce, task="classification", alpha=alpha, temperature=temperature
    )
    s64, t64 = student.astype(np.float64), teacher.astype(np.float64)
    ce_np = -_log_softmax(s64)[np.arange(6), labels]
    kl_np = _kl(s64, t64, temperature)
    expected = alpha * ce_np + (1 - alpha) * temperature**2 * kl_np  # T^2 included
    np.testing.assert_allclose(parts["ce"], ce_np, rtol=1e-5)
    np.testing.assert_allclose(parts["distill_kl"], kl_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-6)
    assert kl_np.min() > 0


def test_causal_lm_loss_is_per_target_token_without_padding():
    rng = np.random.default_rng(1)
    b, length, vocab, alpha, t = 3, 6, 7, 0.25, 3.0
    student = rng.normal(size=(b, length, vocab)).astype(np.float32) * 2
    teacher = rng.normal(size=(b, length, vocab)).astype(np.float32) * 2
    labels = rng.integers(0, vocab, size=(b, length))
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, :] = -100  # an example with no target (all padding)
    batch = {"labels": labels}
    ce = losses.causal_lm_loss(student, batch)
    total, _ = distill.distill_loss(
        student, teacher, batch, ce, task="causal_lm", alpha=alpha, temperature=t
    )
    mask = labels >= 0
    s64, t64 = student.astype(np.float64), teacher.astype(np.float64)
    tok_ce = -np.take_along_axis(_log_softmax(s64), np.maximum(labels, 0)[..., None], -1)[..., 0]
    tok_kl = _kl(s64, t64, t)
    count = np.maximum(mask.sum(-1), 1)
    ce_np = (tok_ce * mask).sum(-1) / count
    kl_np = (tok_kl * mask).sum(-1) / count
    expected = alpha * ce_np + (1 - alpha) * t**2 * kl_np
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-6)
    assert total[2] == 0.0  # nothing to train on: no padded position counts
    # the batch loss weighs examples by target tokens (the step's weights): a mean over tokens
    weights = mask.sum(-1).astype(np.float64)
    per_token = alpha * tok_ce + (1 - alpha) * t**2 * tok_kl
    np.testing.assert_allclose(
        (np.asarray(total) * weights).sum() / weights.sum(), per_token[mask].mean(), rtol=1e-4
    )


def test_the_teacher_gets_no_gradient():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(4, name="head")(x)

    model = Tiny()
    teacher = model.init(jax.random.key(0), np.ones((3, 5), np.float32))
    d = distill.Distiller(
        model=model,
        variables=teacher,
        shardings=None,
        source="test",
        task="classification",
        alpha=0.5,
        temperature=2.0,
        hidden_weight=0.0,
        per_example_loss=losses.per_example_loss("cross_entropy"),
    )
    batch = {"inputs": np.ones((3, 5), np.float32), "labels": np.array([0, 1, 2])}
    student = np.ones((3, 4), np.float32)

    def total(t):
        return d.loss(student, [], t, batch, {})[0].sum()

    grads = jax.grad(total)(teacher)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


# -- runs: the digits experiment's :runlocal supplies the teacher -----------------------------


# a 1x1 PNG: runs here write their pictures as this (drawing them is most of a tiny run's time)
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def _placeholder_png(fig, path):
    import matplotlib.pyplot as plt

    plt.close(fig)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(PNG)
    return out


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """configs/digits_distill.py:runlocal end to end: teacher stage, three variants, table."""
    from ftlab.eval import plots

    workdir = tmp_path_factory.mktemp("digits_distill")
    cfg = load_config(str(ROOT / "configs" / "digits_distill.py") + ":runlocal")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", _placeholder_png)
        results = run_experiment(cfg, workdir)
    return workdir, results


def test_digits_runlocal_writes_the_three_variants(experiment):
    workdir, results = experiment
    assert set(results) == {"scratch", "distilled", "teacher"}
    table = (workdir / "results.md").read_text()
    for name in ("scratch", "distilled", "teacher"):
        assert f"| {name} |" in table
    saved = json.loads((workdir / "distilled" / "config.json").read_text())
    assert saved["distill"]["teacher"] == str(workdir / "teacher" / "params")
    records = [
        r for r in read_metrics(workdir / "distilled" / "metrics.jsonl") if "train/loss" in r
    ]
    assert records and all("train/distill_kl" in r and "train/ce" in r for r in records)
    for r in records:  # the logged loss is the weighted sum of the logged parts (T = 4)
        expected = 0.5 * r["train/ce"] + 0.5 * 16 * r["train/distill_kl"]
        assert r["train/loss"] == pytest.approx(expected, rel=1e-4)


def _student(teacher_dir, **overrides):
    return tiny_config(
        **{
            "data.classes": (),  # ten digits, as the teacher
            "distill.teacher": str(teacher_dir),
            "distill.temperature": 3.0,
            "train.num_steps": 6,
            "checkpoint.every_steps": 3,
            "train.eval_every": 3,
            "train.log_every": 3,
            "eval.before_training": False,
            **overrides,
        }
    )


def _steps(run, n):
    """``n`` train steps of a built run on its own batches; the states' metrics."""
    state, metrics = run.state, []
    with _train_batches(run.cfg, run.data, 0, {}, run.batch_sharding) as batches:
        for _ in range(n):
            state, m = run.train_step(state, next(batches))
            metrics.append(jax.device_get(m))
    return state, metrics


def test_frozen_teacher_opt_state_and_alpha_one_as_plain_training(experiment):
    """A linear-probe student (head only) distilled at alpha = 1 against the same student
    trained plainly: bit-identical; the teacher stays outside the state, unchanged; the
    optimizer state covers the trained head alone."""
    workdir, _ = experiment
    teacher_dir = workdir / "teacher"
    probe = {"method.name": "frozen", "method.trainable": ("head/",), "distill.alpha": 1.0}
    distilled = build(_student(teacher_dir, **probe))
    plain = build(_student("", **probe))
    a, ma = _steps(distilled, 3)
    b, mb = _steps(plain, 3)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert [m["loss"] for m in ma] == [m["loss"] for m in mb]
    assert all(m["distill_kl"] > 0 and m["ce"] == m["loss"] for m in ma)
    # the teacher: an input of the step, outside the state, bit-identical to its files
    loaded = tree.flatten(checkpoint.load_pytree(teacher_dir / "params"))
    bound = tree.flatten(jax.device_get(distilled.train_step.teacher["params"]))
    assert bound.keys() == loaded.keys()
    for path, leaf in loaded.items():
        np.testing.assert_array_equal(bound[path], leaf, err_msg=path)
    assert set(a.trainable) == {"params", "lora"}
    # optimizer state: adam's mu and nu for the trained head only
    opt = [x for x in jax.tree.leaves(a.opt_state) if np.ndim(x) > 0]
    n_head = tree.count(a.trainable)
    assert n_head == tree.count(a.trainable["params"]["head"]) > 0
    assert sum(x.size for x in opt) == 2 * n_head


def test_exact_resume_with_a_teacher(tmp_path, experiment, monkeypatch):
    """The experiment's ``distilled`` run (6 steps, checkpoints every 3) again, interrupted by
    Ctrl-C at step 3 and resumed (the teacher reloaded from its files): bit-identical."""
    from ftlab.eval import plots
    from ftlab.experiment import _run_config

    monkeypatch.setattr(plots, "_save", _placeholder_png)
    workdir, _ = experiment
    base = load_config(str(ROOT / "configs" / "digits_distill.py") + ":runlocal")
    cfg = _run_config(base, "distilled", dict(base.variants[1][1]), workdir, ["teacher"])

    def ctrl_c_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, on_step=ctrl_c_at_3)
    train(cfg, tmp_path)
    target = build(cfg).state
    states = []
    for where in (workdir / "distilled", tmp_path):
        ckpts = checkpoint.Checkpoints(where / "checkpoints", save_every=3)
        states.append(ckpts.restore(target)[0])
        ckpts.close()
    a, b = states
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    summaries = [
        json.loads((d / "summary.json").read_text()) for d in (workdir / "distilled", tmp_path)
    ]
    assert summaries[0]["test"] == summaries[1]["test"]


def test_output_size_mismatch_exits_2_with_one_line(tmp_path, capsys, experiment):
    workdir, _ = experiment
    code = main(
        [
            "train",
            str(ROOT / "configs" / "digits_distill.py"),
            "--workdir",
            str(tmp_path / "w"),
            "--config.stages=()",
            "--config.variants=()",
            "--config.data.classes=(5,6,7,8,9)",
            f"--config.distill.teacher={workdir / 'teacher'}",
        ]
    )
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftlab:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "10 outputs (classes)" in lines[0] and "student has 5" in lines[0]
    assert not (tmp_path / "w" / "config.json").exists()


def test_regression_is_refused():
    cfg = tiny_config(**{"distill.teacher": "somewhere", "train.loss": "mse"})
    from ftlab.schema import validate

    with pytest.raises(
        ConfigError, match="distill.teacher: distillation matches class.*'mse' is not supported"
    ):
        validate(cfg)


# -- GPT-2: the E2E config's distilled variant, built and stepped ---------------------------


def test_gpt2_e2e_distill_runlocal_builds_and_traces(tmp_path):
    """configs/gpt2_e2e_distill.py:runlocal's distilled variant with a teacher run directory
    (the stage's config, random weights saved as its params): built and its step traced, and
    a teacher of another vocabulary refused. The full experiment (three GPT-2 trainings with
    decoding) is too slow for this file's budget; run it with
    ``ftlab train configs/gpt2_e2e_distill.py:runlocal``."""
    from ftlab.experiment import _run_config

    cfg = load_config(str(ROOT / "configs" / "gpt2_e2e_distill.py") + ":runlocal")
    stages = [name for name, _ in cfg.stages]
    teacher_cfg = _run_config(cfg, "teacher", dict(cfg.stages[0][1]), tmp_path, stages)
    data, model, _ = prepare(teacher_cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (rng.normal(size=s.shape) * 0.5).astype(s.dtype),
        nn.meta.unbox(shapes["params"]),
    )
    stage = tmp_path / "teacher"
    stage.mkdir()
    (stage / "config.json").write_text(json.dumps(to_dict(teacher_cfg)))
    checkpoint.save_pytree(stage / "params", params)
    student_cfg = _run_config(cfg, "distilled", dict(cfg.variants[1][1]), tmp_path, stages)
    assert student_cfg.distill.teacher == str(stage / "params")
    # with the hidden-state term: GPT-2's last hidden state is the input of its tied head
    # (the embedding's attend), projected from the student's width (16) to the teacher's (32)
    hidden = {"train.batch_size": 4, "distill.hidden_weight": 0.1}
    run = build(apply_overrides(student_cfg, hidden), data)
    assert run.state.trainable["distill"]["proj"]["kernel"].shape == (16, 32)
    # the whole step traced (loss, gradients, update) without compiling it: GPT-2's compile
    # costs most of this file's budget; the digits runs above execute the same code
    with _train_batches(run.cfg, run.data, 0, {}, run.batch_sharding) as batches:
        batch = next(batches)
    state, metrics = jax.eval_shape(run.train_step.jitted, run.state, batch, run.train_step.teacher)
    assert {"loss", "ce", "distill_kl", "distill_hidden"} <= set(metrics)
    assert jax.tree.structure(state) == jax.tree.structure(run.state)
    assert "distill" not in run.method.merged_params(run.state.trainable, run.state.frozen)
    # a teacher with another vocabulary (the 100-token fixture) is refused before compiling
    other = apply_overrides(
        student_cfg, {"distill.teacher": str(ROOT / "tests" / "fixtures" / "tiny_gpt2")}
    )
    with pytest.raises(ConfigError, match=r"100 outputs \(vocabulary size\).*student has 512"):
        build(other, data)


# -- the student alone after training; the planner counts the teacher ----------------------


def test_eval_of_a_distilled_run_needs_no_teacher(tmp_path, experiment, capsys):
    """A student trained with the hidden-state term (a learned projection), then its teacher
    moved away: ``ftlab eval`` rebuilds the student alone and reproduces the summary's test
    metrics; the summary counts the projection apart from the student's parameters."""
    import shutil

    workdir, _ = experiment
    teacher = tmp_path / "teacher"
    shutil.copytree(workdir / "teacher", teacher)
    cfg = _student(teacher, **{"distill.hidden_weight": 0.1})
    run_dir = tmp_path / "student"
    summary = train(cfg, run_dir)
    proj = summary["distill_projection_params"]
    assert proj == 16 * 8  # the student's last hidden width (16) to the teacher's (8)
    assert f"parameters (100.00%) + distill projection {proj:,} |" in summary["method_summary"]
    student = tree.count(build(_student("")).state.trainable)
    assert summary["trainable_params"] == student
    teacher.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key, value in summary["test"].items():
        if isinstance(value, float):
            assert result["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_plan_counts_the_teacher(experiment):
    """``ftlab plan`` of a distilled run: the teacher's variables (from its run's config.json,
    no weights read) are an argument of the compiled step, named and counted apart."""
    from ftlab import plan

    workdir, _ = experiment
    with_teacher = plan.plan_config(_student(workdir / "teacher"))
    without = plan.plan_config(_student(""))
    teacher_params = tree.count(checkpoint.load_pytree(workdir / "teacher" / "params"))
    assert with_teacher.teacher == 4 * teacher_params
    assert with_teacher.total >= without.total + with_teacher.teacher
    assert with_teacher.parameters == without.parameters  # the student's alone
    table = with_teacher.table()
    assert "teacher parameters (frozen)" in table and str(workdir / "teacher") in table
    assert "teacher" not in without.table()
    # the hidden-state term adds its projection (student width 16 -> teacher's 8) as trained
    hidden = plan.plan_config(
        _student(workdir / "teacher", **{"distill.hidden_weight": 0.1}), compile=False
    )
    assert hidden.trainable == without.trainable + 4 * 16 * 8
    assert hidden.teacher == with_teacher.teacher
