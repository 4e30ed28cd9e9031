"""GPT-2 and LLaMA imported from Hugging Face directories match transformers' PyTorch logits.

The fixtures (tests/fixtures/tiny_gpt2, tiny_llama) were written by
``tests/fixtures/make_decoder_fixtures.py`` with torch; these tests need no torch.
"""

import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ftlab import tree
from ftlab.interop import family as family_lib
from ftlab.interop import hub
from ftlab.interop.errors import HFImportError, HubOfflineError
from ftlab.interop.pretrained import export_hf, load_pretrained
from ftlab.interop.table import LINEAR, Entry, Table, batch_norm
from ftlab.methods import build_method
from ftlab.schema import base_config

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("tiny_gpt2", "tiny_llama")
TOL = 1e-4

_CACHE = {}


def loaded(name, head=None):
    key = (name, head)
    if key not in _CACHE:
        _CACHE[key] = load_pretrained(FIXTURES / name, head=head)
    return _CACHE[key]


def data(name):
    with np.load(FIXTURES / name / "inputs_logits.npz") as d:
        return dict(d)


def run(pretrained, inputs, params=None, **kw):
    with jax.default_matmul_precision("highest"):
        return np.asarray(
            pretrained.model.apply({"params": params or pretrained.params}, inputs, **kw)
        )


def batch(d):
    return {"input_ids": d["input_ids"], "attention_mask": d["attention_mask"]}


def copy_fixture(name, tmp_path, tensors=None):
    out = tmp_path / name
    out.mkdir(parents=True)
    shutil.copy(FIXTURES / name / "config.json", out / "config.json")
    if tensors is not None:
        save_file(tensors, str(out / "model.safetensors"))
    return out


def fixture_tensors(name):
    return load_file(str(FIXTURES / name / "model.safetensors"))


@pytest.mark.parametrize("name", NAMES)
def test_lm_logits_match_transformers(name):
    p, d = loaded(name), data(name)
    assert p.model.head == "lm" and p.notes == []
    logits = run(p, batch(d))
    assert logits.dtype == np.float32 and logits.shape == d["logits"].shape
    keep = d["attention_mask"].astype(bool)
    assert np.abs(logits - d["logits"])[keep].max() < TOL


@pytest.mark.parametrize("name", NAMES)
def test_classifier_matches_transformers(name):
    p, d = loaded(name, "classifier"), data(name)
    assert "initialised score/kernel fresh (not in the checkpoint)" in p.notes
    assert p.params["score"]["kernel"].shape == d["score_weight"].T.shape
    params = {**p.params, "score": {"kernel": jnp.asarray(d["score_weight"].T)}}
    logits = run(p, d["input_ids"], params, attention_mask=d["attention_mask"])
    assert np.abs(logits - d["cls_logits"]).max() < TOL


def test_parameter_paths_after_import():
    gpt2 = tree.flatten(loaded("tiny_gpt2").params)
    assert "lm_head/kernel" not in gpt2  # tied to wte
    for leaf in ("q_proj/kernel", "k_proj/bias", "v_proj/kernel", "c_proj/kernel"):
        assert f"h_1/attn/{leaf}" in gpt2
    llama = tree.flatten(loaded("tiny_llama").params)
    assert llama["layers_0/self_attn/k_proj/kernel"].shape == (32, 16)  # 2 kv heads of 8
    assert llama["lm_head/kernel"].shape == (32, 100)
    assert all(v.dtype == jnp.float32 for v in {**gpt2, **llama}.values())


