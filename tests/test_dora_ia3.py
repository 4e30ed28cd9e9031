"""DoRA (``method.lora.dora``) and IA3 (``method.name = "ia3"``): combine-step methods
(``ftlab.methods.dora`` / ``ia3``).

Numerics on the tiny digits CNN (a conv and a dense kernel adapted, a new head trained): at
init each is exactly the base model; merged equals unmerged; DoRA's ``W'`` and its gradient
with the detached norm against hand formulas; IA3's output / input side semantics; config
errors; shardings of the extra leaves; end-to-end runs (frozen leaves bit-identical, optimizer
state only for trained leaves, trainable counts, exact resume after Ctrl-C); and PEFT: the
peft-made fixtures run as in PEFT (1e-5, fp32) and re-export bit for bit, and ftlab -> PEFT ->
ftlab is exact.
"""

import json
import os
import signal
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from ftlab import checkpoint, tree
from ftlab.config import ConfigError
from ftlab.data import load_dataset
from ftlab.eval import plots
from ftlab.interop import peft_scaling
from ftlab.interop.peft import export_method_adapter
from ftlab.interop.pretrained import load_pretrained
from ftlab.methods import build_method
from ftlab.methods import dora as dora_lib
from ftlab.models import build_model
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.parallel import shard
from ftlab.schema import base_config, validate
from ftlab.train import optim
from ftlab.train.loop import train
from ftlab.train.state import TrainState
from tests.conftest import tiny_config

FIXTURES = Path(__file__).parent / "fixtures"
DORA = {
    "method.name": "lora",
    "method.lora.dora": True,
    "method.trainable": ("head/",),
    "method.lora.targets": (r"block_(1|2)/kernel",),  # a conv and a dense kernel
    "method.lora.rank": 2,
}
IA3 = {
    "method.name": "ia3",
    "method.trainable": ("head/",),
    "method.ia3.targets": (r"block_\d+/kernel",),
    "method.ia3.feedforward": (r"block_(1|2)/",),  # conv and dense on their input side
}
# 8 steps, evaluated and checkpointed at the end (and on the Ctrl-C at step 4)
SHORT = {"train.num_steps": 8, "train.eval_every": 8, "checkpoint.every_steps": 8}


@pytest.fixture(scope="module")
def cnn():
    cfg = tiny_config(**DORA)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_outputs, np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), data.train.inputs[:4])
    return model, nn.meta.unbox(variables["params"]), jnp.asarray(data.train.inputs[:8]), data


def _method(overrides, params, seed=3):
    method = build_method(tiny_config(**overrides).method, params)
    trainable, frozen = jax.jit(method.split)(params, jax.random.key(seed))
    return method, trainable, frozen


def _perturb(trainable, seed=7, size=0.3):
    rng = np.random.default_rng(seed)  # numpy: no compilation per leaf shape
    return jax.tree.map(
        lambda v: jnp.asarray(v + size * rng.standard_normal(v.shape), jnp.float32), trainable
    )


# -- numerics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [DORA, IA3], ids=["dora", "ia3"])
def test_init_is_the_base_model_and_merged_equals_unmerged(cnn, overrides):
    model, params, x, _ = cnn
    method, trainable, frozen = _method(overrides, params)
    unmerged_fn = jax.jit(lambda t, f: method.apply(model, t, f, x, train=False))
    merged_fn = jax.jit(lambda t, f: model.apply({"params": method.merged_params(t, f)}, x))
    base = jax.jit(model.apply)({"params": params}, x)
    # under jit XLA may sum the norm's squares in another order than at init: m / ||W||
    # within an ulp of 1 (eagerly it is exactly 1: see test_dora_combine_...)
    np.testing.assert_allclose(unmerged_fn(trainable, frozen), base, atol=1e-6, rtol=0)
    trainable = _perturb(trainable)
    with jax.default_matmul_precision("highest"):
        unmerged, merged = unmerged_fn(trainable, frozen), merged_fn(trainable, frozen)
    assert np.abs(unmerged - base).max() > 1e-2  # the adapter matters ...
    np.testing.assert_allclose(unmerged, merged, atol=1e-6, rtol=0)  # ... the same in both forms
    # the merged tree is a plain model tree: every base leaf, float32, nothing else
    flat = tree.flatten(jax.jit(method.merged_params)(trainable, frozen))
    assert flat.keys() == tree.flatten(params).keys()
    assert all(v.dtype == jnp.float32 for v in flat.values())


