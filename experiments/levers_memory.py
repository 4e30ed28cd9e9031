"""Compile-time memory of the train step with each lever on and off, one at a time (CPU).

Nothing is allocated: shapes come from ``jax.eval_shape`` and each variant is lowered and
compiled ahead of time; ``compiled.memory_analysis()`` gives XLA:CPU's byte counts (arguments,
outputs, aliased (donated) and temporaries). Results go to
``experiments/results/levers_cpu.json``; ``experiments/results/NOTES.md`` reads them.

    python experiments/levers_memory.py [--layers 6] [--batch 4] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc

from ftlab.methods import build_method
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.parallel import shard
from ftlab.schema import base_config
from ftlab.train import losses, optim
from ftlab.train.loop import use_fast_cpu_rng
from ftlab.train.step import make_train_step, training_loss

MiB = 2**20


def measure(args, *, method="lora", chunk=0, remat="none", attention="auto", frozen="float32",
            state_dtype="float32", compute="float32"):  # fmt: skip
    config = GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=args.width, n_layer=args.layers,
        n_head=args.width // 64, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
    )  # fmt: skip
    model = GPT2(config, dtype=jnp.dtype(compute), remat=remat, attention_impl=attention)
    ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids))["params"]
    mcfg = base_config().method
    mcfg.unlock()
    mcfg.name, mcfg.frozen_dtype = method, frozen
    mcfg.lora.rank, mcfg.lora.alpha, mcfg.lora.targets = 4, 32.0, (r"attn/(q|v)_proj/kernel",)
    m = build_method(mcfg, shapes)
    ocfg = base_config().optim
    ocfg.unlock()
    ocfg.state_dtype = state_dtype
    tx, lr = optim.optimizer(ocfg, 100)
    init = shard.init_state_fn(m, tx, 0)
    state = jax.eval_shape(init, shapes, {})
    tcfg = mc.ConfigDict({"loss_chunk": chunk, "label_smoothing": 0.0})
    loss, kwargs = training_loss(tcfg, m, losses.per_example_loss("causal_lm"))
    step = make_train_step(model, m, tx, lr, loss, model_kwargs=kwargs)
    batch = {
        "inputs": {"input_ids": ids, "attention_mask": ids},
        "labels": ids,
        "weights": jax.ShapeDtypeStruct((args.batch,), jnp.float32),
    }
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))
    row = {
        "method": method, "loss_chunk": chunk, "remat": remat, "attention": attention,
        "frozen_dtype": frozen, "state_dtype": state_dtype, "compute_dtype": compute,
        "frozen_MiB": nbytes(state.frozen) / MiB, "trainable_MiB": nbytes(state.trainable) / MiB,
        "opt_state_MiB": nbytes(state.opt_state) / MiB,
        "argument_MiB": mem.argument_size_in_bytes / MiB, "output_MiB": mem.output_size_in_bytes / MiB,
        "alias_MiB": mem.alias_size_in_bytes / MiB, "temp_MiB": mem.temp_size_in_bytes / MiB,
        "compile_s": seconds,
    }  # fmt: skip
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--out", default="experiments/results/levers_cpu.json")
    args = p.parse_args()
    use_fast_cpu_rng()
    rows = [
        measure(args),  # plain LoRA step: the baseline of every row below
        measure(args, chunk=128),
        measure(args, frozen="bfloat16"),
        measure(args, attention="naive"),
        measure(args, remat="dots"),
        measure(args, remat="full"),
        measure(args, method="full"),
        measure(args, method="full", state_dtype="bfloat16"),
        # bfloat16 compute, as train.compute_dtype = "auto" picks on GPU/TPU
        measure(args, compute="bfloat16"),
        measure(args, compute="bfloat16", frozen="bfloat16"),
        # every lever at once
        measure(args, compute="bfloat16", frozen="bfloat16", chunk=128, remat="dots"),
    ]
    out = {
        "model": f"GPT-2 shape: {args.layers} layers, width {args.width}, vocab 50257",
        "batch": f"{args.batch} x {args.seq}",
        "lora": "r=4 on attn q_proj, v_proj",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
