"""Every recipe planned for every topology the README names: per-device memory from real AOT
compiles (``ftlab.plan``), written to ``experiments/results/plan_targets.{json,md}``.

    JAX_PLATFORMS=cpu python experiments/plan_targets.py [--targets tpu-v5e-1,...] [--only NAME]

TPU targets compile through libtpu's compile-only devices on any machine
(``pip install -e ".[tpu-plan]"``); GPU targets through the CUDA plugin when it is installed
(else they are planned from shapes: no activations). ``LAUNCH`` is what the README's launch
commands add to a recipe on a topology (tests/test_plan_targets.py checks that every recipe is
then valid on every README topology).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# (label, config spec, variant or None)
RECIPES = (
    ("bert_sst2", "bert_sst2.py", None),
    ("vit_cifar10 linear_probe", "vit_cifar10.py", "linear_probe"),
    ("vit_cifar10 full", "vit_cifar10.py", "full"),
    ("resnet50_cifar10 linear_probe", "resnet50_cifar10.py", "linear_probe"),
    ("resnet50_cifar10 full", "resnet50_cifar10.py", "full"),
    ("gpt2_e2e:lora", "gpt2_e2e.py:lora", None),
    ("gpt2_e2e:full", "gpt2_e2e.py:full", None),
    ("gpt2_e2e:top2", "gpt2_e2e.py:top2", None),
    ("alpaca_lora_llama7b", "alpaca_lora_llama7b.py", None),
)

# what the README's launch commands add on a topology with more batch shards than the
# recipe's (micro-)batch has examples: {config file: {devices: overrides}}
POD = {"mesh.shape.fsdp": -1, "mesh.shape.data": 1}
# 128 = 32 micro-batches of 4 on one device; 8 micro-batches of 16 over 8 or 16 fsdp shards
ALPACA_POD = {**POD, "optim.accum_steps": 8, "train.eval_batch_size": 16}
LAUNCH: dict[str, dict[int, dict]] = {
    "alpaca_lora_llama7b.py": {8: ALPACA_POD, 16: ALPACA_POD},
    # a batch of 8 over 16 devices: 8 batch shards x tensor 2
    "gpt2_e2e.py": {16: {"mesh.shape.tensor": 2}},
}


def launch_overrides(spec: str, devices: int) -> dict:
    return LAUNCH.get(spec.split(":")[0], {}).get(devices, {})


def recipe_config(spec: str, variant: str | None, devices: int):
    from ftlab import plan
    from ftlab.config import load_config, override_copy

    cfg = load_config(str(CONFIGS / spec))
    cfg = override_copy(cfg, launch_overrides(spec, devices))
    runs = dict(plan.runs(cfg, variant))
    return runs[variant or ""]


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def markdown(data: dict, targets: list[str]) -> str:
    """Recipes x targets: the compiled per-device peak in GiB (and whether it fits)."""
    by = {(r["recipe"], r["target"]): r for r in data["results"]}
    lines = [
        "| recipe | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for label, _, _ in RECIPES:
        cells = []
        for t in targets:
            r = by.get((label, t))
            if r is None:
                cells.append("not compiled")
            elif "error" in r:
                cells.append("invalid")
            elif r.get("compiled") is None:
                cells.append(f"{_gib(r['peak'])}+ (shapes)")
            else:
                cells.append(f"{_gib(r['peak'])}{'' if r['fits'] else ' (does not fit)'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    detail = [
        "",
        (
            "| recipe | target | mesh | parameters | optimizer | activations | peak | "
            "memory | TFLOP/step | compile s | overrides |"
        ),
        "|---" * 11 + "|",
    ]
    for r in data["results"]:
        if "error" in r:
            detail.append(f"| {r['recipe']} | {r['target']} | error: {r['error']} |" + " |" * 8)
            continue
        mesh = "x".join(str(v) for v in r["mesh"].values())
        flops = "-" if not r.get("flops") else f"{r['flops'] / 1e12:.1f}"
        over = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        detail.append(
            f"| {r['recipe']} | {r['target']} | {mesh} | {_gib(r['parameters'])} | "
            f"{_gib(r['optimizer'])} | {_gib(r['activations'])} | {_gib(r['peak'])} | "
            f"{_gib(r['memory'])} | {flops} | {r.get('compile_s') or '-'} | {over} |"
        )
    return "\n".join(lines + detail) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--targets",
        default="tpu-v5e-1,tpu-v6e-1,tpu-v5e-8,tpu-v4-32,gpu-a100-80gb,gpu-h100x8",
    )
    ap.add_argument("--only", help="comma-separated recipe labels")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "plan_targets"))
    ap.add_argument("--markdown", action="store_true", help="only write the .md from the .json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.markdown:
        data = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(markdown(data, args.targets.split(",")))
        return 0

    import jax

    from ftlab import plan
    from ftlab.config import ConfigError

    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text())["results"] if path.exists() else []
    done = {(r["recipe"], r["target"]) for r in results}
    only = set(args.only.split(",")) if args.only else None
    for target in args.targets.split(","):
        tgt = plan.get_target(target)
        for label, spec, variant in RECIPES:
            if (only and label not in only) or (label, target) in done:
                continue
            row = {
                "recipe": label,
                "target": target,
                "devices": tgt.devices,
                "overrides": launch_overrides(spec, tgt.devices),
            }
            start = time.perf_counter()
            try:
                cfg = recipe_config(spec, variant, tgt.devices)
                try:
                    p = plan.plan_config(cfg, target=tgt)
                except plan.PlannerSetupError as e:  # no compiler for it here: shapes only
                    row["note"] = str(e).split(":")[0]
                    p = plan.plan_config(cfg, target=tgt, compile=False)
                row.update(
                    mesh=p.mesh,
                    parameters=p.parameters,
                    trainable=p.trainable,
                    optimizer=p.optimizer,
                    batch=p.batch,
                    activations=p.activations,
                    compiled=p.compiled,
                    peak=p.total,
                    flops=p.flops,
                    compile_s=None if p.compile_s is None else round(p.compile_s, 1),
                    memory=tgt.memory,
                    fits=p.fits(tgt.memory) if p.compiled else None,
                )
            except ConfigError as e:
                row["error"] = str(e)
            row["wall_s"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            results.append(row)
            meta = {
                "jax": jax.__version__,
                "host": platform.node(),
                "python": sys.version.split()[0],
            }
            try:
                import libtpu

                meta["libtpu"] = getattr(libtpu, "__version__", "?")
            except ImportError:
                pass
            path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