def test_sharded_checkpoint(tmp_path):
    tensors = fixture_tensors("tiny_gpt2")
    out = copy_fixture("tiny_gpt2", tmp_path)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(out / file))
    weight_map = {n: f for f, part in shards.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = tree.flatten(load_pretrained(out).params)
    single = tree.flatten(loaded("tiny_gpt2").params)
    assert sharded.keys() == single.keys()
    assert all(np.array_equal(sharded[k], single[k]) for k in single)


def test_unknown_missing_and_misshapen_tensors_are_named(tmp_path):
    tensors = fixture_tensors("tiny_llama")
    extra = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
    extra["model.layers.0.self_attn.qk_norm.weight"] = np.ones(8, np.float32)
    with pytest.raises(
        HFImportError, match=r"unknown tensor.*'model\.layers\.0\.self_attn\.qk_norm"
    ):
        load_pretrained(copy_fixture("tiny_llama", tmp_path / "a", extra))

    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(HFImportError, match=r"lacks 1 parameter.*layers_1/mlp/up_proj/kernel"):
        load_pretrained(copy_fixture("tiny_llama", tmp_path / "b", missing))

    bad = {**tensors, "model.layers.0.self_attn.v_proj.weight": np.zeros((8, 32), np.float32)}
    with pytest.raises(
        HFImportError, match=r"'model\.layers\.0\.self_attn\.v_proj\.weight'.*\(32, 8\).*\(32, 16\)"
    ):
        load_pretrained(copy_fixture("tiny_llama", tmp_path / "c", bad))

    beyond = {**fixture_tensors("tiny_gpt2"), "transformer.h.7.ln_1.weight": np.ones(32)}
    with pytest.raises(HFImportError, match=r"'transformer\.h\.7\.ln_1\.weight'.*'h_7/ln_1/scale'"):
        load_pretrained(copy_fixture("tiny_gpt2", tmp_path / "d", beyond))


def test_pickle_only_directory(tmp_path, monkeypatch):
    out = copy_fixture("tiny_gpt2", tmp_path)
    (out / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(HFImportError, match=r"only pytorch_model\.bin.*allow_pickle=True"):
        load_pretrained(out)
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    with pytest.raises(HFImportError, match="needs torch"):
        load_pretrained(out, allow_pickle=True)


def test_directory_errors(tmp_path):
    with pytest.raises(HFImportError, match="does not exist"):
        load_pretrained(tmp_path / "nope" / "model")
    with pytest.raises(HFImportError, match="no config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(HFImportError, match="is a file"):
        load_pretrained(FIXTURES / "tiny_gpt2" / "config.json")
    empty = copy_fixture("tiny_gpt2", tmp_path)
    with pytest.raises(HFImportError, match="has no weights"):
        load_pretrained(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "mamba_x"}))
    with pytest.raises(HFImportError, match="'mamba_x' has no ftlab importer; known: bert, ") as e:
        load_pretrained(empty)
    assert all(f" {name}" in str(e.value) for name in ("gpt2", "llama", "resnet", "vit"))


class ConnectError(Exception):  # what httpx raises when there is no route
    pass


@pytest.mark.parametrize(
    "error", [OSError("[Errno 101] Network is unreachable"), ConnectError("x")]
)
def test_hub_id_offline(monkeypatch, error):
    import huggingface_hub

    calls = []

    def offline(repo_id, **kw):
        calls.append((repo_id, kw))
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # as if online
    with pytest.raises(
        HubOfflineError, match=r"(?s)'openai-community/gpt2'.*offline.*pass its path"
    ):
        load_pretrained("openai-community/gpt2")
    assert calls[0][0] == "openai-community/gpt2"
    assert calls[0][1]["local_files_only"] is False


def test_hub_id_downloaded(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(FIXTURES / "tiny_gpt2")
    )
    assert hub.resolve("gpt2") == FIXTURES / "tiny_gpt2"


def test_lora_in_remat_blocks():
    """LoRA interception reaches the q/v projections inside remat'd blocks; factored == merged."""
    d = data("tiny_gpt2")
    p = load_pretrained(FIXTURES / "tiny_gpt2", remat=True)
    cfg = base_config().method
    cfg.name, cfg.lora.targets = "lora", (r"attn/(q|v)_proj/kernel",)
    method = build_method(cfg, p.params)
    assert method.lora_targets == tuple(
        f"h_{i}/attn/{n}_proj/kernel" for i in (0, 1) for n in ("q", "v")
    )
    trainable, frozen = method.split(p.params, jax.random.key(0))

    @jax.jit
    def factored_merged_grads(trainable):
        factored = method.apply(p.model, trainable, frozen, batch(d), train=False)
        merged = p.model.apply({"params": method.merged_params(trainable, frozen)}, batch(d))
        loss = lambda t: method.apply(p.model, t, frozen, batch(d), train=False).mean()
        return factored, merged, jax.grad(loss)(trainable)

    keep = d["attention_mask"].astype(bool)
    with jax.default_matmul_precision("highest"):
        at_init, _, _ = factored_merged_grads(trainable)  # b = 0: the base model
        trainable["lora"] = jax.tree.map(lambda x: x + 0.05, trainable["lora"])
        factored, merged, grads = factored_merged_grads(trainable)
    assert np.abs(np.asarray(at_init) - d["logits"])[keep].max() < TOL
    assert np.abs(np.asarray(factored) - np.asarray(merged)).max() < 1e-5
    assert np.abs(np.asarray(factored) - d["logits"]).max() > 1e-3
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["lora"]))
    assert grads["params"] == {}


