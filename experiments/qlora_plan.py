"""LLaMA-7B QLoRA at the Alpaca recipe's shape, planned for one 16 GiB TPU v5e chip (issue 13).

    python experiments/qlora_plan.py --layers 2 4 [--full-log FILE] [--out experiments/results]

``configs/alpaca_lora_llama7b.py`` with ``method.name = "qlora"`` (NF4 base, LoRA r=8 on q/v,
micro-batch 4 x 256 tokens, 32 accumulation steps, remat) compiled ahead of time for
``tpu-v5e-1`` through libtpu on this CPU (``ftlab.plan.plan_config``, the planner
``ftlab plan --target`` runs). The whole 32-layer model's compile is slow on a shared 2-core
machine (the 8-chip plan of the same recipe took 28 min), so this script compiles the model
at LLaMA-7B's width with ``--layers`` blocks and fits peak = a + b x layers through the points
(every block is the same, so the step's memory is affine in the block count), extrapolated
to 32; ``--full-log`` adds the output of a full ``ftlab plan ... --target tpu-v5e-1`` run when
one finished. Writes ``qlora_plan.json`` and ``qlora_plan.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from pathlib import Path

import jax

jax.config.update("jax_platforms", "cpu")  # compile-only TPU devices: no local TPU backend

from ftlab import plan
from ftlab.config import override_copy

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def alpaca(layers: int | None, host: bool = False):
    spec = importlib.util.spec_from_file_location("alpaca", ROOT / "configs/alpaca_lora_llama7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    overrides = {"method.name": "qlora"}
    if host:  # what "auto" resolves to on a TPU, so the CPU compile has the TPU's dtypes
        overrides.update({"train.compute_dtype": "bfloat16", "method.frozen_dtype": "bfloat16"})
    cfg = override_copy(module.get_config(), overrides)
    if layers:
        cfg = plan.shapes_config(cfg)
        with cfg.unlocked():
            cfg.model.hf_config = {**cfg.model.hf_config.to_dict(), "num_hidden_layers": layers}
    return cfg


def one(layers: int, target: str) -> dict:
    start = time.time()
    host = target == "host"
    p = plan.plan_config(alpaca(layers, host), target=None if host else target)
    return {
        "layers": layers,
        "parameters": p.parameters,
        "trainable": p.trainable,
        "optimizer": p.optimizer,
        "compiled": p.compiled,
        "peak": p.total,
        "flops": p.flops,
        "compile_s": time.time() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--full-log", default="")
    ap.add_argument("--target", default="tpu-v5e-1", help="tpu-v5e-1, or host (this CPU)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "qlora_plan.json"
    result = json.loads(path.read_text()) if path.exists() else {"points": []}
    done = {pt["layers"] for pt in result["points"]}
    for layers in args.layers:
        if layers in done:
            continue
        point = {**one(layers, args.target), "target": args.target}
        print(json.dumps(point))
        result["points"].append(point)
        result["points"].sort(key=lambda pt: pt["layers"])
        path.write_text(json.dumps(result, indent=2))
    pts = result["points"]
    if len(pts) >= 2:
        (l0, p0), (l1, p1) = (
            (pts[0]["layers"], pts[0]["peak"]),
            (pts[-1]["layers"], pts[-1]["peak"]),
        )
        per_layer = (p1 - p0) / (l1 - l0)
        result["fit"] = {
            "per_layer_bytes": per_layer,
            "base_bytes": p0 - per_layer * l0,
            "peak_32_layers": p0 + per_layer * (32 - l0),
        }
    if args.full_log and Path(args.full_log).exists():
        text = Path(args.full_log).read_text()
        m = re.search(r"total \(peak\)\s+([0-9.,]+) GiB", text)
        result["full_32_layers"] = {
            "log": text,
            "peak_gib": float(m.group(1).replace(",", "")) if m else None,
        }
    path.write_text(json.dumps(result, indent=2))
    lines = [
        "# LLaMA-7B QLoRA (NF4) at the Alpaca recipe's shape, planned for tpu-v5e-1 (16 GiB)",
        "",
        (
            "`configs/alpaca_lora_llama7b.py --config.method.name=qlora`: LLaMA-7B widths, "
            "NF4 base (lm_head and embeddings bf16), LoRA r=8 on q/v, micro-batch 4 x 256 "
            "tokens (32 accumulation steps), remat, bf16 compute; compiled ahead of time for "
            "one v5e chip through libtpu on a 2-core CPU (`experiments/qlora_plan.py`)."
        ),
        "",
        "| layers | parameters GiB | peak GiB (XLA: args + out - alias + temp) | compile s |",
        "|---|---|---|---|",
    ]
    for pt in pts:
        lines.append(
            f"| {pt['layers']} | {pt['parameters'] / GiB:.2f} | {pt['peak'] / GiB:.2f} | "
            f"{pt['compile_s']:.0f} |"
        )
    if "fit" in result:
        f = result["fit"]
        lines += [
            "",
            (
                f"Affine in the block count: {f['per_layer_bytes'] / GiB:.3f} GiB per block + "
                f"{f['base_bytes'] / GiB:.2f} GiB; extrapolated to LLaMA-7B's 32 blocks: "
                f"**{f['peak_32_layers'] / GiB:.2f} GiB peak**, against the chip's 16 GiB."
            ),
        ]
    full = result.get("full_32_layers")
    if full and full["peak_gib"] is not None:
        lines += ["", f"Full 32-block compile: **{full['peak_gib']:.2f} GiB peak**.", ""]
        lines += ["```", full["log"].strip(), "```"]
    lines.append("")
    (out / "qlora_plan.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