def test_dora_combine_and_detached_norm_gradient(cnn):
    _, params, _, _ = cnn
    method, fresh, frozen = _method(DORA, params)
    assert method.dora_targets == ("block_1/kernel", "block_2/kernel") and not method.lora_targets
    trainable = _perturb(fresh)
    w = np.asarray(params["block_2"]["kernel"], np.float64)  # dense (128, 16)
    f = method.dora_factors(trainable)["block_2/kernel"]
    a, b = np.asarray(f["a"], np.float64), np.asarray(f["b"], np.float64)
    m = np.asarray(method.dora_magnitudes(trainable)["block_2/kernel"], np.float64)
    s = method.lora.scale
    v = w + s * a @ b
    norm = np.linalg.norm(v, axis=0)  # per output unit (column)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(method.merged_params)(trainable, frozen)["block_2"]["kernel"]
        np.testing.assert_allclose(got, m * v / norm, rtol=1e-5, atol=1e-6)
        # the norm is a constant for autograd: d sum(W' * g) / db = s a^T (g * m / ||V||)
        g = np.random.default_rng(1).standard_normal(v.shape)
        m32 = jnp.asarray(m, jnp.float32)

        def loss(b_):
            out = dora_lib.combine(params["block_2"]["kernel"], {"a": f["a"], "b": b_}, m32, s)
            return jnp.sum(out * jnp.asarray(g, jnp.float32))

        grad_b = jax.jit(jax.grad(loss))(f["b"])
    np.testing.assert_allclose(grad_b, s * a.T @ (g * m / norm), rtol=1e-4, atol=1e-5)
    # m starts at the column norms of the kernel as stored: conv kernels over (kh, kw, in)
    for path in method.dora_targets:  # and with b = 0, W' is W bit for bit (eagerly)
        kernel = tree.flatten(params)[path]
        zero = {**method.dora_factors(fresh)[path]}
        m0 = dora_lib.init_magnitude(kernel)  # as split computes it, here eagerly
        np.testing.assert_allclose(m0, method.dora_magnitudes(fresh)[path], rtol=1e-6)
        np.testing.assert_array_equal(dora_lib.combine(kernel, zero, m0, s), kernel)
    conv = np.asarray(params["block_1"]["kernel"], np.float64)
    np.testing.assert_allclose(
        fresh["dora"]["block_1"]["kernel"]["m"],
        np.sqrt((conv**2).sum(axis=(0, 1, 2))),
        rtol=1e-6,
    )


def test_ia3_output_and_input_side(cnn):
    _, params, _, _ = cnn
    method, trainable, frozen = _method(IA3, params)
    assert method.ia3_targets == ("block_0/kernel", "block_1/kernel", "block_2/kernel")
    assert method.ia3_input == ("block_1/kernel", "block_2/kernel")
    shapes = {p: v.shape for p, v in tree.flatten(trainable["ia3"]).items()}
    assert shapes == {
        "block_0/kernel/out": (4,),
        "block_1/kernel/in": (4,),
        "block_2/kernel/in": (128,),
    }
    assert all(np.all(v == 1) for v in jax.tree.leaves(trainable["ia3"]))
    trainable = _perturb(trainable)
    scales = {p: np.asarray(v) for p, (_, v) in method.ia3_scales(trainable).items()}
    merged = tree.flatten(jax.jit(method.merged_params)(trainable, frozen))
    flat = tree.flatten(params)
    l0, l1, l2 = scales["block_0/kernel"], scales["block_1/kernel"], scales["block_2/kernel"]
    # output side: each output column and the bias scaled
    np.testing.assert_allclose(merged["block_0/kernel"], flat["block_0/kernel"] * l0, rtol=1e-6)
    np.testing.assert_allclose(merged["block_0/bias"], flat["block_0/bias"] * l0, rtol=1e-6)
    # input side: each input channel (conv) / input row (dense), bias untouched
    np.testing.assert_allclose(
        merged["block_1/kernel"], flat["block_1/kernel"] * l1[:, None], rtol=1e-6
    )
    np.testing.assert_allclose(
        merged["block_2/kernel"], flat["block_2/kernel"] * l2[:, None], rtol=1e-6
    )
    for p in ("block_1/bias", "block_2/bias"):
        np.testing.assert_array_equal(merged[p], flat[p])
    np.testing.assert_array_equal(merged["head/kernel"], trainable["params"]["head"]["kernel"])


