"""PEFT LoRA adapters for the encoders (BERT, ViT), as tests/test_peft.py does for GPT-2/LLaMA:
adapters made by peft run in ftlab with peft's logits, ftlab re-exports the same files, and
ftlab -> PEFT -> ftlab is exact (no torch needed).

The fixtures (tests/fixtures/peft_bert_cls, peft_vit_cls; tests/fixtures/PEFT_FIXTURES.md) were
written by ``tests/fixtures/make_peft_fixtures.py`` with torch + transformers 5 + peft: random
``lora_B`` and ``classifier`` heads (``modules_to_save``), peft's unmerged and merged logits. The
ViT adapter names modules as transformers 5 holds them in memory (``vit.layers.0.attention.q_proj``),
not as its checkpoint does (``vit.encoder.layer.0.attention.attention.query``).
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ftlab.interop.peft import (
    PEFT_PREFIX,
    export_method_adapter,
    export_peft_adapter,
    load_peft_adapter,
)
from ftlab.interop.pretrained import load_pretrained
from ftlab.methods import build_method
from ftlab.schema import base_config

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {"peft_bert_cls": "tiny_bert", "peft_vit_cls": "tiny_vit"}
TOL = 1e-5
_CACHE = {}


def base(name):
    if name not in _CACHE:
        _CACHE[name] = load_pretrained(FIXTURES / name)
    return _CACHE[name]


def reference(case):
    with np.load(FIXTURES / case / "reference.npz") as d:
        return dict(d)


def batch_of(d, nchw=True):
    if "pixel_values" in d:  # HF's NCHW, as peft saw it, or the same pixels as NHWC
        return d["pixel_values"] if nchw else d["pixel_values_nhwc"]
    return {k: d[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def logits(model, method, trainable, frozen, batch):
    with jax.default_matmul_precision("highest"):
        return np.asarray(method.apply(model, trainable, frozen, batch, train=False))


def merged_logits(model, params, batch):
    with jax.default_matmul_precision("highest"):
        return np.asarray(model.apply({"params": params}, batch))


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_gives_peft_logits(case):
    p, d = base(CASES[case]), reference(case)
    adapter = load_peft_adapter(FIXTURES / case, p.params, p.hf_config)
    assert adapter.notes == []
    assert sorted(adapter.modules) == ["classifier/bias", "classifier/kernel"]
    method, trainable, frozen = adapter.split(p.params)
    batch = batch_of(d)
    unmerged = logits(p.model, method, trainable, frozen, batch)
    assert unmerged.shape == d["peft_logits"].shape
    assert np.abs(unmerged - d["peft_logits"]).max() < TOL
    merged = merged_logits(p.model, method.merged_params(trainable, frozen), batch)
    assert np.abs(merged - d["merged_logits"]).max() < TOL
    # the adapter matters: the base model's logits are far from peft's
    assert np.abs(merged_logits(p.model, p.params, batch) - d["peft_logits"]).max() > 1e-2
    if case == "peft_vit_cls":  # NCHW pixels were transposed: NHWC gives the same logits
        nhwc = logits(p.model, method, trainable, frozen, batch_of(d, nchw=False))
        np.testing.assert_array_equal(nhwc, unmerged)


def test_adapter_targets():
    bert = base("tiny_bert")
    a = load_peft_adapter(FIXTURES / "peft_bert_cls", bert.params, bert.hf_config)
    assert sorted(a.factors) == sorted(
        f"layer_{i}/{m}/kernel"
        for i in (0, 1)
        for m in ("attention/query", "attention/value", "intermediate")
    )
    assert a.factors["layer_0/intermediate/kernel"]["b"].shape == (4, 37)
    assert a.spec.rank == 4 and a.spec.scale == 8 / 4
    vit = base("tiny_vit")
    v = load_peft_adapter(FIXTURES / "peft_vit_cls", vit.params, vit.hf_config)
    assert sorted(v.factors) == sorted(
        f"layer_{i}/attention/{m}/kernel" for i in (0, 1) for m in ("query", "value")
    )


@pytest.mark.parametrize("case", CASES)
def test_reexport_is_bit_exact(case, tmp_path):
    p = base(CASES[case])
    adapter = load_peft_adapter(FIXTURES / case, p.params, p.hf_config)
    out = export_peft_adapter(
        tmp_path / "out",
        adapter.factors,
        adapter.spec,
        p.params,
        p.hf_config,
        modules_to_save=adapter.modules,
        base_model_name_or_path=adapter.config["base_model_name_or_path"],
    )
    theirs = load_file(str(FIXTURES / case / "adapter_model.safetensors"))
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()  # the same names (ViT: transformers 5's in-memory ones)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert np.array_equal(ours[k], v), k

    mine = json.loads((out / "adapter_config.json").read_text())
    ref = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    for key in (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "modules_to_save",
        "fan_in_fan_out",
        "bias",
        "use_dora",
        "lora_dropout",
        "base_model_name_or_path",
    ):
        assert mine[key] == ref[key], key
    if isinstance(ref["target_modules"], list):
        assert sorted(mine["target_modules"]) == sorted(ref["target_modules"])
    else:  # peft's full-name regex: ours names the same modules the PEFT way
        assert mine["target_modules"] == ["intermediate.dense", "query", "value"]


@pytest.mark.parametrize(
    "name,targets",
    [
        ("tiny_bert", (r"attention/(query|value)/kernel", r"layer_1/output/kernel")),
        ("tiny_vit", (r"attention/(key|output)/kernel", r"mlp/fc1/kernel")),
    ],
)
def test_ftlab_export_import_roundtrip(name, targets, tmp_path):
    p = base(name)
    cfg = base_config().method
    cfg.name, cfg.trainable = "lora", (r"^classifier/",)
    cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha = targets, 2, 6.0
    method = build_method(cfg, p.params)
    tr, fr = method.split(p.params, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 64))  # b = 0 would be a no-op adapter
    tr = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), tr)

    out = export_method_adapter(tmp_path / "adapter", method, tr, fr, p.hf_config)
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    if name == "tiny_bert":
        assert config["task_type"] == "SEQ_CLS"
        assert config["target_modules"] == ["layer.1.output.dense", "query", "value"]
        assert f"{PEFT_PREFIX}bert.encoder.layer.1.output.dense.lora_A.weight" in tensors
    else:  # PEFT has no image task type; the head goes through modules_to_save
        assert config["task_type"] is None and config["modules_to_save"] == ["classifier"]
        assert config["target_modules"] == ["fc1", "k_proj", "o_proj"]
        assert f"{PEFT_PREFIX}vit.layers.0.attention.o_proj.lora_B.weight" in tensors
    assert f"{PEFT_PREFIX}classifier.weight" in tensors

    back = load_peft_adapter(out, p.params, p.hf_config)
    assert back.notes == [] and back.spec == method.lora
    want = method.lora_factors(tr)
    assert back.factors.keys() == want.keys()
    for path, f in want.items():
        for k in "ab":
            np.testing.assert_array_equal(back.factors[path][k], np.asarray(f[k]))
    for path, value in back.modules.items():
        np.testing.assert_array_equal(value, tr["params"]["classifier"][path.split("/")[1]])
    m2, tr2, fr2 = back.split(p.params)
    batch = batch_of(reference("peft_bert_cls" if name == "tiny_bert" else "peft_vit_cls"))
    np.testing.assert_array_equal(
        logits(p.model, m2, tr2, fr2, batch), logits(p.model, method, tr, fr, batch)
    )
