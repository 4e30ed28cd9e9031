"""PEFT LoRA adapters: PyTorch-trained adapters run in ftlab as in PEFT, ftlab writes the same
files PEFT writes, and ftlab -> PEFT -> ftlab is exact (no torch needed).

The fixtures (tests/fixtures/peft_*) were written by ``tests/fixtures/make_peft_fixtures.py``
with torch + peft: non-zero random ``lora_B``, PEFT's unmerged and merged logits.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ftlab import tree
from ftlab.interop.peft import (
    PEFT_PREFIX,
    PeftAdapterError,
    export_method_adapter,
    export_peft_adapter,
    load_peft_adapter,
)
from ftlab.interop.pretrained import load_pretrained
from ftlab.methods import build_method
from ftlab.schema import base_config

FIXTURES = Path(__file__).parent / "fixtures"
CASES = {  # adapter fixture -> (base fixture, ftlab head)
    "peft_gpt2": ("tiny_gpt2", None),
    "peft_llama": ("tiny_llama", None),
    "peft_gpt2_cls": ("tiny_gpt2", "classifier"),
}
TOL = 1e-4
_CACHE = {}


def base(name, head=None):
    if (name, head) not in _CACHE:
        _CACHE[name, head] = load_pretrained(FIXTURES / name, head=head)
    return _CACHE[name, head]


def reference(case):
    with np.load(FIXTURES / case / "reference.npz") as d:
        return dict(d)


def batch_of(d):
    return {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"]}


def unmerged_logits(p, method, trainable, frozen, batch):
    with jax.default_matmul_precision("highest"):
        return np.asarray(method.apply(p.model, trainable, frozen, batch, train=False))


def merged_logits(p, params, batch):
    with jax.default_matmul_precision("highest"):
        return np.asarray(p.model.apply({"params": params}, batch))


def max_err(a, b, mask):
    diff = np.abs(a - b)
    return diff[mask.astype(bool)].max() if diff.ndim == 3 else diff.max()  # LM: real tokens


def lora_method(p, targets, trainable=(), rank=2, alpha=6.0, rslora=False, seed=1):
    cfg = base_config().method
    cfg.name = "lora"
    cfg.trainable = trainable
    cfg.lora.targets = targets
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora = rank, alpha, rslora
    method = build_method(cfg, p.params)
    tr, fr = method.split(p.params, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(seed), 128))  # b = 0 would be a no-op adapter
    tr = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), tr)
    return method, tr, fr


@pytest.mark.parametrize("case", CASES)
def test_pytorch_adapter_runs_as_in_peft(case):
    p, d = base(*CASES[case]), reference(case)
    adapter = load_peft_adapter(FIXTURES / case, p.params, p.hf_config)
    assert adapter.notes == []
    method, trainable, frozen = adapter.split(p.params)
    batch = batch_of(d)
    unmerged = unmerged_logits(p, method, trainable, frozen, batch)
    merged = merged_logits(p, method.merged_params(trainable, frozen), batch)
    assert unmerged.shape == d["peft_logits"].shape
    assert max_err(unmerged, d["peft_logits"], d["attention_mask"]) < TOL
    assert max_err(merged, d["merged_logits"], d["attention_mask"]) < TOL
    # the adapter matters: the base model's logits are far from PEFT's
    assert max_err(merged_logits(p, p.params, batch), d["peft_logits"], d["attention_mask"]) > 1e-2


def test_pytorch_adapter_details():
    p = base("tiny_gpt2")
    gpt2 = load_peft_adapter(FIXTURES / "peft_gpt2", p.params, p.hf_config)
    # c_attn's one rank-4 adapter becomes q/k/v factors sharing A; c_fc maps one to one
    assert sorted(gpt2.factors) == sorted(
        f"h_{i}/{m}/kernel"
        for i in (0, 1)
        for m in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "mlp/c_fc")
    )
    assert gpt2.factors["h_0/attn/q_proj/kernel"]["a"].shape == (32, 4)
    assert gpt2.factors["h_0/attn/k_proj/kernel"]["b"].shape == (4, 32)
    assert gpt2.spec.scale == 8 / 4 and gpt2.modules == {}
    llama = base("tiny_llama")
    rs = load_peft_adapter(FIXTURES / "peft_llama", llama.params, llama.hf_config)
    assert rs.spec.rslora and rs.spec.scale == pytest.approx(6 / 2)  # alpha / sqrt(4)
    assert rs.factors["layers_1/self_attn/v_proj/kernel"]["b"].shape == (4, 16)  # GQA: 2 kv heads

    cls = base("tiny_gpt2", "classifier")
    head = load_peft_adapter(FIXTURES / "peft_gpt2_cls", cls.params, cls.hf_config)
    saved = load_file(str(FIXTURES / "peft_gpt2_cls" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(
        head.modules["score/kernel"], saved[f"{PEFT_PREFIX}score.weight"].T
    )
    assert head.method().trained == ("score/kernel",)


@pytest.mark.parametrize("case", CASES)
def test_export_reproduces_the_peft_adapter(case, tmp_path):
    p = base(*CASES[case])
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
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(v.dtype == np.float32 for v in ours.values())
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)

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
        "rank_pattern",
        "alpha_pattern",
    ):
        assert mine[key] == ref[key], key
    assert sorted(mine["target_modules"]) == sorted(ref["target_modules"])


@pytest.mark.parametrize(
    "name,targets,rslora",
    [
        ("tiny_gpt2", (r"attn/(q|v)_proj/kernel", r"h_1/mlp/c_fc/kernel"), True),
        ("tiny_llama", (r"self_attn/(q|v|o)_proj/kernel", r"mlp/down_proj", r"lm_head"), False),
    ],
)
def test_ftlab_export_import_roundtrip(name, targets, rslora, tmp_path):
    p = base(name)
    method, tr, fr = lora_method(p, targets, rslora=rslora)
    out = export_method_adapter(tmp_path / "adapter", method, tr, fr, p.hf_config)
    back = load_peft_adapter(out, p.params, p.hf_config)
    assert back.notes == [] and back.spec == method.lora and back.modules == {}
    want = method.lora_factors(tr)
    assert back.factors.keys() == want.keys()
    for path, f in want.items():
        for k in "ab":
            assert back.factors[path][k].shape == f[k].shape
            np.testing.assert_array_equal(back.factors[path][k], np.asarray(f[k]))

    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    if name == "tiny_gpt2":
        # q and v (rank 2 each) are one rank-4 adapter on c_attn: k's rows of B are zero,
        # c_fc (rank 2) is padded to rank 4; alpha keeps PEFT's scaling equal to ftlab's.
        assert config["target_modules"] == ["c_attn", "h.1.mlp.c_fc"]
        assert config["r"] == 4 and config["fan_in_fan_out"] and config["use_rslora"]
        assert config["lora_alpha"] / np.sqrt(4) == pytest.approx(method.lora.scale, rel=1e-12)
        b = tensors[f"{PEFT_PREFIX}transformer.h.0.attn.c_attn.lora_B.weight"]
        assert b.shape == (96, 4) and not b[32:64].any() and b[:32, :2].any()
        assert not b[:32, 2:].any() and not b[64:, :2].any()
        a_fc = tensors[f"{PEFT_PREFIX}transformer.h.1.mlp.c_fc.lora_A.weight"]
        assert a_fc.shape == (4, 32) and not a_fc[2:].any()
    else:
        assert config["target_modules"] == ["down_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
        assert config["r"] == 2 and config["lora_alpha"] == 6 and not config["fan_in_fan_out"]

    # What PEFT computes: the same files without ftlab's placement metadata, read as PEFT reads
    # them (every kernel of a fused module gets the full A), give the same merged model.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(out / "adapter_config.json", plain)
    save_file(tensors, str(plain / "adapter_model.safetensors"), metadata={"format": "pt"})
    dense = load_peft_adapter(plain, p.params, p.hf_config)
    m2, tr2, fr2 = dense.split(p.params)
    assert dense.spec.scale == pytest.approx(method.lora.scale, rel=1e-12)
    if name == "tiny_gpt2":  # k_proj gets (zero) factors too
        assert "h_0/attn/k_proj/kernel" in dense.factors
        assert not dense.factors["h_0/attn/k_proj/kernel"]["b"].any()
    a, b = tree.flatten(m2.merged_params(tr2, fr2)), tree.flatten(method.merged_params(tr, fr))
    assert a.keys() == b.keys()
    assert max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a) < 1e-6
    batch = batch_of(reference("peft_gpt2" if name == "tiny_gpt2" else "peft_llama"))
    np.testing.assert_allclose(
        unmerged_logits(p, m2, tr2, fr2, batch),
        unmerged_logits(p, method, tr, fr, batch),
        atol=1e-5,
        rtol=0,
    )


def test_new_head_is_saved_and_restored(tmp_path):
    p = base("tiny_gpt2", "classifier")
    method, tr, fr = lora_method(p, (r"attn/(q|v)_proj/kernel",), trainable=(r"^score/",))
    assert method.trained == ("score/kernel",)
    out = export_method_adapter(tmp_path / "a", method, tr, fr, p.hf_config)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    np.testing.assert_array_equal(
        tensors[f"{PEFT_PREFIX}score.weight"], np.asarray(tr["params"]["score"]["kernel"]).T
    )

    back = load_peft_adapter(out, p.params, p.hf_config)  # p.params holds a different head
    assert not np.array_equal(p.params["score"]["kernel"], tr["params"]["score"]["kernel"])
    np.testing.assert_array_equal(back.modules["score/kernel"], tr["params"]["score"]["kernel"])
    m2, tr2, fr2 = back.split(p.params)
    batch = batch_of(reference("peft_gpt2_cls"))
    np.testing.assert_array_equal(
        unmerged_logits(p, m2, tr2, fr2, batch), unmerged_logits(p, method, tr, fr, batch)
    )

    without = export_method_adapter(tmp_path / "b", method, tr, fr, p.hf_config, save_trained=False)
    assert f"{PEFT_PREFIX}score.weight" not in load_file(str(without / "adapter_model.safetensors"))


def edited(tmp_path, case="peft_gpt2", config=None, tensors=None):
    out = tmp_path / f"edited_{len(list(tmp_path.iterdir()))}"
    shutil.copytree(FIXTURES / case, out)
    if config:
        c = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**c, **config}))
    if tensors is not None:
        t = load_file(str(out / "adapter_model.safetensors"))
        save_file(tensors(t), str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize(
    "config,match",
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"rank_pattern": {"c_fc": 2}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"r": 2}, r"lora_A/B.weight have shapes \(4, 32\)"),
    ],
)
def test_unsupported_adapter_config_is_named(config, match, tmp_path):
    p = base("tiny_gpt2")
    with pytest.raises(PeftAdapterError, match=match):
        load_peft_adapter(edited(tmp_path, config=config), p.params, p.hf_config)


def test_unmappable_tensors_are_named(tmp_path):
    p = base("tiny_gpt2")
    prefix = PEFT_PREFIX + "transformer."
    embed = {f"{prefix}wte.lora_embedding_A": np.ones((4, 100), np.float32)}
    with pytest.raises(
        PeftAdapterError, match=r"'base_model.model.transformer.wte.lora_embedding_A'"
    ):
        load_peft_adapter(edited(tmp_path, tensors=lambda t: {**t, **embed}), p.params, p.hf_config)
    head = {PEFT_PREFIX + "lm_head.lora_A.weight": np.ones((4, 32), np.float32)}  # GPT-2: tied
    with pytest.raises(
        PeftAdapterError, match=r"lm_head.lora_A.weight.*cannot map module 'lm_head'"
    ):
        load_peft_adapter(edited(tmp_path, tensors=lambda t: {**t, **head}), p.params, p.hf_config)
    drop_b = f"{prefix}h.1.mlp.c_fc.lora_B.weight"
    with pytest.raises(PeftAdapterError, match=r"h.1.mlp.c_fc.lora_A.weight but no .*lora_B"):
        load_peft_adapter(
            edited(tmp_path, tensors=lambda t: {k: v for k, v in t.items() if k != drop_b}),
            p.params,
            p.hf_config,
        )
    with pytest.raises(PeftAdapterError, match="has no adapter_config.json"):
        load_peft_adapter(tmp_path, p.params, p.hf_config)

    method, tr, _ = lora_method(p, (r"attn/q_proj/kernel",))
    factors = method.lora_factors(tr)
    with pytest.raises(PeftAdapterError, match="'wte/embedding' is not a kernel PEFT can adapt"):
        export_peft_adapter(
            tmp_path / "x",
            {"wte/embedding": factors["h_0/attn/q_proj/kernel"]},
            method.lora,
            p.params,
            p.hf_config,
        )
    with pytest.raises(
        PeftAdapterError, match="'h_0/attn/q_proj/kernel' have rank 2, the spec says rank 3"
    ):
        export_peft_adapter(
            tmp_path / "x", factors, method.lora.__class__(3, 6.0), p.params, p.hf_config
        )
    assert not (tmp_path / "x").exists()


def test_refuses_non_empty_directory(tmp_path):
    p = base("tiny_llama")
    method, tr, fr = lora_method(p, (r"q_proj",))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(PeftAdapterError, match=r"taken.*non-empty directory"):
        export_method_adapter(out, method, tr, fr, p.hf_config)
    assert [f.name for f in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    export_method_adapter(tmp_path / "empty", method, tr, fr, p.hf_config)
    with pytest.raises(PeftAdapterError, match="non-empty"):
        export_method_adapter(tmp_path / "empty", method, tr, fr, p.hf_config)