def test_config_errors(cnn):
    _, params, _, _ = cnn
    cases = [
        ({**IA3, "method.ia3.targets": ("attn/q_proj",)}, r"method\.ia3\.targets: regex"),
        ({**IA3, "method.ia3.feedforward": ("head",)}, r"method\.ia3\.feedforward: regex"),
        ({**IA3, "method.trainable": ("block_0/",)}, "both fully trained .* IA3 target"),
        ({**DORA, "method.lora.dropout": 0.1}, r"method\.lora\.dropout: DoRA"),
        ({**DORA, "method.trainable": ("block_1/",)}, "both fully trained"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_method(tiny_config(**overrides).method, params)
    with pytest.raises(ConfigError, match=r"method\.ia3\.targets: IA3 needs"):
        validate(tiny_config(**{**IA3, "method.ia3.targets": ()}))
    with pytest.raises(ConfigError, match=r"method\.lora\.dropout: DoRA"):
        validate(tiny_config(**{**DORA, "method.lora.dropout": 0.1}))
    validate(tiny_config(**IA3))
    validate(tiny_config(**DORA))


def test_extra_leaves_shard_like_their_kernels_output_axis():
    """fsdp=4 x tensor=2: c_fc (embed, mlp) and mlp c_proj (mlp, embed); the DoRA magnitude
    and IA3 "out" vector take the output axis, IA3 "in" the input axis."""
    model = GPT2(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=128, n_layer=1, n_head=4, n_inner=512)
    )
    variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
    mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"))
    plain = nn.meta.unbox(variables["params"])
    specs = {}
    for name in ("dora", "ia3"):
        cfg = base_config()
        cfg.method.name = "lora" if name == "dora" else "ia3"
        cfg.method.lora.dora = name == "dora"
        cfg.method.lora.targets = cfg.method.ia3.targets = (r"mlp/c_(fc|proj)/kernel",)
        cfg.method.ia3.feedforward = (r"mlp/c_proj",)
        method = build_method(cfg.method, plain)
        tx, _ = optim.optimizer(cfg.optim, 10)
        abstract = shard.abstract_state(shard.init_state_fn(method, tx, 0), variables)
        sh = shard.state_shardings(abstract, variables, mesh)
        mlp = sh.trainable[name]["h_0"]["mlp"]
        side = (
            (lambda d: d["m"])
            if name == "dora"
            else (lambda d: d["out"] if "out" in d else d["in"])
        )
        specs[name] = (side(mlp["c_fc"]["kernel"]).spec, side(mlp["c_proj"]["kernel"]).spec)
        # the optimizer state mirrors them
        mu = jax.tree.leaves(sh.opt_state)
        assert any(getattr(x, "spec", None) == specs[name][0] for x in mu)
    assert specs["dora"] == (P("tensor"), P("fsdp"))  # output axes: mlp, embed
    assert specs["ia3"] == (P("tensor"), P("tensor"))  # c_fc out (mlp); c_proj in (mlp)


def test_sweep_points_and_trainable_counts(cnn):
    """A sweep over lora / dora / ia3 (a zipped group, labelled): names, valid configs, and
    trainable counts of only the method's leaves plus the head (what the table shows)."""
    from ftlab import sweep
    from ftlab.config import apply_overrides

    _, params, _, _ = cnn
    cfg = tiny_config(**DORA, **{"method.ia3.targets": IA3["method.ia3.targets"]})
    cfg.sweep.zip = (
        (
            ("name", ("lora", "dora", "ia3")),
            ("method.name", ("lora", "lora", "ia3")),
            ("method.lora.dora", (False, True, False)),
        ),
    )
    validate(cfg)
    counts = {}
    for name, overrides in sweep.expand(cfg):
        point = apply_overrides(cfg, overrides)
        validate(point)
        method = build_method(point.method, params)
        counts[name] = tree.count(jax.eval_shape(method.split, params, jax.random.key(0))[0])
    head, lora = 16 * 5 + 5, (36 * 2 + 2 * 8) + (128 * 2 + 2 * 16)
    assert counts == {"lora": head + lora, "dora": head + lora + 8 + 16, "ia3": head + 4 + 8 + 16}


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cnn):
    """From the same saved initial parameters, 8 steps each for DoRA and IA3 (+ a new head):
    straight, and interrupted by Ctrl-C at step 4 then resumed. The data is loaded once and
    the runs' PNG plots are not rendered (half of each tiny run's time; not under test)."""
    _, params, _, data = cnn
    root = tmp_path_factory.mktemp("dora_ia3")
    checkpoint.save_pytree(root / "init", params)
    common = {"init.checkpoint": str(root / "init"), "eval.before_training": False, **SHORT}
    cfgs = {"dora": tiny_config(**DORA, **common), "ia3": tiny_config(**IA3, **common)}
    out = {"root": root, "params": params, "cfgs": cfgs}

    def ctrl_c_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled by the loop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", lambda fig, path: (plt.close(fig), Path(path))[1])
        for name, cfg in cfgs.items():
            out[name] = train(cfg, root / name, data=data)
            with pytest.raises(KeyboardInterrupt):
                train(cfg, root / f"{name}_resumed", on_step=ctrl_c_at_4, data=data)
            out[f"{name}_resumed"] = train(cfg, root / f"{name}_resumed", data=data)
    return out


