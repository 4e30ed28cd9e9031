"""One loader and one exporter for every family, NHWC images for every vision model, and the
pieces that make them (tables both ways, hub module without model code). No torch needed: the
fixtures were written by transformers' PyTorch models (tests/fixtures/make_*_fixtures.py)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ftlab import tree
from ftlab.interop.errors import HFExportError, HFImportError
from ftlab.interop.family import families
from ftlab.interop.pretrained import Pretrained, export_hf, hf_tensors, load_pretrained
from ftlab.interop.table import LINEAR, Entry, Renames, Table, split
from ftlab.models.cnn import SmallCNN
from ftlab.models.resnet import ResNet
from ftlab.models.vit import ViT

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = {
    "tiny_gpt2": "gpt2",
    "tiny_llama": "llama",
    "tiny_bert": "bert",
    "tiny_vit": "vit",
    "tiny_resnet": "resnet",
    "tiny_resnet_basic": "resnet",
}
_CACHE = {}


def loaded(name):
    if name not in _CACHE:
        _CACHE[name] = load_pretrained(FIXTURES / name)
    return _CACHE[name]


def test_every_family_is_known():
    assert {"bert", "gpt2", "llama", "resnet", "vit"} <= set(families())


@pytest.mark.parametrize("name", FAMILIES)
def test_one_loader_and_one_exporter_for_every_family(name, tmp_path):
    p = loaded(name)
    config = json.loads((FIXTURES / name / "config.json").read_text())
    assert isinstance(p, Pretrained) and p.hf_config == config and p.notes == []
    assert p.hf_config["model_type"] == FAMILIES[name]
    assert set(p.variables) == ({"params", "batch_stats"} if "resnet" in name else {"params"})

    out = export_hf(tmp_path / "out", p.params, p.hf_config, model_state=p.model_state)
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k

    again = load_pretrained(out)
    assert again.model == p.model
    a, b = tree.flatten(again.variables), tree.flatten(p.variables)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bare_backbone_and_other_heads_through_the_same_loader():
    vit = load_pretrained(FIXTURES / "tiny_vit", head="none")
    assert vit.model.num_labels == 0 and "classifier" not in vit.params
    assert any("dropped" in n and "classifier" in n for n in vit.notes)
    # a head for other classes is named (the trainer's load_hf_variables replaces it instead)
    with pytest.raises(HFImportError, match=r"'classifier.bias'.*\(3,\).*\(7,\)"):
        load_pretrained(FIXTURES / "tiny_bert", num_labels=7)


def test_resnet_needs_its_batch_statistics_to_export():
    p = loaded("tiny_resnet")
    with pytest.raises(HFExportError, match=r"takes model_state=\{'batch_stats': \.\.\.\}"):
        hf_tensors(p.params, p.hf_config)


def _pixels(name):
    return np.load(FIXTURES / name / "inputs_logits.npz")


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_resnet"])
def test_vision_models_take_nchw_pixels_by_their_channel_count(name):
    p, data = loaded(name), _pixels(name)
    nchw = data["pixel_values"]  # (batch, 3, height, width), as HF's processors give
    apply = jax.jit(p.model.apply)
    with jax.default_matmul_precision("highest"):
        from_nchw = np.asarray(apply(p.variables, nchw))
        from_nhwc = np.asarray(apply(p.variables, nchw.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(from_nchw, from_nhwc)
    np.testing.assert_allclose(from_nchw, data["logits"], atol=1e-4, rtol=0)


def test_images_of_unknown_layout_are_refused_and_the_small_cnn_transposes():
    for model in (
        ResNet(depths=(1,), hidden_sizes=(4,), embedding_size=4, num_channels=3),
        ViT(
            image_size=8,
            patch_size=4,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            mlp_size=8,
            num_channels=3,
        ),
    ):
        images = jnp.zeros((2, 5, 8, 8))  # 5 channels first or last: neither is 3
        with pytest.raises(ValueError, match=r"NHWC images with 3 channels .*\(2, 5, 8, 8\)"):
            model.init(jax.random.key(0), images)
    cnn = SmallCNN(3, features=(4,), hidden=())
    grey = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
    variables = cnn.init(jax.random.key(0), grey)
    np.testing.assert_array_equal(
        cnn.apply(variables, grey.transpose(0, 3, 1, 2)), cnn.apply(variables, grey)
    )


def test_one_table_gives_both_directions():
    table = Table(
        [
            Entry("h.{i}.qkv.weight", ("h_{i}/q/kernel", "h_{i}/k/kernel"), split(-1)),
            Entry("h.{i}.{n:ln_1|ln_2}.weight", "h_{i}/{n}/scale"),
            Entry("head.weight", "head/kernel", LINEAR, head=True),
        ]
    )
    rng = np.random.default_rng(0)
    hf = {
        "base.h.3.qkv.weight": rng.normal(size=(4, 6)),
        "base.h.3.ln_2.weight": rng.normal(size=4),
        "head.weight": rng.normal(size=(2, 4)),
    }
    flat = {}
    for name, array in hf.items():
        flat.update(table.to_ftlab(name.removeprefix("base."), array))
    assert sorted(flat) == ["h_3/k/kernel", "h_3/ln_2/scale", "h_3/q/kernel", "head/kernel"]
    np.testing.assert_array_equal(flat["head/kernel"], hf["head.weight"].T)
    back = table.to_hf(flat, prefix="base.")
    assert back.keys() == hf.keys()
    assert all(np.array_equal(back[k], hf[k]) for k in hf)
    assert table.to_ftlab("h.3.ln_3.weight", hf["base.h.3.ln_2.weight"]) is None
    with pytest.raises(KeyError, match="h_3/q/kernel"):  # its fused partner is missing
        table.to_hf({"h_3/q/kernel": flat["h_3/q/kernel"]})
    with pytest.raises(ValueError, match="'h.0.qkv.weight'.*does not split"):
        table.to_ftlab("h.0.qkv.weight", np.zeros((4, 5)))

    names = Renames([("encoder.layer.{i}.attention.query", "layers.{i}.q_proj")])
    assert names.to_memory("encoder.layer.1.attention.query") == "layers.1.q_proj"
    assert names.to_checkpoint("layers.1.q_proj") == "encoder.layer.1.attention.query"
    assert names.to_memory("classifier") == "classifier"


def test_hub_module_imports_no_model_code():
    code = (
        "import sys, ftlab.interop.hub, ftlab.data.text, ftlab.data.tables\n"
        "bad = [m for m in sys.modules if m.startswith('ftlab.models')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
