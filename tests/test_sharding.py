"""Device meshes, sharding rules and sharded training (``ftlab.parallel``).

The multi-device checks run in subprocesses with fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax is imported;
this process keeps its single device): ``tests/sharding_worker.py`` trains a tiny GPT-2
(2 layers, width 32, adamw with clipping and decay; dropout 0.1 for full fine-tuning) for 4
steps on one device and on the meshes data=8, fsdp=4 x data=2 and tensor=2 x data=4, for full
fine-tuning and for LoRA (q, v, c_fc), then restores the fsdp run's Orbax checkpoint onto a
4-device tensor=2 x fsdp=2 mesh.

Tolerances (fp32, matmul precision "highest"): loss 1e-5 relative at every step; every state
leaf (parameters, LoRA factors, optimizer state) 1e-5 absolute after 4 steps (each step moves
parameters by up to ~1e-3). The runs differ only in the order of floating-point reductions;
measured: loss <= 1.2e-7 relative, state <= 8.4e-7 (full) and 1.5e-8 (LoRA) absolute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from ftlab.config import ConfigError
from ftlab.methods import build_method
from ftlab.models.bert import Bert
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.models.llama import Llama, LlamaConfig
from ftlab.models.resnet import ResNet
from ftlab.models.vit import ViT
from ftlab.parallel import AXES, check_batch, make_mesh, resolve_shape, rules, shard
from ftlab.schema import base_config
from ftlab.train import optim

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharding_worker.py"
MESHES = ("data8", "fsdp4_data2", "tensor2_data4")
LOSS_RTOL, STATE_ATOL = 1e-5, 1e-5


def _start(devices: int, mode: str, out: Path) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(devices), mode, str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, out: Path, mode: str) -> dict:
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"worker {mode} failed:\n{log[-4000:]}"
    return json.loads((out / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Full and LoRA runs concurrently (8 devices); the restore (4 devices) after the full."""
    out = tmp_path_factory.mktemp("sharding")
    full, lora = _start(8, "full", out), _start(8, "lora", out)
    results = _finish(full, out, "full")
    restore = _start(4, "restore", out)  # needs full's checkpoint; overlaps the LoRA run
    results.update(_finish(lora, out, "lora"))
    results["restore"] = _finish(restore, out, "restore")
    results["continued"] = json.loads((out / "continued.json").read_text())
    return results


# -- sharded training equals single-device training ----------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_training_matches_single_device(runs, method, mesh):
    r = runs[f"{method}/{mesh}"]
    assert r["same_leaves"]
    assert len(r["losses"]) == len(r["ref_losses"]) == 4
    assert r["losses"][-1] < r["losses"][0]  # it trains
    for got, want in zip(r["losses"], r["ref_losses"]):
        assert abs(got - want) <= LOSS_RTOL * abs(want), (got, want)
    assert r["max_abs_diff"] <= STATE_ATOL


def test_weights_are_really_split(runs):
    """c_fc kernel (embed=32, mlp=64): fsdp splits embed by 4, tensor splits mlp by 2."""
    for method in ("full", "lora"):
        assert runs[f"{method}/data8"]["c_fc_kernel_shard"] == [32, 64]
        assert runs[f"{method}/fsdp4_data2"]["c_fc_kernel_shard"] == [8, 64]
        assert runs[f"{method}/tensor2_data4"]["c_fc_kernel_shard"] == [32, 32]


def test_lora_factors_shard_like_their_kernel(runs):
    specs = runs["lora/fsdp4_data2"]["trainable_specs"]
    # q_proj kernel (embed, heads) -> a (embed, rank) on fsdp, b (rank, heads) on tensor (size 1)
    assert specs["lora/h_0/attn/q_proj/kernel/a"] == "('fsdp', None)"
    assert specs["lora/h_0/attn/q_proj/kernel/b"] == "(None, None)"
    specs = runs["lora/tensor2_data4"]["trainable_specs"]
    assert specs["lora/h_1/mlp/c_fc/kernel/a"] == "(None, None)"
    assert specs["lora/h_1/mlp/c_fc/kernel/b"] == "(None, 'tensor')"
    # adam's moments follow their parameters
    assert runs["lora/tensor2_data4"]["opt_mu_specs"] == specs