def _final_state(runs, run, cfg):
    params = runs["params"]
    method = build_method(cfg.method, params)
    trainable, frozen = jax.jit(method.split)(params, jax.random.key(0))
    tx, _ = optim.optimizer(cfg.optim, cfg.train.num_steps)
    target = TrainState.create(trainable, frozen, tx, cfg.seed)
    ckpts = checkpoint.Checkpoints(runs["root"] / run / "checkpoints", save_every=8)
    state, meta = ckpts.restore(target)
    ckpts.close()
    return method, state, frozen, meta


@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_frozen_bit_identical_optimizer_state_and_counts(runs, name):
    cfg = runs["cfgs"][name]
    method, state, frozen0, meta = _final_state(runs, name, cfg)
    assert meta["step"] == 8
    assert sorted(tree.flatten(state.frozen)) == sorted(tree.flatten(frozen0))
    for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen0)):
        np.testing.assert_array_equal(x, y)
    n_trainable = tree.count(state.trainable)
    opt = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in opt) == 2 * n_trainable  # adam's mu and nu, nothing else
    head = 16 * 5 + 5
    if name == "dora":  # block_1 conv (3,3,4,8), block_2 dense (128,16), rank 2: a, b, m
        expected = head + (36 * 2 + 2 * 8 + 8) + (128 * 2 + 2 * 16 + 16)
        assert {k for k, v in state.trainable.items() if jax.tree.leaves(v)} == {
            "params",
            "lora",
            "dora",
        }
    else:  # block_0 out (4), block_1 in (4), block_2 in (128)
        expected = head + 4 + 4 + 128
        assert {k for k, v in state.trainable.items() if jax.tree.leaves(v)} == {"params", "ia3"}
    assert n_trainable == expected
    s = runs[name]
    assert s["trainable_params"] == expected and s["total_params"] == tree.count(runs["params"])
    # it trained: the extra leaves moved from their start
    moved = state.trainable["dora"] if name == "dora" else state.trainable["ia3"]
    start = jax.jit(method.split)(runs["params"], jax.random.key(0))[0]
    start = start["dora"] if name == "dora" else start["ia3"]
    assert any(
        np.abs(np.asarray(x) - np.asarray(y)).max() > 0
        for x, y in zip(jax.tree.leaves(moved), jax.tree.leaves(start))
    )


