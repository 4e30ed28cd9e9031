"""QLoRA (NF4 base) trained sharded on 8 fake CPU devices equals one device; its checkpoint
restores bit-exactly onto another mesh (issue 13, part 1; run by hand, ~1-2 min on 2 cores).

    python experiments/qlora_sharding_check.py [OUT_DIR]

Reuses ``tests/sharding_worker.py``'s tiny GPT-2 (2 layers, width 32, LoRA on q, v, c_fc) with
``method.name = "qlora"``: 4 adamw steps on one device, then on data=8, fsdp=4 x data=2 and
tensor=2 x data=4; reports the loss and state differences and the shards of the quantised
c_fc kernel; saves the fsdp run with Orbax and restores it onto tensor=2 x fsdp=2. Writes
``qlora_sharding.json`` into OUT_DIR (default experiments/results).
"""

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "experiments" / "results")
sys.argv = [sys.argv[0], "8", "qlora", str(OUT)]  # the worker reads DEVICES MODE OUT
sys.path.insert(0, str(ROOT))
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np

from ftlab import checkpoint
from ftlab.parallel import make_mesh, shard
from tests import sharding_worker as w


def main() -> None:
    data = w.batches()
    variables, step, _, init, params = w.setup("qlora")
    with jax.default_matmul_precision("highest"):
        init_state = jax.device_get(jax.jit(init)(params, {}))
        ref_state, ref_losses = w.run(jax.jit(step, donate_argnums=0), init_state, data)
    ref = w.flat_state(ref_state)
    abstract = shard.abstract_state(init, variables)
    out = {"ref_losses": ref_losses}
    saved = None
    ckpt_dir = Path(tempfile.mkdtemp(prefix="qlora_ckpt_"))
    for name, shape in w.MESHES.items():
        mesh = make_mesh(shape)
        shardings = shard.state_shardings(abstract, variables, mesh)
        bsh = shard.batch_sharding(mesh)
        with jax.default_matmul_precision("highest"):
            state = jax.jit(init, out_shardings=shardings)(params, {})
            step_fn = shard.jit_train_step(step, shardings, bsh)
            state, losses = w.run(step_fn, state, [shard.shard_batch(b, bsh) for b in data])
        got = w.flat_state(state)
        kernel = state.frozen["h_0"]["mlp"]["c_fc"]["kernel"]
        out[name] = {
            "losses": losses,
            "max_loss_rel_diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "max_abs_state_diff": max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref),
            "same_leaves": sorted(got) == sorted(ref),
            "frozen_bit_equal": all(
                np.array_equal(got[k], ref[k]) for k in ref if k.startswith(".frozen")
            ),
            "c_fc_qvalue": [list(kernel.qvalue.shape), str(tuple(kernel.qvalue.sharding.spec))],
            "c_fc_qvalue_shard": list(kernel.qvalue.addressable_shards[0].data.shape),
            "c_fc_scale": [list(kernel.scale.shape), str(tuple(kernel.scale.sharding.spec))],
        }
        if name == "fsdp4_data2":
            saved = got
            with checkpoint.Checkpoints(ckpt_dir, save_every=1, async_save=False) as c:
                c.save(int(state.step), state, {}, force=True)
        print(name, json.dumps(out[name]))
    mesh = make_mesh({"tensor": 2, "fsdp": 2}, devices=jax.devices()[:4])
    target = shard.with_shardings(abstract, shard.state_shardings(abstract, variables, mesh))
    with checkpoint.Checkpoints(ckpt_dir, save_every=1) as c:
        restored, _ = c.restore(target)
    got = w.flat_state(restored)
    out["restore_tensor2_fsdp2_bit_equal"] = all(np.array_equal(got[k], saved[k]) for k in saved)
    print("restore", out["restore_tensor2_fsdp2_bit_equal"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "qlora_sharding.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
