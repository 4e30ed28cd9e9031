"""Do transformers and peft load what ftlab exports? A script in two halves.

    python experiments/check_peft_in_torch.py export --workdir /tmp/peft_check
    /tmp/torchvenv/bin/python experiments/check_peft_in_torch.py check --workdir /tmp/peft_check \
        --results experiments/results/peft_and_hf_export_in_torch

``export`` (ftlab, JAX): on the tiny GPT-2 and LLaMA fixtures, trains a small LoRA for a few
Adam steps (so ``b`` is far from its zero start), then writes per case the merged model as a
Hugging Face directory (``export_hf``), the adapter in PEFT's format (``export_method_adapter``)
and ftlab's logits (adapter unmerged, merged, and the base model's) to ``ftlab.npz``.

``check`` (PyTorch): loads (a) the merged directory with ``AutoModelFor...from_pretrained`` and
(b) the base fixture plus the adapter with ``peft.PeftModel.from_pretrained`` (and (c) that
model after ``merge_and_unload``), compares their logits with ftlab's (real tokens only) and
checks that PEFT's state dict of the loaded adapter equals the file ftlab wrote. Prints a table
and writes ``results.json``.

Cases: ``gpt2_lm`` (LoRA on q, v and h_1's c_fc: a block-structured, padded c_attn adapter),
``llama_lm`` (rsLoRA on q, k, v, o with grouped-query attention), ``gpt2_cls`` (3-label
classifier: LoRA on q, v and a fully trained new ``score`` head saved as ``modules_to_save``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CASES = {
    "gpt2_lm": {
        "base": "tiny_gpt2",
        "head": "lm",
        "targets": (r"attn/(q|v)_proj/kernel", r"h_1/mlp/c_fc/kernel"),
        "rslora": False,
    },
    "llama_lm": {
        "base": "tiny_llama",
        "head": "lm",
        "targets": (r"self_attn/(q|k|v|o)_proj/kernel",),
        "rslora": True,
    },
    "gpt2_cls": {
        "base": "tiny_gpt2",
        "head": "classifier",
        "targets": (r"attn/(q|v)_proj/kernel",),
        "rslora": False,
    },
}
STEPS, LR, RANK, ALPHA = 8, 3e-2, 2, 8.0
TOL = 1e-4


# -- half 1: ftlab ---------------------------------------------------------------------------


def export(workdir: pathlib.Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from ftlab.interop.peft import export_method_adapter
    from ftlab.interop.pretrained import export_hf, load_pretrained
    from ftlab.methods import build_method
    from ftlab.schema import base_config

    workdir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, case in CASES.items():
        p = load_pretrained(FIXTURES / case["base"], head=case["head"])
        with np.load(FIXTURES / case["base"] / "inputs_logits.npz") as d:
            batch = {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"]}
        cfg = base_config().method
        cfg.name = "lora"
        cfg.lora.targets = case["targets"]
        cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora = RANK, ALPHA, case["rslora"]
        if case["head"] == "classifier":
            cfg.trainable = (r"^score/",)
        method = build_method(cfg, p.params)
        trainable, frozen = method.split(p.params, jax.random.key(0))
        labels = jnp.array([0, 2])

        def loss_fn(
            tr,
            method=method,
            model=p.model,
            frozen=frozen,
            batch=batch,
            head=case["head"],
            labels=labels,
        ):
            logits = method.apply(model, tr, frozen, batch, train=False)
            if head == "classifier":
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            mask = batch["attention_mask"][:, 1:]
            ce = optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], batch["input_ids"][:, 1:]
            )
            return (ce * mask).sum() / mask.sum()

        tx = optax.adam(LR)
        opt = tx.init(trainable)
        step = jax.jit(jax.value_and_grad(loss_fn))
        losses = []
        for _ in range(STEPS):
            loss, grads = step(trainable)
            updates, opt = tx.update(grads, opt)
            trainable = optax.apply_updates(trainable, updates)
            losses.append(float(loss))

        merged = method.merged_params(trainable, frozen)
        hf_config = dict(p.hf_config)
        if case["head"] == "classifier":
            hf_config["architectures"] = ["GPT2ForSequenceClassification"]
        out = workdir / name
        export_hf(out / "hf", merged, hf_config)
        export_method_adapter(
            out / "adapter",
            method,
            trainable,
            frozen,
            p.hf_config,
            base_model_name_or_path=str(FIXTURES / case["base"]),
        )
        with jax.default_matmul_precision("highest"):
            unmerged = method.apply(p.model, trainable, frozen, batch, train=False)
            merged_logits = p.model.apply({"params": merged}, batch)
            base_logits = p.model.apply({"params": method.base_params(trainable, frozen)}, batch)
        np.savez(
            out / "ftlab.npz",
            **batch,
            unmerged=np.asarray(unmerged, np.float32),
            merged=np.asarray(merged_logits, np.float32),
            base=np.asarray(base_logits, np.float32),
        )
        b_norm = max(float(np.abs(f["b"]).max()) for f in method.lora_factors(trainable).values())
        manifest[name] = {
            **case,
            "targets": list(case["targets"]),
            "lora_targets": list(method.lora_targets),
            "trained": list(method.trained),
            "rank": RANK,
            "alpha": ALPHA,
            "steps": STEPS,
            "loss_first_last": [losses[0], losses[-1]],
            "max_abs_b": b_norm,
        }
        print(f"{name}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, max |b| {b_norm:.3g}")
    (workdir / "manifest.json").write_text(json.dumps(manifest, indent=2))


# -- half 2: transformers + peft -------------------------------------------------------------


def check(workdir: pathlib.Path, results: pathlib.Path | None) -> int:
    import numpy as np
    import peft
    import torch
    import transformers
    from safetensors.numpy import load_file

    manifest = json.loads((workdir / "manifest.json").read_text())
    report = {
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "tolerance": TOL,
        "cases": {},
    }
    ok = True
    for name, case in manifest.items():
        out = workdir / name
        ref = dict(np.load(out / "ftlab.npz"))
        inputs = {
            "input_ids": torch.from_numpy(ref["input_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(ref["attention_mask"].astype(np.int64)),
        }
        auto = (
            transformers.AutoModelForSequenceClassification
            if case["head"] == "classifier"
            else transformers.AutoModelForCausalLM
        )
        keep = ref["attention_mask"].astype(bool)

        def err(logits, want, keep=keep):
            diff = np.abs(logits - want)
            return float(diff[keep].max() if diff.ndim == 3 else diff.max())

        def run(model, inputs=inputs):
            with torch.no_grad():
                return model(**inputs).logits.float().numpy()

        hf = auto.from_pretrained(out / "hf", attn_implementation="eager").eval()
        base = auto.from_pretrained(FIXTURES / case["base"], attn_implementation="eager").eval()
        base_logits = run(base)  # before the adapter (GPT-2 classifier: a fresh random head)
        model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        state = peft.get_peft_model_state_dict(model)
        written = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        same_state = set(state) == set(written) and all(
            np.array_equal(state[k].numpy(), written[k]) for k in written
        )
        peft_logits = run(model)
        merged_logits = run(model.merge_and_unload())
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        row = {
            "hf_export_vs_ftlab_merged": err(run(hf), ref["merged"]),
            "peft_adapter_vs_ftlab_unmerged": err(peft_logits, ref["unmerged"]),
            "peft_merge_and_unload_vs_ftlab_merged": err(merged_logits, ref["merged"]),
            "ftlab_base_vs_ftlab_adapted": err(ref["base"], ref["unmerged"]),
            "torch_base_without_adapter_vs_ftlab_adapted": err(base_logits, ref["unmerged"]),
            "peft_state_dict_equals_written_file": same_state,
            "adapter_config": {
                k: config[k]
                for k in ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save")
            },
            "ftlab": case,
        }
        passed = (
            same_state
            and max(
                row["hf_export_vs_ftlab_merged"],
                row["peft_adapter_vs_ftlab_unmerged"],
                row["peft_merge_and_unload_vs_ftlab_merged"],
            )
            < TOL
            and row["ftlab_base_vs_ftlab_adapted"] > 10 * TOL
        )
        row["passed"] = passed
        ok &= passed
        report["cases"][name] = row
        print(
            f"{name:9s} hf export {row['hf_export_vs_ftlab_merged']:.2e} | peft adapter "
            f"{row['peft_adapter_vs_ftlab_unmerged']:.2e} | peft merged "
            f"{row['peft_merge_and_unload_vs_ftlab_merged']:.2e} | (adapter effect "
            f"{row['ftlab_base_vs_ftlab_adapted']:.2e}) | state dict equal {same_state} | "
            f"{'PASS' if passed else 'FAIL'}"
        )
    report["passed"] = ok
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        (results / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("export", "check"))
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/peft_check"))
    parser.add_argument("--results", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.stage == "export":
        sys.path.insert(0, str(ROOT))
        export(args.workdir)
        return 0
    return check(args.workdir, args.results)


if __name__ == "__main__":
    sys.exit(main())
