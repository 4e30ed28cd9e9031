"""QLoRA parameter bytes for LLaMA-7B as XLA allocates them (issue 13, part 1).

    python experiments/qlora_memory.py [--out experiments/results]

No weight is materialised: the model's parameters are ``jax.eval_shape`` structs (LLaMA-7B's
shapes from the planner's table of hub models, ``ftlab.plan.KNOWN_MODELS``), the method splits
them under ``jax.eval_shape`` (so the quantised leaves are the structs ``Method.split`` would
store), and each tree is passed to a jitted function compiled on this CPU
(``keep_unused=True``) whose ``memory_analysis().argument_size_in_bytes`` is the bytes XLA
allocates for it. That counts a packed NF4 byte once for two weights, unlike ``.nbytes`` of
``jnp.uint4`` arrays (one byte per 4-bit value in numpy), which is also shown for contrast.

Writes ``qlora_memory.json`` and ``qlora_memory.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab import plan, tree
from ftlab.config import override_copy
from ftlab.methods import build_method
from ftlab.train.loop import prepare

ROOT = Path(__file__).resolve().parents[1]


def alpaca_config():
    spec = importlib.util.spec_from_file_location("alpaca", ROOT / "configs/alpaca_lora_llama7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def xla_bytes(abstract) -> int:
    """Bytes XLA allocates for ``abstract`` as the arguments of a compiled function."""
    leaves = jax.tree.leaves(abstract)
    fn = jax.jit(lambda *xs: jnp.zeros((), jnp.float32), keep_unused=True)
    return int(fn.lower(*leaves).compile().memory_analysis().argument_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()
    start = time.time()
    base = alpaca_config()
    cfg = plan.shapes_config(
        override_copy(
            base,
            {
                "train.compute_dtype": "bfloat16",
                "method.frozen_dtype": "bfloat16",
                "train.num_steps": 101,
            },
        )
    )
    data = plan.synthetic_data(cfg)
    _, model, _ = prepare(cfg, devices=1, data=data)
    variables = jax.eval_shape(model.init, jax.random.key(0), data.train.sample_inputs())
    params = nn.meta.unbox(variables["params"])
    n_params = tree.count(params)
    rows = []
    variants = [
        (
            "float32 (LoRA, frozen float32)",
            {"method.name": "lora", "method.frozen_dtype": "float32"},
        ),
        ("bfloat16 (LoRA, frozen bf16)", {"method.name": "lora"}),
        ("int8 (LoRA + method.quantize=int8)", {"method.name": "lora", "method.quantize": "int8"}),
        ("nf4 (qlora)", {"method.name": "qlora"}),
        (
            "nf4 (qlora, lm_head quantised too)",
            {"method.name": "qlora", "method.quantize_skip": ()},
        ),
    ]
    for label, overrides in variants:
        c = override_copy(cfg, overrides)
        method = build_method(c.method, params, backend="tpu")
        trainable, frozen = jax.eval_shape(
            lambda p, m=method: m.split(p, jax.random.key(0)), params
        )
        flat = tree.flatten(frozen)
        quantized = {p: flat[p] for p in method.quantized}
        q_params = int(sum(np.prod(v.shape) for v in quantized.values()))
        row = {
            "variant": label,
            "frozen_params": tree.count(frozen),
            "frozen_bytes_xla": xla_bytes(frozen),
            "trainable_params": tree.count(trainable),
            "quantized_kernels": len(quantized),
            "quantized_params": q_params,
            "quantized_bytes_xla": xla_bytes(quantized) if quantized else 0,
        }
        row["bytes_per_param_frozen"] = row["frozen_bytes_xla"] / row["frozen_params"]
        if q_params:
            row["bytes_per_param_quantized_kernels"] = row["quantized_bytes_xla"] / q_params
        rows.append(row)
        print(json.dumps(row))

    # contrast: the same NF4 kernels as qwix's own uint4 storage (XLA packs 4-bit dtypes; numpy's
    # itemsize, which ``.nbytes`` uses, is one byte per 4-bit value)
    kernel = jax.ShapeDtypeStruct((4096, 11008), jnp.uint4)
    uint4 = {
        "shape": list(kernel.shape),
        "xla_bytes": xla_bytes(kernel),
        "nbytes_numpy_itemsize": int(np.prod(kernel.shape) * np.dtype(kernel.dtype).itemsize),
    }
    nf4 = next(r for r in rows if r["variant"] == "nf4 (qlora)")
    result = {
        "model": "huggyllama/llama-7b (shapes)",
        "total_params": n_params,
        "rows": rows,
        "uint4_contrast": uint4,
        "expected_nf4_bytes_per_param": 0.5 + 4 / 64,
        "seconds": time.time() - start,
        "jax": jax.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qlora_memory.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# QLoRA parameter bytes, LLaMA-7B (XLA's memory analysis of the frozen tree)",
        "",
        (
            f"{n_params:,} parameters; shapes only (`jax.eval_shape`), compiled on CPU, "
            f"jax {jax.__version__}; `experiments/qlora_memory.py`."
        ),
        "",
        "| frozen base | frozen params | XLA bytes | bytes / param | quantised kernels | bytes / param (quantised kernels) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_q = r.get("bytes_per_param_quantized_kernels")
        lines.append(
            f"| {r['variant']} | {r['frozen_params']:,} | {r['frozen_bytes_xla']:,} | "
            f"{r['bytes_per_param_frozen']:.4f} | {r['quantized_kernels']} "
            f"({r['quantized_params']:,} params) | {'' if per_q is None else f'{per_q:.4f}'} |"
        )
    lines += [
        "",
        (
            f"NF4 kernels: {nf4['bytes_per_param_quantized_kernels']:.4f} bytes per weight as "
            "XLA allocates them (4-bit codes packed two per byte + one float32 absmax per block "
            "of 64: 0.5 + 0.0625 = 0.5625; no double quantisation). The whole frozen base is "
            "above that because the token embedding and `lm_head` stay bfloat16 "
            "(`method.quantize_skip`, as transformers' 4-bit loading keeps `lm_head`), and "
            "norms are bfloat16."
        ),
        "",
        (
            f"For contrast, a `jnp.uint4` array of shape {tuple(uint4['shape'])}: XLA "
            f"allocates {uint4['xla_bytes']:,} bytes, while numpy's itemsize (`.nbytes`) says "
            f"{uint4['nbytes_numpy_itemsize']:,}."
        ),
        "",
    ]
    (out / "qlora_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