def test_planner_matches_real_shards(runs):
    for key in (f"{m}/{mesh}" for m in ("full", "lora") for mesh in MESHES):
        r = runs[key]
        assert r["plan_parameters"] == r["real_parameters"], key
        assert r["plan_optimizer"] == r["real_optimizer"], key
    # fsdp=4 keeps about a quarter of the weights per device (biases/norms over embed split too)
    full = runs["full/data8"]["real_parameters"]
    assert runs["full/fsdp4_data2"]["real_parameters"] < full / 3


def test_restore_on_another_mesh(runs):
    r = runs["restore"]
    assert r["saved_on"] == 8 and r["devices"] == 4
    assert r["same_leaves"] and r["bit_equal"]
    assert r["c_fc_kernel_spec"] == "('fsdp', 'tensor')"
    assert r["c_fc_kernel_shard"] == [16, 32]
    # evaluation and training continue as on the 8-device mesh
    before = runs["continued"]
    assert abs(r["next_loss"] - before["next_loss"]) <= LOSS_RTOL * abs(before["next_loss"])
    assert np.allclose(r["eval_loss"], before["eval_loss"], rtol=LOSS_RTOL, atol=0)
    assert len(r["eval_loss"]) == 8 and r["eval_spec"] == "(('data', 'fsdp'),)"


# -- meshes and batches: errors before compiling ------------------------------------------


def test_resolve_shape_fills_the_rest():
    assert resolve_shape({"data": -1}, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert resolve_shape({"fsdp": 4, "data": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert resolve_shape(None, 3) == {"data": 3, "fsdp": 1, "tensor": 1}
    assert resolve_shape({"tensor": 2, "data": 4}, 8)["tensor"] == 2


@pytest.mark.parametrize(
    "shape, devices, words",
    [
        ({"data": -1, "fsdp": 3}, 8, ["config.mesh.shape", "fsdp=3", "multiple of 3", "8"]),
        ({"data": 3, "fsdp": 2}, 8, ["config.mesh.shape", "data=3 x fsdp=2 = 6 devices", "8"]),
        ({"data": -1, "fsdp": -1}, 8, ["only one axis may be -1"]),
        ({"model": 2}, 8, ["unknown mesh axis 'model'", "data, fsdp, tensor"]),
        ({"data": 0}, 8, ["config.mesh.shape.data", "positive integer or -1"]),
    ],
)
def test_bad_mesh_is_a_config_error(shape, devices, words):
    with pytest.raises(ConfigError) as e:
        resolve_shape(shape, devices)
    for word in words:
        assert word in str(e.value)


def test_make_mesh_on_this_process():
    mesh = make_mesh()
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="= 2 devices, but there are 1"):
        make_mesh({"data": 2}, devices=jax.devices()[:1])


def test_batch_must_divide_the_data_axes():
    check_batch(16, {"data": 2, "fsdp": 4, "tensor": 2})
    with pytest.raises(ConfigError) as e:
        check_batch(12, {"data": 2, "fsdp": 4, "tensor": 2})
    msg = str(e.value)
    assert "config.train.batch_size: 12" in msg and "8 batch shards" in msg
    assert "data=2 x fsdp=4" in msg and "multiple of 8" in msg
    with pytest.raises(ConfigError, match="16 / 4 micro-batches = 4 examples .* multiple of 32"):
        check_batch(16, {"data": 8}, accum_steps=4)
    check_batch(64, {"data": 8}, accum_steps=4)


def test_shard_batch_rejects_a_ragged_batch():
    mesh = make_mesh()
    batch = {"inputs": jnp.zeros((3, 2)), "labels": jnp.zeros((3,))}
    placed = shard.shard_batch(batch, shard.batch_sharding(mesh))
    assert placed["inputs"].shape == (3, 2)  # one device: anything divides
    with pytest.raises(ConfigError, match="inputs: leading dimension 3 does not split over the 2"):
        shard.shard_batch(batch, shard.batch_sharding(_mesh(data=2)))  # checked before placing


# -- the rules ----------------------------------------------------------------------------


def _mesh(**sizes) -> AbstractMesh:
    shape = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    return AbstractMesh(tuple(shape.values()), tuple(shape))


def test_mesh_spec_falls_back_when_not_divisible():
    mesh = _mesh(fsdp=4, tensor=2)
    assert shard.mesh_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    assert shard.mesh_spec(("vocab", "embed"), (50257, 1024), mesh) == P(None, "fsdp")
    assert shard.mesh_spec(("embed", "mlp"), (6, 64), mesh) == P(None, "tensor")
    assert shard.mesh_spec(None, (3, 3), mesh) == P()
    # size-1 axes are left out, and a mesh axis is never used twice in one array
    assert shard.mesh_spec(("embed", "mlp"), (32, 64), _mesh(data=8)) == P(None, None)
    assert shard.mesh_spec(("conv_in", "embed"), (8, 8), mesh) == P("fsdp", None)


def _logical_names(model, sample) -> set[str]:
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), sample))
    return {n for axes in shard.logical_axes(boxed).values() if axes for n in axes if n}


