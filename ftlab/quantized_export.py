"""Weight-only quantised export of a finished run: ``ftlab export RUN --quantize int8|nf4 --out DIR``.

The run's chosen checkpoint (LoRA merged, float32) has every kernel (a leaf named ``kernel``
with >= 2 dims: dense and convolution weights) quantised with ``ftlab.methods.quantize``
(int8 per output channel, or NF4 in blocks of 64 along the fan-in with a float32 absmax per
block, two codes per byte); embeddings, biases and norms stay float32. ``DIR`` gets:

- ``model.safetensors``: each quantised kernel as ``<path>.qvalue`` (int8, or uint8 holding
  two 4-bit codes) and ``<path>.scale`` (float32), every other leaf by its path; the metadata
  key ``ftlab.quantized`` lists the quantised paths with their kind and shape. No pickles.
  ``model_state.safetensors`` holds BatchNorm statistics when the model has them.
- ``config.json``: the run's config;
- ``quantization.json`` and ``quantization.md``: sizes on disk (this file against the float32
  parameters), the metrics of the float32 model and of the quantised one on val and test and
  their change, the largest weight error against its bound.

The quantised model is evaluated as it is stored (each kernel dequantised inside its layer's
call). Load it back with ``load(DIR)`` (config, parameters with ``QuantizedArray`` leaves,
model state) and score it with ``evaluate(DIR)``, which rebuilds the run's data and model
from ``DIR/config.json`` and gives the same metrics the export reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ftlab import tree
from ftlab.methods import Method
from ftlab.methods import quantize as quant_lib

log = logging.getLogger("ftlab")

WEIGHTS, STATE, REPORT = "model.safetensors", "model_state.safetensors", "quantization.json"


def _method(flat: Mapping[str, Any], qtype: str, block: int) -> Method:
    """A method that trains nothing and holds the quantised kernels of ``flat`` quantised."""
    quantized = tuple(sorted(p for p, v in flat.items() if quant_lib.is_quantized(v)))
    return Method("frozen", (), quantize=qtype, quantized=quantized, quantize_block=block)


def _scores(run: Any, state: Any, flat: Mapping[str, Any], qtype: str, block: int) -> dict:
    """Val and test metrics of the model whose parameters are ``flat`` (quantised leaves run
    dequantised inside their layers), with the run's data, model and evaluation."""
    from ftlab.train import losses
    from ftlab.train.step import make_eval_step

    cfg = run.cfg
    method = _method(flat, qtype, block)
    loss_fn = losses.per_example_loss(cfg.train.loss, cfg.train.label_smoothing)
    eval_step = jax.jit(make_eval_step(run.model, method, loss_fn, run.data.task))
    qrun = dataclasses.replace(run, method=method, eval_step=eval_step)
    qstate = state.replace(
        trainable={"params": {}, "lora": {}}, frozen=tree.unflatten(dict(flat)), opt_state=()
    )
    return _split_scores(qrun, qstate)


def _split_scores(run: Any, state: Any) -> dict:
    out = {}
    for name in ("val", "test"):
        split = getattr(run.data, name)
        if len(split):
            metrics = run.evaluate(state, split)
            metrics.pop("outputs", None)
            out[name] = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    return out


def _bytes(flat: Mapping[str, Any]) -> int:
    return int(
        sum(v.nbytes if quant_lib.is_quantized(v) else np.asarray(v).nbytes for v in flat.values())
    )