@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_exact_resume_is_bit_identical(runs, name):
    cfg = runs["cfgs"][name]
    _, a, _, _ = _final_state(runs, name, cfg)
    _, b, _, _ = _final_state(runs, f"{name}_resumed", cfg)
    assert int(a.step) == int(b.step) == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert runs[name]["test"] == runs[f"{name}_resumed"]["test"]


# -- PEFT ---------------------------------------------------------------------------------------

CASES = {"peft_llama_dora": "tiny_llama", "peft_gpt2_ia3": "tiny_gpt2"}
_BASES = {}


def _base(name, head=None):
    if (name, head) not in _BASES:
        _BASES[name, head] = load_pretrained(FIXTURES / name, head=head)
    return _BASES[name, head]


def _logits(p, params_or_method, batch, trainable=None, frozen=None):
    """Logits, jitted (eager model calls compile op by op), in full fp32 matmuls."""
    with jax.default_matmul_precision("highest"):
        if trainable is None:
            return np.asarray(jax.jit(p.model.apply)({"params": params_or_method}, batch))
        run = jax.jit(lambda t, f, b: params_or_method.apply(p.model, t, f, b, train=False))
        return np.asarray(run(trainable, frozen, batch))


@pytest.mark.parametrize("case", CASES)
def test_peft_fixture_runs_as_in_peft_and_reexports_bit_exactly(case, tmp_path):
    p = _base(CASES[case])
    with np.load(FIXTURES / case / "reference.npz") as d:
        ref = dict(d)
    adapter = peft_scaling.load_scaled_adapter(FIXTURES / case, p.params, p.hf_config)
    assert adapter.notes == [] and adapter.modules == {}
    method, trainable, frozen = adapter.split(p.params)
    if case == "peft_llama_dora":
        assert len(method.dora_targets) == 4 and method.lora.scale == 2
    else:  # c_attn -> q/k/v out side; mlp.c_proj -> input side
        assert len(method.ia3_targets) == 8
        assert method.ia3_input == ("h_0/mlp/c_proj/kernel", "h_1/mlp/c_proj/kernel")
    batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    mask = ref["attention_mask"].astype(bool)
    unmerged = _logits(p, method, batch, trainable, frozen)
    merged = _logits(p, jax.jit(method.merged_params)(trainable, frozen), batch)
    assert np.abs(unmerged - ref["peft_logits"])[mask].max() < 1e-5  # measured ~1e-7
    assert np.abs(merged - ref["merged_logits"])[mask].max() < 1e-5
    assert np.abs(_logits(p, p.params, batch) - ref["peft_logits"])[mask].max() > 1e-2

    out = peft_scaling.export_scaled_adapter(
        tmp_path / "out",
        method,
        trainable,
        frozen,
        p.hf_config,
        base_model_name_or_path=adapter.config["base_model_name_or_path"],
    )
    theirs = load_file(str(FIXTURES / case / "adapter_model.safetensors"))
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and np.array_equal(ours[k], theirs[k]), k
    mine = json.loads((out / "adapter_config.json").read_text())
    ref_config = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    keys = [
        "peft_type",
        "task_type",
        "fan_in_fan_out",
        "base_model_name_or_path",
        "modules_to_save",
    ]
    keys += (
        ["r", "lora_alpha", "use_dora", "use_rslora", "lora_dropout"] if "r" in ref_config else []
    )
    keys += ["feedforward_modules"] if "feedforward_modules" in ref_config else []
    for key in keys:
        assert mine[key] == ref_config[key], key
    assert sorted(mine["target_modules"]) == sorted(ref_config["target_modules"])
    back = peft_scaling.load_scaled_adapter(out, p.params, p.hf_config)
    for x, y in zip(jax.tree.leaves(back.leaves), jax.tree.leaves(adapter.leaves)):
        np.testing.assert_array_equal(x, y)


