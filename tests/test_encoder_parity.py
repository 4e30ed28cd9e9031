"""BERT, ViT and ResNet imported from tiny HF PyTorch checkpoints match PyTorch's logits.

The fixtures (``tests/fixtures/tiny_{bert,vit,resnet}``) are written by
``tests/fixtures/make_encoder_fixtures.py`` with torch; these tests need neither torch nor
transformers' model code.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ftlab import tree
from ftlab.interop.errors import HFImportError
from ftlab.interop.pretrained import load_pretrained, model_variables
from ftlab.methods import build_method
from ftlab.models.bert import Bert
from ftlab.models.resnet import ResNet
from ftlab.models.vit import ViT
from ftlab.schema import base_config

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def load_hf_encoder(path):
    """(model, variables) through the one loader every family shares."""
    p = load_pretrained(path)
    return p.model, p.variables


def _expected(name):
    return dict(np.load(FIXTURES / name / "inputs_logits.npz"))


def _apply(model, variables, *args, **kwargs):
    with jax.default_matmul_precision("highest"):
        return jax.jit(model.apply, static_argnames="train")(
            variables, *args, train=False, **kwargs
        )


def test_bert_matches_pytorch():
    model, variables = load_hf_encoder(FIXTURES / "tiny_bert")
    assert isinstance(model, Bert) and model.num_labels == 3
    assert set(variables) == {"params"}
    data = _expected("tiny_bert")
    batch = {k: jnp.asarray(data[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = _apply(model, variables, batch)
    np.testing.assert_allclose(np.asarray(logits), data["logits"], atol=1e-4, rtol=0)
    # The mask matters: without it the padded row's logits change.
    unmasked = _apply(
        model, variables, {**batch, "attention_mask": jnp.ones_like(batch["input_ids"])}
    )
    assert np.abs(np.asarray(unmasked)[1] - data["logits"][1]).max() > 1e-3


def test_vit_matches_pytorch():
    model, variables = load_hf_encoder(FIXTURES / "tiny_vit")
    assert isinstance(model, ViT) and model.num_labels == 5
    data = _expected("tiny_vit")
    images = jnp.asarray(data["pixel_values"]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    logits = _apply(model, variables, images)
    np.testing.assert_allclose(np.asarray(logits), data["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "layer_type", "num_labels"),
    [("tiny_resnet", "bottleneck", 4), ("tiny_resnet_basic", "basic", 3)],
)
def test_resnet_matches_pytorch(name, layer_type, num_labels):
    model, variables = load_hf_encoder(FIXTURES / name)
    assert isinstance(model, ResNet)
    assert (model.layer_type, model.num_labels) == (layer_type, num_labels)
    assert set(variables) == {"params", "batch_stats"}
    data = _expected(name)
    images = jnp.asarray(data["pixel_values"]).transpose(0, 2, 3, 1)
    logits = _apply(model, variables, images)
    np.testing.assert_allclose(np.asarray(logits), data["logits"], atol=1e-4, rtol=0)


def test_resnet_training_mode_updates_batch_stats():
    model, variables = load_hf_encoder(FIXTURES / "tiny_resnet")
    images = jnp.asarray(_expected("tiny_resnet")["pixel_values"]).transpose(0, 2, 3, 1)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    logits, updates = apply(variables, images, train=True, mutable=("batch_stats",))
    assert logits.shape == (2, 4)
    old, new = tree.flatten(variables["batch_stats"]), tree.flatten(updates["batch_stats"])
    assert old.keys() == new.keys()
    assert all(np.abs(np.asarray(new[k]) - old[k]).max() > 0 for k in old)


def test_mismatched_shape_names_the_tensor(tmp_path):
    src = FIXTURES / "tiny_bert"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    tensors = load_file(str(src / "model.safetensors"))
    bad = "bert.encoder.layer.1.intermediate.dense.weight"
    tensors[bad] = tensors[bad][:, :-1].copy()  # (37, 32) -> (37, 31)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(HFImportError) as err:
        load_hf_encoder(tmp_path)
    message = str(err.value)
    assert "\n" not in message  # one line, as the CLI prints it
    assert bad in message and "(37, 31)" in message
    assert "layer_1/intermediate/kernel" in message and "(32, 37)" in message


def test_missing_and_unexpected_tensors_are_named():
    tensors = load_file(str(FIXTURES / "tiny_bert" / "model.safetensors"))
    config = json.loads((FIXTURES / "tiny_bert" / "config.json").read_text())
    model = Bert.from_hf_config(config)
    head = {k: tensors.pop(k) for k in ("classifier.weight", "classifier.bias")}
    with pytest.raises(
        HFImportError, match=r"lacks 2 parameter.*classifier/bias.*classifier/kernel"
    ):
        model_variables(model, tensors, config, fresh=())  # every leaf required
    stray = {**tensors, "bert.encoder.layer.1.output.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(HFImportError, match=r"unknown tensor.*'bert.encoder.layer.1.output.extra"):
        model_variables(model, stray, config)
    # A new head keeps its fresh init; BERT's pre-training heads are dropped, both noted.
    tensors["cls.predictions.bias"] = np.zeros(99, np.float32)
    variables, notes = model_variables(model, tensors, config)
    kernel = variables["params"]["classifier"]["kernel"]
    assert kernel.shape == head["classifier.weight"].T.shape
    assert not np.allclose(kernel, head["classifier.weight"].T)
    assert "initialised classifier/kernel fresh (not in the checkpoint)" in notes
    assert any("'cls.predictions.bias'" in n for n in notes)


def _bert_batch():
    data = _expected("tiny_bert")
    return {k: jnp.asarray(data[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_bert_dropout_from_config_only_in_training():
    model, variables = load_hf_encoder(FIXTURES / "tiny_bert")
    assert model.hidden_dropout == 0.1  # from config.json
    batch = _bert_batch()
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply(variables, batch, train=True, rngs={"dropout": jax.random.key(1)})
    b = apply(variables, batch, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    quiet = model.clone(hidden_dropout=0.0, attention_dropout=0.0)
    quiet_apply = jax.jit(quiet.apply, static_argnames="train")
    np.testing.assert_allclose(
        quiet_apply(variables, batch, train=True, rngs={"dropout": jax.random.key(1)}),
        quiet_apply(variables, batch, train=False),
        atol=1e-6,
    )


def test_lora_and_partial_methods_find_bert_layers():
    model, variables = load_hf_encoder(FIXTURES / "tiny_bert")
    params = variables["params"]
    cfg = base_config().method
    cfg.name = "lora"
    cfg.lora.rank = 2
    cfg.lora.targets = (r"attention/(query|value)/kernel",)
    cfg.trainable = (r"^classifier/",)
    m = build_method(cfg, params)
    assert m.lora_targets == tuple(
        f"layer_{i}/attention/{n}/kernel" for i in range(2) for n in ("query", "value")
    )
    trainable, frozen = m.split(params, jax.random.key(0))
    batch = _bert_batch()
    with jax.default_matmul_precision("highest"):
        base = model.apply(variables, batch)
        np.testing.assert_array_equal(m.apply(model, trainable, frozen, batch, train=False), base)
        keys = iter(jax.random.split(jax.random.key(1), 16))
        trainable = jax.tree.map(
            lambda v: v + 0.3 * jax.random.normal(next(keys), v.shape), trainable
        )
        factored = m.apply(model, trainable, frozen, batch, train=False)
        merged = model.apply({"params": m.merged_params(trainable, frozen)}, batch)
    assert np.abs(np.asarray(factored - base)).max() > 1e-3
    np.testing.assert_allclose(factored, merged, atol=1e-5)
    cfg = base_config().method
    cfg.name = "partial"
    cfg.partial.last_k = 1
    chosen = build_method(cfg, params).trained
    assert chosen and all(p.startswith("layer_1/") for p in chosen)
