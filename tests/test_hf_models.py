"""``model.name = "hf"``: a pretrained Hugging Face directory named in the config becomes the
model and its starting weights, with a new head when the task needs other outputs."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import tree
from ftlab.config import ConfigError
from ftlab.interop.build import build_hf_model, load_hf_variables
from ftlab.interop.pretrained import load_pretrained
from ftlab.schema import base_config

FIXTURES = Path(__file__).parent / "fixtures"


def _model_cfg(name: str, **hf_config):
    c = base_config().model
    c.name = "hf"
    c.pretrained = str(FIXTURES / name)
    c.hf_config = hf_config
    return c


def _flat(variables) -> dict:
    return {k: np.asarray(v) for k, v in tree.flatten(variables).items()}


def test_decoder_classifier_keeps_the_backbone_and_gets_a_fresh_score_head():
    cfg = _model_cfg("tiny_gpt2")
    model = build_hf_model(cfg, "classification", 4, jnp.float32)
    sample = jnp.zeros((1, 5), jnp.int32)
    variables, notes = load_hf_variables(cfg, model, sample, jax.random.key(0))
    got = _flat(variables["params"])
    want = _flat(load_pretrained(FIXTURES / "tiny_gpt2").params)
    assert got["score/kernel"].shape[-1] == 4 and np.abs(got["score/kernel"]).sum() > 0
    assert any("score" in n for n in notes)
    for path, value in want.items():
        if not path.startswith("lm_head"):
            np.testing.assert_array_equal(got[path], value, err_msg=path)


@pytest.mark.parametrize("classes, head_kept", [(5, True), (10, False)])
def test_encoder_head_is_kept_only_when_the_classes_fit(classes, head_kept):
    cfg = _model_cfg("tiny_vit")
    model = build_hf_model(cfg, "classification", classes, jnp.float32)
    sample = jnp.zeros((1, 16, 16, 3), jnp.float32)
    variables, notes = load_hf_variables(cfg, model, sample, jax.random.key(1))
    got = _flat(variables["params"])
    want = _flat(load_pretrained(FIXTURES / "tiny_vit").params)
    for path, value in want.items():
        if path.startswith("classifier/") and not head_kept:
            assert got[path].shape[-1] == classes
            continue
        np.testing.assert_array_equal(got[path], value, err_msg=path)
    assert bool(notes) != head_kept  # dropping the checkpoint's head is reported


def test_unknown_model_type_and_lm_head_on_an_encoder_name_the_key():
    c = base_config().model
    c.name = "hf"
    c.hf_config = {"model_type": "mamba_x"}  # no family builds it
    with pytest.raises(ConfigError, match="config.model.hf_config.model_type"):
        build_hf_model(c, "classification", 2, jnp.float32)
    with pytest.raises(ConfigError, match="no causal-LM head"):
        build_hf_model(_model_cfg("tiny_bert"), "causal_lm", 0, jnp.float32)