def test_ftlab_dora_and_ia3_export_import_roundtrip_with_a_new_head(tmp_path):
    """GPT-2 classifier: DoRA on q and v (fused c_attn, k not adapted) and IA3 on c_attn (out)
    and c_fc (in), each with the new head ``score`` trained whole (modules_to_save)."""
    p = _base("tiny_gpt2", "classifier")
    for name, overrides in {
        "dora": {
            **DORA,
            "method.trainable": ("score/",),
            "method.lora.targets": (r"attn/(q|v)_proj/kernel",),
        },
        "ia3": {
            **IA3,
            "method.trainable": ("score/",),
            "method.ia3.targets": (r"attn/(q|k|v)_proj/kernel", r"mlp/c_fc/kernel"),
            "method.ia3.feedforward": (r"mlp/c_fc",),
        },
    }.items():
        method, trainable, frozen = _method(overrides, p.params)
        trainable = _perturb(trainable, size=0.1)
        # what export.peft / `ftlab export --peft` call: peft.py hands DoRA / IA3 over
        out = export_method_adapter(tmp_path / name, method, trainable, frozen, p.hf_config)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
        back = peft_scaling.load_scaled_adapter(out, p.params, p.hf_config)
        m2, tr2, fr2 = back.split(p.params)
        assert sorted(m2.dora_targets) == sorted(method.dora_targets)
        assert sorted(m2.ia3_targets) == sorted(method.ia3_targets)
        assert sorted(m2.ia3_input) == sorted(method.ia3_input)
        assert m2.trained == ("score/bias", "score/kernel") or m2.trained == ("score/kernel",)
        for key in ("lora", "dora", "ia3"):
            for x, y in zip(
                jax.tree.leaves(tr2.get(key, {})), jax.tree.leaves(trainable.get(key, {}))
            ):
                np.testing.assert_array_equal(x, y)
        # the same model: identical combined kernels (so identical logits)
        ours = tree.flatten(jax.jit(method.merged_params)(trainable, frozen))
        back_merged = tree.flatten(jax.jit(m2.merged_params)(tr2, fr2))
        assert ours.keys() == back_merged.keys()
        for path, value in ours.items():
            np.testing.assert_allclose(back_merged[path], value, rtol=0, atol=1e-6, err_msg=path)


def test_peft_adapter_errors(tmp_path):
    from safetensors.numpy import save_file

    from ftlab.interop.errors import PeftAdapterError

    llama, gpt2 = _base("tiny_llama"), _base("tiny_gpt2")
    with pytest.raises(PeftAdapterError, match="not a DoRA adapter"):
        peft_scaling.load_dora_adapter(FIXTURES / "peft_llama", llama.params, llama.hf_config)

    def copy(case, edit):
        out = tmp_path / f"{case}_{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / "adapter_config.json").write_text(
            (FIXTURES / case / "adapter_config.json").read_text()
        )
        tensors = load_file(str(FIXTURES / case / "adapter_model.safetensors"))
        save_file(edit(tensors), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return out

    mag = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    no_mag = copy("peft_llama_dora", lambda t: {k: v for k, v in t.items() if k != mag})
    with pytest.raises(PeftAdapterError, match="no lora_magnitude_vector for"):
        peft_scaling.load_dora_adapter(no_mag, llama.params, llama.hf_config)
    short = copy("peft_llama_dora", lambda t: {**t, mag: t[mag][:16]})
    with pytest.raises(PeftAdapterError, match="has shape"):
        peft_scaling.load_dora_adapter(short, llama.params, llama.hf_config)
    ia3 = "base_model.model.transformer.h.0.mlp.c_proj.ia3_l"
    wrong = copy("peft_gpt2_ia3", lambda t: {**t, ia3: t[ia3].reshape(-1, 1)})
    with pytest.raises(PeftAdapterError, match="as a feedforward module it needs"):
        peft_scaling.load_ia3_adapter(wrong, gpt2.params, gpt2.hf_config)
