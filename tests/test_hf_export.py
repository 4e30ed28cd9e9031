"""Export to Hugging Face directories: import -> export -> import is exact (no torch needed)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ftlab import tree
from ftlab.interop.errors import HFExportError
from ftlab.interop.pretrained import export_hf, hf_tensors, load_pretrained
from ftlab.methods import build_method
from ftlab.schema import base_config

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("tiny_gpt2", "tiny_llama")

_CACHE = {}


def loaded(name):
    if name not in _CACHE:
        _CACHE[name] = load_pretrained(FIXTURES / name)
    return _CACHE[name]


def inputs(name):
    with np.load(FIXTURES / name / "inputs_logits.npz") as d:
        return {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"]}


def logits(pretrained, params, batch):
    with jax.default_matmul_precision("highest"):
        return np.asarray(pretrained.model.apply({"params": params}, batch))


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_is_exact(name, tmp_path):
    p = loaded(name)
    out = export_hf(tmp_path / "export", p.params, p.hf_config)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == p.hf_config

    # Same tensor names and shapes as the fixture HF wrote. The fixtures hold no buffers
    # (attn.bias masks, rotary inv_freq) and no tied duplicate (GPT-2's lm_head.weight is
    # tied to wte and not saved), so nothing has to be ignored in this comparison.
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in original.items()}
    assert all(v.dtype == np.float32 for v in exported.values())
    # The fixture is float32 too, so the tensors themselves come back bit for bit.
    assert all(np.array_equal(exported[k], original[k]) for k in original)

    again = load_pretrained(out)
    a, b = tree.flatten(p.params), tree.flatten(again.params)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    batch = inputs(name)
    np.testing.assert_array_equal(logits(again, again.params, batch), logits(p, p.params, batch))


def test_lora_merged_export_matches_unmerged_model(tmp_path):
    p = loaded("tiny_gpt2")
    cfg = base_config().method
    cfg.name = "lora"
    cfg.lora.targets = (r"attn/(q|v)_proj/kernel",)
    method = build_method(cfg, p.params)
    assert len(method.lora_targets) == 4
    trainable, frozen = method.split(p.params, jax.random.key(0))
    # b starts at zero (a no-op adapter): perturb both factors so the merge matters.
    keys = iter(jax.random.split(jax.random.key(1), 64))
    trainable["lora"] = jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), trainable["lora"]
    )
    batch = inputs("tiny_gpt2")
    with jax.default_matmul_precision("highest"):
        unmerged = np.asarray(method.apply(p.model, trainable, frozen, batch, train=False))
    base = logits(p, p.params, batch)
    assert np.abs(unmerged - base).max() > 1e-3  # the adapters change the model

    out = export_hf(tmp_path / "merged", method.merged_params(trainable, frozen), p.hf_config)
    again = load_pretrained(out)
    np.testing.assert_allclose(logits(again, again.params, batch), unmerged, atol=1e-5, rtol=0)


def test_refuses_non_empty_directory(tmp_path):
    p = loaded("tiny_llama")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(HFExportError, match=r"taken.*non-empty directory"):
        export_hf(out, p.params, p.hf_config)
    assert [f.name for f in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"

    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    export_hf(tmp_path / "empty", p.params, p.hf_config)
    with pytest.raises(HFExportError, match="non-empty"):  # and now it is not empty
        export_hf(tmp_path / "empty", p.params, p.hf_config)


def test_inconsistent_head_and_unknown_leaf_are_errors():
    p = loaded("tiny_llama")
    untied = {k: v for k, v in p.params.items() if k != "lm_head"}
    with pytest.raises(HFExportError, match="no lm_head/kernel"):
        hf_tensors(untied, p.hf_config)
    with pytest.raises(HFExportError, match="tie_word_embeddings=true"):
        hf_tensors(p.params, {**p.hf_config, "tie_word_embeddings": True})
    with pytest.raises(HFExportError, match="'extra/kernel' has no Hugging Face name"):
        hf_tensors({**p.params, "extra": {"kernel": np.ones((2, 2))}}, p.hf_config)