def test_every_model_axis_has_a_rule():
    """A new logical name must be added to the one table (lookup raises otherwise)."""
    ids = jnp.zeros((1, 4), jnp.int32)
    image = jnp.zeros((1, 32, 32, 3))
    gpt2 = GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    llama = transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, vocab_size=64, tie_word_embeddings=False,
    )  # fmt: skip
    bert = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=8, num_labels=2,
    )  # fmt: skip
    vit = transformers.ViTConfig(
        image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    resnet = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    names = set()
    names |= _logical_names(GPT2(gpt2, head="classifier"), ids)
    names |= _logical_names(Llama(LlamaConfig.from_hf_config(llama)), ids)
    names |= _logical_names(Bert.from_hf_config(bert), ids)
    names |= _logical_names(ViT.from_hf_config(vit), image)
    names |= _logical_names(ResNet.from_hf_config(resnet), image)
    assert {"vocab", "embed", "heads", "kv_heads", "mlp", "classes", "conv_in"} <= names
    for name in names:
        rules.lookup(name)
    with pytest.raises(KeyError, match="no sharding rule"):
        rules.lookup("experts")


def test_mesh_axes_named_in_rules_exist():
    for _, axes in rules.RULES:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            assert axis in AXES


def _opt_specs(optimizer: str, mesh) -> dict[str, tuple]:
    """``{keystr: (spec, shape)}`` of the optimizer state of a GPT-2 block (shapes only)."""
    model = GPT2(GPT2Config(vocab_size=64, n_positions=8, n_embd=128, n_layer=1, n_head=4))
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    cfg = base_config()
    cfg.optim.name = optimizer
    method = build_method(cfg.method, nn.meta.unbox(variables["params"]))
    tx, _ = optim.optimizer(cfg.optim, 10)
    abstract = shard.abstract_state(shard.init_state_fn(method, tx, 0), variables)
    shardings = shard.state_shardings(abstract, variables, mesh)
    leaves = jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
    shapes = jax.tree.leaves(abstract.opt_state)
    return {jax.tree_util.keystr(p): (s.spec, x.shape) for (p, s), x in zip(leaves, shapes)}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_optimizer_state_follows_the_parameters(optimizer):
    """State of a parameter's shape shares its sharding (adam's moments, momentum, adafactor's
    unfactored v); adafactor's factored row/column statistics and step counts are replicated."""
    opt = _opt_specs(optimizer, _mesh(fsdp=4, tensor=2))
    param = "['params']['h_0']['mlp']['c_fc']"
    kernel = {k: v for k, v in opt.items() if k.endswith(param + "['kernel']")}
    bias = {k: v for k, v in opt.items() if k.endswith(param + "['bias']")}
    expected = {"adamw": 2, "sgd": 1, "adafactor": 3}[optimizer]  # mu+nu, trace, v_row+v_col+v
    assert len(kernel) == len(bias) == expected
    for spec, shape in kernel.values():
        assert (spec, shape) == (P("fsdp", "tensor"), (128, 512)) or (
            optimizer == "adafactor" and spec == P() and shape in {(128,), (512,), (1,)}
        )
    assert (P("tensor"), (512,)) in bias.values()
    assert all(spec == P() for k, (spec, _) in opt.items() if k.endswith(".count"))


def test_resnet_state_shardings_replicate_batch_stats():
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    model = ResNet.from_hf_config(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    method = build_method(base_config().method, nn.meta.unbox(variables["params"]))
    tx, _ = optim.optimizer(base_config().optim, 10)
    abstract = shard.abstract_state(shard.init_state_fn(method, tx, 0), variables)
    shardings = shard.state_shardings(abstract, variables, _mesh(fsdp=2, tensor=2))
    stats = jax.tree.leaves(shardings.model_state)
    assert stats and all(s.spec == P() for s in stats)  # BatchNorm statistics: unannotated
    specs = {s.spec for s in jax.tree.leaves(shardings.trainable)}
    assert P(None, None, "fsdp", "tensor") in specs  # conv kernels (h, w, in, out)
