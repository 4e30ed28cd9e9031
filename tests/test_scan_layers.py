"""``scan_layers=True``: one ``nn.scan`` over the blocks computes what the unrolled model does.

The per-layer trees of the tiny fixtures are converted with ``stack_layers`` and run through the
scanned model (remat off and on); logits and gradients are compared in float32.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import tree
from ftlab.interop.pretrained import load_pretrained
from ftlab.models.layers import stack_layers, unstack_layers

FIXTURES = Path(__file__).parent / "fixtures"
LAYERS = {"tiny_gpt2": "h", "tiny_llama": "layers", "tiny_bert": "layer", "tiny_vit": "layer"}


def _model_params_batch(name):
    data = dict(np.load(FIXTURES / name / "inputs_logits.npz"))
    if name in ("tiny_gpt2", "tiny_llama"):
        p = load_pretrained(FIXTURES / name)
        batch = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
        return p.model, p.params, batch
    p = load_pretrained(FIXTURES / name)
    model, variables = p.model, p.variables
    if name == "tiny_vit":
        return model, variables["params"], jnp.asarray(data["pixel_values"]).transpose(0, 2, 3, 1)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return model, variables["params"], {k: data[k] for k in keys}


def _no_dropout(model):
    """Dropout off, so that train=True (the remat path) is deterministic in both layouts."""
    if hasattr(model, "config"):  # decoders: the rates live in the HF-style config
        cfg = model.config
        rates = {
            f: 0.0
            for f in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout", "dropout")
            if hasattr(cfg, f)
        }
        return model.clone(config=type(cfg)(**{**cfg.__dict__, **rates}))
    return model.clone(hidden_dropout=0.0, attention_dropout=0.0)


def _logits(model, params, batch):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.apply)({"params": params}, batch))


def _grads(model, params, batch):
    def loss(p):
        out = model.apply({"params": p}, batch, train=True)
        return jnp.sum(jnp.sin(out))

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.grad(loss))(params)


# ViT's layer stack differs from BERT's only in broadcasting no bias: forward checked only
@pytest.mark.parametrize(
    ("name", "backward"),
    [("tiny_gpt2", True), ("tiny_llama", True), ("tiny_bert", True), ("tiny_vit", False)],
)
def test_scanned_model_computes_the_unrolled_function(name, backward):
    model, params, batch = _model_params_batch(name)
    layer = LAYERS[name]
    stacked = stack_layers(params)
    assert layer in stacked and not any(k.startswith(f"{layer}_") for k in stacked)
    assert tree.count(stacked) == tree.count(params)

    # the stacked tree is exactly the tree a scanned model initialises (paths and shapes)
    scanned = model.clone(scan_layers=True)
    sample = jax.tree.map(lambda x: x[:1], batch)
    boxed = jax.eval_shape(lambda: scanned.init(jax.random.key(0), sample))["params"]
    shapes = {k: v.shape for k, v in tree.flatten(nn.meta.unbox(boxed)).items()}
    assert shapes == {k: np.shape(v) for k, v in tree.flatten(stacked).items()}
    # ... with the layer axis named for sharding rules
    names = {k: v.names for k, v in tree.flatten(boxed).items() if k.startswith(f"{layer}/")}
    assert names and all(n[0] == "layers" for n in names.values())

    reference = _logits(model, params, batch)
    got = _logits(scanned, stacked, batch)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    assert np.abs(reference).max() > 1e-2  # not a trivially zero comparison

    if not backward:
        return
    # the backward pass too, through the scanned + rematerialised blocks (remat only changes
    # what the backward pass recomputes, so the forward logits above cover remat=False)
    quiet = _no_dropout(model)
    want = tree.flatten(stack_layers(jax.device_get(_grads(quiet, params, batch))))
    got = tree.flatten(_grads(quiet.clone(scan_layers=True, remat=True), stacked, batch))
    assert got.keys() == want.keys()
    assert max(np.abs(v).max() for v in want.values()) > 1e-3
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=1e-4, err_msg=k)


def test_stack_unstack_round_trip_is_exact():
    _, params, _ = _model_params_batch("tiny_llama")
    params = jax.device_get(params)  # numpy leaves
    stacked = stack_layers(params)
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    np.testing.assert_array_equal(
        stacked["layers"]["mlp"]["up_proj"]["kernel"][1],
        params["layers_1"]["mlp"]["up_proj"]["kernel"],
    )
    back = unstack_layers(stacked)
    a, b = tree.flatten(params), tree.flatten(back)
    assert a.keys() == b.keys()
    assert all(np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k]) for k in a)
    assert all(type(v) is np.ndarray for v in b.values())  # numpy in, numpy out

    # jax arrays stack with jax
    jstacked = stack_layers(jax.tree.map(jnp.asarray, params), "layers")
    assert isinstance(jstacked["layers"]["mlp"]["up_proj"]["kernel"], jax.Array)
    np.testing.assert_array_equal(
        jstacked["layers"]["mlp"]["up_proj"]["kernel"],
        stacked["layers"]["mlp"]["up_proj"]["kernel"],
    )


def test_scanned_decoding_and_layer_scaling_are_refused():
    model, _, _ = _model_params_batch("tiny_gpt2")
    scanned = model.clone(scan_layers=True)
    ids = jnp.zeros((1, 4), jnp.int32)

    def init(m, **kw):
        return jax.eval_shape(lambda: m.init(jax.random.key(0), ids, **kw))

    with pytest.raises(ValueError, match="decode=True.*scan_layers=False"):
        init(scanned, decode=True)
    cfg = model.config
    by_layer = type(cfg)(**{**cfg.__dict__, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        init(scanned.clone(config=by_layer))
    # the unrolled model still decodes
    assert "h_0" in init(model, decode=True)["cache"]


def test_conversion_errors_name_the_problem():
    _, params, _ = _model_params_batch("tiny_gpt2")
    bad = dict(params)
    bad["h_1"] = jax.tree.map(lambda x: x, params["h_1"])
    bad["h_1"]["ln_1"] = {"scale": np.ones(5, np.float32), "bias": params["h_1"]["ln_1"]["bias"]}
    with pytest.raises(ValueError, match=r"h_1/ln_1/scale has shape \(5,\)"):
        stack_layers(bad)
    gap = {k: v for k, v in params.items() if k != "h_0"}
    with pytest.raises(ValueError, match=r"indices \[1\] are not 0..0"):
        stack_layers(gap)
    with pytest.raises(ValueError, match="pass name="):
        stack_layers({**params, "block_0": params["h_0"]})
    with pytest.raises(ValueError, match="no scanned subtree 'h'"):
        unstack_layers(params, "h")
    with pytest.raises(ValueError, match="pass name="):
        unstack_layers(params)


def test_scanned_trees_export_to_the_same_hugging_face_tensors():
    from ftlab.interop.pretrained import hf_tensors

    p = load_pretrained(FIXTURES / "tiny_llama")
    want = hf_tensors(p.params, p.hf_config)
    got = hf_tensors(stack_layers(jax.device_get(p.params)), p.hf_config)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