def export(restored: Any, qtype: str, out: Path, block: int = quant_lib.BLOCK) -> dict:
    """Quantise ``restored`` (``ftlab.saved_run.restore``) into ``out``; returns the report."""
    from safetensors.numpy import save_file

    from ftlab.config import to_dict
    from ftlab.train.loop import _fetch

    run, state, cfg = restored.run, restored.state, restored.cfg
    float_scores = _split_scores(run, state)
    merged = _fetch(jax.jit(run.method.merged_params)(state.trainable, state.frozen))
    flat = {p: np.asarray(v, np.float32) for p, v in tree.flatten(merged).items()}
    paths = quant_lib.kernel_paths(flat)
    qflat = quant_lib.quantize_flat(flat, paths, qtype, block)
    qflat = {p: jax.device_get(v) for p, v in qflat.items()}
    quant_scores = _scores(run, state, qflat, qtype, block)

    errors = {}
    for p in paths:
        q = qflat[p]
        w = flat[p].reshape(-1, flat[p].shape[-1])
        err = np.abs(w - np.asarray(quant_lib.dequantize(q)).reshape(w.shape))
        bound = np.asarray(quant_lib.error_bound(q))
        errors[p] = {
            "max_abs_error": float(err.max()),
            "max_error_over_bound": float((err / np.maximum(bound, 1e-30)).max()),
        }

    out.mkdir(parents=True, exist_ok=True)
    tensors, metadata = quant_lib.to_tensors(qflat)
    metadata["ftlab.qtype"] = qtype
    save_file(tensors, str(out / WEIGHTS), metadata=metadata)
    model_state = tree.flatten(_fetch(state.model_state) or {})
    if model_state:
        save_file({p: np.asarray(v) for p, v in model_state.items()}, str(out / STATE))
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    def delta(metric_set: str) -> dict:
        f, q = float_scores.get(metric_set, {}), quant_scores.get(metric_set, {})
        return {k: q[k] - f[k] for k in f if k in q}

    float_bytes = _bytes(flat)
    report = {
        "run": str(restored.directory),
        "checkpoint": restored.checkpoint.name,
        "step": restored.checkpoint.step,
        "quantize": qtype,
        "block": block if qtype == "nf4" else None,
        "quantized_kernels": len(paths),
        "quantized_params": int(sum(flat[p].size for p in paths)),
        "total_params": int(sum(v.size for v in flat.values())),
        "file_bytes": (out / WEIGHTS).stat().st_size,
        "float32_param_bytes": float_bytes,
        "quantized_param_bytes": _bytes(qflat),
        "compression": float_bytes / max(_bytes(qflat), 1),
        "float32": float_scores,
        "quantized": quant_scores,
        "change": {s: delta(s) for s in float_scores},
        "weight_error": errors,
    }
    (out / REPORT).write_text(json.dumps(tree.jsonable(report), indent=2))
    (out / "quantization.md").write_text(_markdown(report))
    log.info("exported %s-quantised weights to %s", qtype, out)
    return report


def _markdown(r: dict) -> str:
    lines = [
        f"# Quantised export: {r['quantize']}",
        "",
        f"Run `{r['run']}`, {r['checkpoint']} checkpoint (step {r['step']}); "
        f"{r['quantized_kernels']} kernels ({r['quantized_params']:,} of {r['total_params']:,} "
        "parameters) quantised"
        + (f", NF4 blocks of {r['block']}" if r["block"] else ", int8 per output channel")
        + ".",
        "",
        (
            f"Size: `model.safetensors` {r['file_bytes']:,} bytes on disk; parameters "
            f"{r['quantized_param_bytes']:,} bytes against {r['float32_param_bytes']:,} in "
            f"float32 ({r['compression']:.2f}x smaller)."
        ),
        "",
        "| split | metric | float32 | quantised | change |",
        "|---|---|---|---|---|",
    ]
    for split, metrics in r["float32"].items():
        for k, v in metrics.items():
            q = r["quantized"].get(split, {}).get(k)
            if q is not None:
                lines.append(f"| {split} | {k} | {v:.4f} | {q:.4f} | {q - v:+.4f} |")
    worst = max((e["max_error_over_bound"] for e in r["weight_error"].values()), default=0.0)
    lines += [
        "",
        f"Largest weight error / its rounding bound over all kernels: {worst:.3f} (<= 1).",
        "",
    ]
    return "\n".join(lines)


# -- loading it back ----------------------------------------------------------------------------


def load(directory: str | Path) -> tuple[Any, dict, dict]:
    """``(config, params, model_state)`` of a quantised export: ``params`` a nested tree whose
    quantised kernels are ``ftlab.methods.quantize.QuantizedArray`` leaves."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from ftlab.config import from_dict
    from ftlab.schema import base_config

    directory = Path(directory)
    with safe_open(str(directory / WEIGHTS), framework="numpy") as f:
        metadata = f.metadata() or {}
    flat = quant_lib.from_tensors(load_file(str(directory / WEIGHTS)), metadata)
    state = load_file(str(directory / STATE)) if (directory / STATE).exists() else {}
    cfg = from_dict(json.loads((directory / "config.json").read_text()), base_config())
    return cfg, tree.unflatten(flat), tree.unflatten(state)


def evaluate(directory: str | Path) -> dict:
    """Val and test metrics of a quantised export, as ``export`` reported them: the run's
    data and model rebuilt from the export's ``config.json``, the stored weights as stored."""
    from ftlab.train.loop import build

    cfg, params, model_state = load(directory)
    report = json.loads((Path(directory) / REPORT).read_text())
    run = build(cfg, teacher=False)  # evaluation needs the student only
    state = run.state.replace(model_state=model_state or run.state.model_state)
    return _scores(run, state, tree.flatten(params), report["quantize"], report["block"] or 64)
