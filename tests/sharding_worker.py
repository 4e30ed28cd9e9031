"""Multi-device checks run in a subprocess by ``tests/test_sharding.py``.

``python tests/sharding_worker.py DEVICES MODE OUTDIR``: fakes DEVICES CPU devices (the flag
must be set before jax is imported, hence a separate process) and writes OUTDIR/MODE.json.

- ``full`` / ``lora`` (8 devices): a tiny GPT-2 fine-tuned with that method for a few steps on
  one device and on several meshes; reports loss and state differences, the shardings used
  and the planner's per-device bytes next to the real shards; ``full`` then saves its fsdp
  run's state with Orbax, evaluates it and takes one more step (``continued.json``).
- ``restore`` (4 devices): restores that checkpoint onto a 4-device mesh, compares the values,
  then evaluates and steps as ``full`` did.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

DEVICES, MODE, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"

import flax.linen as nn
import jax
import numpy as np

from ftlab import checkpoint, tree
from ftlab.methods import build_method
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.parallel import make_mesh, shard
from ftlab.plan import plan_step
from ftlab.schema import base_config
from ftlab.train import optim
from ftlab.train.losses import cross_entropy
from ftlab.train.step import make_eval_step, make_train_step

jax.config.update("jax_threefry_partitionable", False)  # as the trainer on CPU
assert jax.device_count() == DEVICES, jax.devices()

STEPS, BATCH, LENGTH = 4, 8, 8
MESHES = {
    "data8": {"data": 8},
    "fsdp4_data2": {"fsdp": 4, "data": 2},
    "tensor2_data4": {"tensor": 2, "data": 4},
}
CONFIG = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, n_inner=64)


def lm_loss(logits, batch):
    """Per-example mean next-token cross-entropy."""
    return cross_entropy(logits[:, :-1], batch["labels"][:, 1:]).mean(-1)


def setup(method_name: str):
    # full: dropout 0.1 everywhere (the masks must not depend on the mesh); LoRA: dropout off,
    # which saves compile time (the LoRA branch has its own dropout, tested elsewhere)
    drop = 0.1 if method_name == "full" else 0.0
    model = GPT2(dataclasses.replace(CONFIG, embd_pdrop=drop, attn_pdrop=drop, resid_pdrop=drop))
    ids = np.zeros((1, LENGTH), np.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), ids)
    cfg = base_config()
    cfg.method.name = method_name
    cfg.method.lora.targets = (r"attn/(q|v)_proj/kernel", r"mlp/c_fc/kernel")
    method = build_method(cfg.method, nn.meta.unbox(variables["params"]))
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 1e-3, 1, 0.01
    tx, lr = optim.optimizer(cfg.optim, STEPS)
    step = make_train_step(model, method, tx, lr, lm_loss)
    evaluate = make_eval_step(model, method, lm_loss)
    init = shard.init_state_fn(method, tx, seed=0)
    # on the host: a jitted function may return its input buffers, which donation would delete
    params = jax.device_get(nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"]))
    return variables, step, evaluate, init, params


def batches():
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 64, (BATCH, LENGTH)).astype(np.int32) for _ in range(STEPS)]
    return [{"inputs": x, "labels": x} for x in ids]


def flat_state(state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def run(step_fn, state, data):
    losses = []
    for batch in data:
        state, metrics = step_fn(state, batch)
        losses.append(float(jax.device_get(metrics["loss"])))  # block every step
    return state, losses


def specs(shardings) -> dict[str, str]:
    flat = tree.flatten(jax.tree.map(lambda s: str(tuple(s.spec)), shardings))
    return flat


def train_mode(method_name: str) -> dict:
    out = {}
    data = batches()
    variables, step, evaluate, init, params = setup(method_name)
    with jax.default_matmul_precision("highest"):
        init_state = jax.device_get(jax.jit(init)(params, {}))
        ref_state, ref_losses = run(jax.jit(step, donate_argnums=0), init_state, data)
    ref = flat_state(ref_state)
    abstract = shard.abstract_state(init, variables)
    for name, shape in MESHES.items():
        mesh = make_mesh(shape)
        shardings = shard.state_shardings(abstract, variables, mesh)
        bsh = shard.batch_sharding(mesh)
        with jax.default_matmul_precision("highest"):
            if name == "fsdp4_data2":  # created sharded, as the trainer should
                state = jax.jit(init, out_shardings=shardings)(params, {})
            else:  # the same values placed (saves a compilation)
                state = jax.device_put(init_state, shardings)
            step_fn = shard.jit_train_step(step, shardings, bsh)
            state, losses = run(step_fn, state, [shard.shard_batch(b, bsh) for b in data])
        got = flat_state(state)
        kernel = state.frozen if method_name == "lora" else state.trainable["params"]
        kernel = kernel["h_0"]["mlp"]["c_fc"]["kernel"]
        plan = plan_step(
            step,
            shard.with_shardings(abstract, shardings),
            shard.abstract_batch(data[0], bsh),
            compile=False,
        )
        params_leaves = jax.tree.leaves((state.trainable, state.frozen))
        out[f"{method_name}/{name}"] = {
            "ref_losses": ref_losses,
            "losses": losses,
            "max_abs_diff": max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref),
            "same_leaves": sorted(got) == sorted(ref),
            "c_fc_kernel_shard": list(kernel.addressable_shards[0].data.shape),
            "c_fc_kernel_shape": list(kernel.shape),
            "trainable_specs": specs(shardings.trainable),
            "opt_mu_specs": specs(shardings.opt_state[1][0].mu),
            "plan_parameters": plan.parameters,
            "real_parameters": sum(x.addressable_shards[0].data.nbytes for x in params_leaves),
            "plan_optimizer": plan.optimizer,
            "real_optimizer": sum(
                x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state.opt_state)
            ),
        }
        if method_name == "full" and name == "fsdp4_data2":
            eval_fn = shard.jit_eval_step(evaluate, shardings, bsh)
            save_for_restore(state, step_fn, eval_fn, shard.shard_batch(data[0], bsh))
    return out


def continue_from(state, step_fn, eval_fn, batch) -> dict:
    """Per-example eval losses, then the next step's loss (the step donates ``state``)."""
    with jax.default_matmul_precision("highest"):
        out = eval_fn(state, batch)
        result = {
            "eval_loss": np.asarray(jax.device_get(out["loss"])).tolist(),
            "eval_spec": str(tuple(out["loss"].sharding.spec)),
        }
        _, metrics = step_fn(state, batch)
    return {**result, "next_loss": float(jax.device_get(metrics["loss"]))}


