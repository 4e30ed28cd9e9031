"""``ftlab export RUN --quantize int8|nf4 --out DIR`` on the tiny digits run: safetensors with
packed codes and scales, a size and metric report, and a load-back that scores the same."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from ftlab import checkpoint, quantized_export, tree
from ftlab.cli import main
from ftlab.methods import quantize as q
from ftlab.train.loop import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("qexport") / "run"
    train(tiny_config(**{"train.num_steps": 20}), workdir)
    return workdir


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_quantized_export_reports_and_loads_back(run_dir, tmp_path, qtype, capsys):
    out = tmp_path / qtype
    assert main(["export", str(run_dir), "--quantize", qtype, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "quantization.json").read_text())
    assert (
        printed["file_bytes"] == report["file_bytes"] == (out / "model.safetensors").stat().st_size
    )
    assert (out / "quantization.md").read_text().startswith(f"# Quantised export: {qtype}")
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pkl"))  # no pickles

    # every kernel stored quantised: packed codes (uint8 for nf4, int8) and float32 scales
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        names, meta = set(f.keys()), f.metadata()
        stored = {n: f.get_tensor(n) for n in names}
    kinds = json.loads(meta["ftlab.quantized"])
    assert sorted(kinds) == ["block_0/kernel", "block_1/kernel", "block_2/kernel", "head/kernel"]
    for path in kinds:
        assert stored[f"{path}.qvalue"].dtype == (np.uint8 if qtype == "nf4" else np.int8)
        assert stored[f"{path}.scale"].dtype == np.float32
    assert report["quantized_param_bytes"] < report["float32_param_bytes"] / (
        6 if qtype == "nf4" else 3
    )

    # metric change against float32, on val and test
    for split in ("val", "test"):
        f32, qm = report["float32"][split], report["quantized"][split]
        assert report["change"][split]["accuracy"] == pytest.approx(
            qm["accuracy"] - f32["accuracy"]
        )
        assert abs(report["change"][split]["loss"]) < 0.2

    # the error bound holds against the run's float32 parameters (params/: the best weights)
    params = tree.flatten(checkpoint.load_pytree(run_dir / "params"))
    _, loaded, _ = quantized_export.load(out)
    loaded = tree.flatten(loaded)
    for path in kinds:
        qa = loaded[path]
        assert q.is_quantized(qa) and qa.shape == params[path].shape
        w = np.asarray(params[path]).reshape(-1, qa.shape[-1])
        err = np.abs(np.asarray(q.dequantize(qa)).reshape(w.shape) - w)
        assert np.all(err <= np.asarray(q.error_bound(qa)) * (1 + 1e-4) + 1e-12), path
        assert report["weight_error"][path]["max_error_over_bound"] <= 1 + 1e-4
    for path, v in loaded.items():
        if not q.is_quantized(v):
            np.testing.assert_array_equal(v, params[path])  # biases stay float32, exactly

    # loaded back into ftlab, the quantised model scores exactly what the export reported
    assert quantized_export.evaluate(out) == report["quantized"]


def test_quantized_export_refuses_a_non_empty_out(run_dir, tmp_path):
    (tmp_path / "x").write_text("keep")
    assert main(["export", str(run_dir), "--quantize", "nf4", "--out", str(tmp_path)]) == 2
    assert main(["export", str(run_dir), "--quantize", "nf4"]) == 2