def test_dropout_only_in_training():
    d, p = data("tiny_gpt2"), loaded("tiny_gpt2")  # embd/attn/resid dropout 0.1 in the config
    apply = jax.jit(
        lambda params, rng, x: p.model.apply(params, x, train=True, rngs={"dropout": rng})
    )
    train = apply({"params": p.params}, jax.random.key(2), batch(d))
    assert np.abs(np.asarray(train) - d["logits"]).max() > 1e-2


def test_bfloat16_compute_close_to_float32():
    d = data("tiny_llama")
    p = loaded("tiny_llama")
    bf16 = p.model.clone(dtype=jnp.bfloat16)
    logits = np.asarray(jax.jit(bf16.apply)({"params": p.params}, batch(d)))
    assert logits.dtype == np.float32
    keep = d["attention_mask"].astype(bool)
    err = np.abs(logits - d["logits"])[keep].max()
    assert err < 0.05 * np.abs(d["logits"]).max()


def test_another_family_is_one_table_both_ways(tmp_path, monkeypatch):
    """How a family plugs in (``ftlab/interop/<model_type>.py``): a Family with one table, here
    with BatchNorm statistics; import and export both come from it."""
    import flax.linen as nn

    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Dense(3, name="fc")(x)
            return nn.BatchNorm(use_running_average=not train, name="bn")(x)

    family = family_lib.Family(
        model_type="toy_bn",
        build=lambda hf, head, options, overrides: Toy(),
        table=lambda config: Table(
            [Entry("fc.weight", "fc/kernel", LINEAR), Entry("fc.bias", "fc/bias")]
            + batch_norm("bn", "bn")
        ),
        example_inputs=lambda model: jnp.zeros((1, 4)),
        prefix="toy.",
        ignore=(r"bn\.num_batches_tracked",),
        collections=("params", "batch_stats"),
    )
    monkeypatch.setattr(family_lib, "_FAMILIES", dict(family_lib._FAMILIES))
    family_lib.register_family(family)
    with pytest.raises(ValueError, match="already registered"):
        family_lib.register_family(family)
    assert {"bert", "gpt2", "llama", "resnet", "toy_bn", "vit"} <= set(family_lib.families())

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    mean, var = rng.normal(size=3).astype(np.float32), np.full(3, 4.0, np.float32)
    tensors = {
        "toy.fc.weight": w,
        "toy.fc.bias": b,
        "toy.bn.weight": np.full(3, 2.0, np.float32),
        "toy.bn.bias": np.zeros(3, np.float32),
        "toy.bn.running_mean": mean,
        "toy.bn.running_var": var,
        "toy.bn.num_batches_tracked": np.array(7, np.int64),
    }
    out = tmp_path / "toy"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "toy_bn"}))
    save_file(tensors, str(out / "model.safetensors"))
    p = load_pretrained(out)
    assert set(p.variables) == {"params", "batch_stats"}
    x = rng.normal(size=(2, 4)).astype(np.float32)
    y = np.asarray(p.model.apply(p.variables, x))
    want = 2.0 * (x @ w.T + b - mean) / np.sqrt(var + 1e-5)
    assert np.allclose(y, want, atol=1e-5)

    again = export_hf(tmp_path / "again", p.params, p.hf_config, model_state=p.model_state)
    exported = load_file(str(again / "model.safetensors"))
    del tensors["toy.bn.num_batches_tracked"]  # a buffer the toy family does not write back
    assert exported.keys() == tensors.keys()
    assert all(np.array_equal(exported[k], tensors[k]) for k in tensors)