def save_for_restore(state, step_fn, eval_fn, batch) -> None:
    np.savez(os.path.join(OUT, "saved.npz"), **flat_state(state))
    with checkpoint.Checkpoints(os.path.join(OUT, "ckpt"), save_every=1, async_save=False) as c:
        c.save(int(state.step), state, {"devices": DEVICES}, force=True)
    with open(os.path.join(OUT, "continued.json"), "w") as f:
        json.dump(continue_from(state, step_fn, eval_fn, batch), f)


def restore_mode() -> dict:
    variables, step, evaluate, init, _ = setup("full")
    mesh = make_mesh({"tensor": 2, "fsdp": 2})
    abstract = shard.abstract_state(init, variables)
    shardings = shard.state_shardings(abstract, variables, mesh)
    target = shard.with_shardings(abstract, shardings)
    with checkpoint.Checkpoints(os.path.join(OUT, "ckpt"), save_every=1) as c:
        state, meta = c.restore(target)
    saved = dict(np.load(os.path.join(OUT, "saved.npz")))
    got = flat_state(state)
    kernel = state.trainable["params"]["h_0"]["mlp"]["c_fc"]["kernel"]
    result = {
        "saved_on": meta["devices"],
        "same_leaves": sorted(got) == sorted(saved),
        "bit_equal": all(np.array_equal(got[k], saved[k]) for k in saved),
        "devices": len(kernel.sharding.device_set),
        "c_fc_kernel_spec": str(tuple(kernel.sharding.spec)),
        "c_fc_kernel_shard": list(kernel.addressable_shards[0].data.shape),
    }
    bsh = shard.batch_sharding(mesh)
    step_fn = shard.jit_train_step(step, shardings, bsh)
    eval_fn = shard.jit_eval_step(evaluate, shardings, bsh)
    return {
        **result,
        **continue_from(state, step_fn, eval_fn, shard.shard_batch(batches()[0], bsh)),
    }


if __name__ == "__main__":
    result = restore_mode() if MODE == "restore" else train_mode(MODE)
    with open(os.path.join(OUT, f"{MODE}.json"), "w") as f:
        json.dump(result, f, indent=1)
