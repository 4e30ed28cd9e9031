"""The memory planner (``ftlab.plan``): per-device bytes from shapes and the compiled
step, never from allocated weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections as mc
import numpy as np
import pytest
import transformers

from ftlab import plan
from ftlab.config import ConfigError
from ftlab.methods import build_method
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.parallel import make_abstract_mesh, make_mesh, shard
from ftlab.schema import base_config
from ftlab.train import optim
from ftlab.train.losses import cross_entropy
from ftlab.train.step import make_train_step

GPT2_MEDIUM = 354_823_168  # parameters (tied head), as transformers counts them
LORA_R4_QV = 393_216  # 24 layers x 2 projections x (1024 x 4 + 4 x 1024)
ADAM = 2 * 4  # mu and nu, float32
TINY = GPT2Config(
    vocab_size=64,
    n_positions=16,
    n_embd=32,
    n_layer=2,
    n_head=4,
    embd_pdrop=0,
    attn_pdrop=0,
    resid_pdrop=0,
)


def lm_loss(logits, batch):
    return cross_entropy(logits[:, :-1], batch["labels"][:, 1:]).mean(-1)


def setup(model, method_name: str, sample):
    variables = jax.eval_shape(model.init, jax.random.key(0), sample)
    cfg = base_config()
    cfg.method.name = method_name
    cfg.method.lora.rank = 4
    cfg.method.lora.targets = (r"attn/(q|v)_proj/kernel",)
    method = build_method(cfg.method, nn.meta.unbox(variables["params"]))
    tx, lr = optim.optimizer(cfg.optim, 10)
    init = shard.init_state_fn(method, tx, seed=0)
    step = make_train_step(model, method, tx, lr, lm_loss)
    return variables, init, step


def shape_plan(variables, init, mesh, batch):
    abstract = shard.abstract_state(init, variables)
    state = shard.with_shardings(abstract, shard.state_shardings(abstract, variables, mesh))
    return plan.plan_step(
        None, state, shard.abstract_batch(batch, shard.batch_sharding(mesh)), compile=False
    )


def test_lora_optimizer_state_is_a_tiny_fraction_for_gpt2_medium():
    hf = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024)
    model = GPT2(GPT2Config.from_hf_config(hf))
    ids = np.zeros((8, 128), np.int32)
    batch = {"inputs": ids, "labels": ids}
    plans = {}
    for method in ("full", "lora"):
        variables, init, _ = setup(model, method, ids[:1])
        plans[method] = shape_plan(variables, init, make_mesh(), batch)
        plans[f"{method}/fsdp8"] = shape_plan(
            variables, init, make_abstract_mesh({"fsdp": 8}, 8), batch
        )
    full, lora = plans["full"], plans["lora"]
    # adam keeps two float32 moments per trainable parameter (+ a few int32 counters)
    assert ADAM * GPT2_MEDIUM <= full.optimizer < ADAM * GPT2_MEDIUM + 64
    assert ADAM * LORA_R4_QV <= lora.optimizer < ADAM * LORA_R4_QV + 64
    assert lora.optimizer < 0.01 * full.optimizer
    assert lora.gradients == 4 * LORA_R4_QV and full.gradients == 4 * GPT2_MEDIUM
    assert lora.parameters == 4 * (GPT2_MEDIUM + LORA_R4_QV)
    assert lora.compiled is None and lora.activations is None
    # fsdp=8 (planned for 8 devices this machine does not have) splits every embed dimension;
    # only the biases on tensor-parallel axes (q/k/v, c_fc: 7168 per layer) stay whole
    sharded = plans["full/fsdp8"]
    assert sharded.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    replicated = 24 * 7 * 1024
    expected = ADAM * ((GPT2_MEDIUM - replicated) // 8 + replicated)
    assert expected <= sharded.optimizer < expected + 64
    assert sharded.batch == full.batch // 8


def test_planner_numbers_match_the_real_arrays():
    model = GPT2(TINY)
    ids = np.random.default_rng(0).integers(0, 64, (8, 16)).astype(np.int32)
    batch = {"inputs": ids, "labels": ids}
    variables, init, step = setup(model, "lora", ids[:1])
    abstract = shard.abstract_state(init, variables)
    mesh = make_mesh()
    shardings = shard.state_shardings(abstract, variables, mesh)
    p = plan.plan_step(
        step,
        shard.with_shardings(abstract, shardings),
        shard.abstract_batch(batch, shard.batch_sharding(mesh)),
    )

    with jax.threefry_partitionable(False):  # as the trainer on CPU: faster to compile
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), ids[:1])["params"])
        state = jax.jit(init, out_shardings=shardings)(params, {})

    def nbytes(tree):
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    assert p.parameters == nbytes((state.trainable, state.frozen))
    assert p.trainable == p.gradients == nbytes(state.trainable)
    assert p.optimizer == nbytes(state.opt_state)
    assert p.batch == ids.nbytes * 2
    # XLA's view of the compiled step: the inputs are exactly the state and the batch, and
    # the donated state is reused for the new one
    assert p.compiled["argument"] == nbytes(state) + p.batch
    assert p.compiled["alias"] == nbytes(state)
    assert p.activations > 0
    assert p.total >= p.compiled["argument"] + p.activations
    assert p.fits(p.total) and not p.fits(p.total - 1)
    assert "does NOT fit" in p.table(p.total - 1) and "fits in" in p.table(p.total)
    for row in ("parameters", "gradients", "optimizer state", "activations"):
        assert row in p.table()


def test_plan_from_a_config(tiny, monkeypatch):
    cfg = tiny()
    cfg.mesh = mc.ConfigDict({"shape": {"data": -1}})
    p = plan.plan_config(cfg)
    assert p.mesh == {"data": 1, "fsdp": 1, "tensor": 1}
    assert p.compiled is not None and p.activations > 0
    assert p.trainable == p.parameters  # full fine-tuning
    # planning for 8 devices this machine lacks: shapes only, the batch split 8 ways
    p8 = plan.plan_config(cfg, devices=8)
    assert p8.compiled is None and p8.batch * 8 == p.batch
    # a batch (16) that does not split over the mesh fails before compiling
    monkeypatch.setattr(plan, "plan_step", lambda *a, **k: pytest.fail("compiled"))
    cfg.mesh.shape = {"data": 3, "tensor": 2}
    with pytest.raises(ConfigError, match=r"batch_size: 16 .* 3 batch shards .*data=3 x fsdp=1"):
        plan.plan_config(cfg, devices=6)
    with pytest.raises(ConfigError, match=r"config.mesh.shape: data=3 x tensor=2 = 6 devices"):
        plan.plan_config(cfg)


def test_parse_bytes():
    assert plan.parse_bytes("80GB") == 80 * 2**30
    assert plan.parse_bytes("16GiB") == 16 * 2**30
    assert plan.parse_bytes("512m") == 512 * 2**20
    assert plan.parse_bytes("1000") == 1000
    with pytest.raises(ConfigError, match="expected a size"):
        plan.parse_bytes("lots")


def test_describe_is_what_the_cli_prints(tiny):
    cfg = tiny()
    text, fits = plan.describe(cfg, device_memory=plan.parse_bytes("1GB"))
    assert fits is True and "fits in 1.00 GiB" in text and "total (peak)" in text
    assert plan.local_device_memory() is None  # CPU reports no limit: the CLI needs a size


def test_a_distilled_variant_plans_its_teachers_forward(monkeypatch):
    """configs/digits_distill.py:runlocal's ``distilled`` variant distils from the stage
    ``teacher`` (not trained yet): planned from the stage's config, the teacher's variables
    are an input of the compiled step, counted apart, and the peak grows by at least them."""
    from ftlab import tree
    from ftlab.config import load_config
    from ftlab.train.loop import prepare

    cfg = load_config("configs/digits_distill.py:runlocal")
    runs = dict(plan.runs(cfg))
    distilled = plan.plan_config(runs["distilled"], teacher_model=runs["teacher"].model)
    scratch = plan.plan_config(runs["scratch"])
    data, model, _ = prepare(runs["teacher"])
    shapes = jax.eval_shape(model.init, jax.random.key(0), data.train.sample_inputs())
    assert distilled.teacher == 4 * tree.count(nn.meta.unbox(shapes["params"])) > 0
    assert scratch.teacher == 0 and distilled.parameters == scratch.parameters
    assert distilled.total >= scratch.total + distilled.teacher
    assert distilled.compiled["argument"] >= scratch.compiled["argument"] + distilled.teacher
    table = distilled.table()
    assert "distillation teacher: " in table and "teacher parameters (frozen)" in table
    assert "teacher" not in scratch.table()
    # describe hands each variant its teacher stage's model config
    seen = {}

    def fake(run, **kw):
        seen[run.distill.teacher] = kw["teacher_model"]
        return scratch

    monkeypatch.setattr(plan, "plan_config", fake)
    plan.describe(cfg, variant="distilled")
    ((teacher, model_cfg),) = seen.items()
    assert teacher.endswith("teacher/params") and model_cfg.features == (4, 8)
    assert model_cfg.hidden == (8,)
