"""``ftlab plan --target``: the planner compiles the trainer's own step, for this machine or
ahead of time for a TPU topology, from the config alone (no data, no weights); every recipe's
batch, accumulation and mesh are valid on the topologies the README names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from ftlab import plan
from ftlab.config import ConfigError, load_config, override_copy
from ftlab.data.batches import train_batch
from ftlab.parallel import shard
from ftlab.train.loop import build

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _experiment():
    spec = importlib.util.spec_from_file_location(
        "plan_targets", ROOT / "experiments/plan_targets.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_host_plan_is_the_memory_of_the_trainers_step():
    cfg = load_config(str(CONFIGS / "gpt2_e2e.py:lora,runlocal"))
    p = plan.plan_config(cfg)  # synthesised batch, abstract weights
    run = build(cfg)  # the real run: data, initialised weights, the jitted step
    host = train_batch(run.data.train, 0, cfg.train.batch_size, cfg.seed, shuffle=False)
    batch = shard.shard_batch(host, run.batch_sharding)
    stats = run.train_step.lower(run.state, batch).compile().memory_analysis()
    assert p.compiled["argument"] == stats.argument_size_in_bytes
    assert p.compiled["alias"] == stats.alias_size_in_bytes
    assert p.compiled["output"] == stats.output_size_in_bytes
    assert p.compiled["temp"] == stats.temp_size_in_bytes
    real = sum(x.nbytes for x in jax.tree.leaves((run.state.trainable, run.state.frozen)))
    assert p.parameters == real
    assert p.flops and p.flops > 0


def test_tpu_plan_ahead_of_time_on_a_cpu_host():
    pytest.importorskip("libtpu", reason='TPU planning needs pip install -e ".[tpu-plan]"')
    cfg = load_config(str(CONFIGS / "gpt2_e2e.py:lora,runlocal"))
    cfg = override_copy(cfg, {"mesh.shape.fsdp": 2, "mesh.shape.data": -1})
    p = plan.plan_config(cfg, target="tpu-v5e-4")  # libtpu's compile-only devices
    assert p.target == "tpu-v5e-4" and p.mesh == {"data": 2, "fsdp": 2, "tensor": 1}
    assert p.compiled["temp"] > 0 and p.compile_s > 0
    assert p.batch == (2 * 8 * 64 * 4 + 8 * 4) // 4  # inputs, labels, weights over 4 shards
    assert p.fits(plan.TARGETS["tpu-v5e-4"].memory)


def test_gpt2_medium_lora_needs_less_than_full_fine_tuning():
    """GPT-2-medium at 8 x 1024 from shapes (no weights): LoRA keeps no gradients or optimizer
    state for the frozen weights, so its step holds 4 GiB less than full fine-tuning's."""
    plans = {}
    for method in ("lora", "full"):
        cfg = load_config(str(CONFIGS / f"gpt2_e2e.py:{method}"))
        cfg = override_copy(cfg, {"data.max_length": 1024})
        plans[method] = plan.plan_config(cfg, devices=8, compile=False)
    lora, full = plans["lora"], plans["full"]
    assert lora.batch == full.batch and lora.mesh == full.mesh
    assert lora.gradients < 8 * 2**20 and lora.optimizer < 8 * 2**20
    assert full.total - lora.total > 3 * 2**30
    assert lora.total < full.total


def test_tpu_without_libtpu_is_one_clear_error(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_libtpu(name, *args, **kwargs):
        if name == "libtpu":
            raise ImportError("no libtpu")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_libtpu)
    from ftlab.cli import main

    code = main(["plan", str(CONFIGS / "gpt2_e2e.py:lora,runlocal"), "--target", "tpu-v5e-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert 'pip install "jax[tpu]==' in err and ".[tpu-plan]" in err


def test_unknown_target_names_the_nearest():
    with pytest.raises(ConfigError, match=r"did you mean tpu-v5e-8\?"):
        plan.get_target("tpu-v5e-9")


@pytest.mark.parametrize("target", plan.README_TARGETS)
def test_every_recipe_is_valid_on_the_readme_topologies(target):
    """Batch, accumulation and mesh divide on each README topology, with the overrides the
    README's launch commands add (no compile, no data)."""
    experiment = _experiment()
    devices = plan.get_target(target).devices
    for _, spec, variant in experiment.RECIPES:
        cfg = experiment.recipe_config(spec, variant, devices)
        plan.check_config(cfg, devices)


def test_the_alpaca_pod_error_says_how_to_fix_it():
    cfg = load_config(str(CONFIGS / "alpaca_lora_llama7b.py"))
    cfg = override_copy(cfg, {"mesh.shape.fsdp": -1, "mesh.shape.data": 1})
    with pytest.raises(ConfigError) as e:
        plan.check_config(cfg, 8)
    message = str(e.value)
    assert "4 examples do not split over the 8 batch shards" in message
    assert "set config.optim.accum_steps to 16" in message
    assert "config.mesh.shape.fsdp to 4" in message
    # the README pod command (micro-batches and eval batches of 16) is valid on 8 and 16 chips
    fixed = override_copy(cfg, {"optim.accum_steps": 8, "train.eval_batch_size": 16})
    for devices in (8, 16):
        plan.check_config(fixed, devices)


def test_the_planner_sits_above_the_training_code():
    """Nothing in ftlab.train or ftlab.parallel imports the planner that compiles them."""
    import ast

    for path in [*(ROOT / "ftlab/train").glob("*.py"), *(ROOT / "ftlab/parallel").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith("ftlab.plan") for n in names), path


@pytest.mark.parametrize(
    "spec, encoder",
    [
        # T5: source token ids and mask (batch 2 x 64 tokens)
        ("t5_e2e.py:lora,runlocal", {"input_ids": (64,), "attention_mask": (64,)}),
        # Whisper: log-mel input_features (40 mel bins x the tiny model's 200-frame window)
        ("whisper_asr.py:lora,runlocal", {"input_features": (40, 200)}),
    ],
)
def test_encoder_decoders_plan_their_seq2seq_step(spec, encoder):
    """T5 and Whisper plan the trainer's seq2seq step from the config alone: the encoder's
    inputs, the decoder's inputs and mask and the labels, compiled for a peak."""
    cfg = override_copy(load_config(str(CONFIGS / spec)), {"train.batch_size": 2})
    data = plan.synthetic_data(cfg)
    assert data.task == "seq2seq"
    target = cfg.data.max_length
    shapes = {"decoder_input_ids": (target,), "decoder_attention_mask": (target,), **encoder}
    assert {k: v.shape[1:] for k, v in data.train.inputs.items()} == shapes
    p = plan.plan_config(cfg)
    assert p.compiled is not None and p.activations > 0 and p.total > p.parameters
    assert p.trainable < p.parameters  # LoRA factors only
    size = sum(2 * 4 * np.prod(s) for s in shapes.values())  # int32 / float32 rows
    assert p.batch == size + 2 * target * 4 + 2 * 4  # + labels and weights
    assert "total (peak)" in p.table()
    if "input_features" in encoder:  # the real speech pipeline's batch has the same layout
        from ftlab.data import load_dataset

        real = load_dataset(cfg.data, tokenizer=cfg.model.pretrained)
        a, b = (train_batch(d.train, 0, 2, 0, shuffle=False) for d in (data, real))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), a) == jax.tree.map(
            lambda x: (x.shape, x.dtype), b
        )
