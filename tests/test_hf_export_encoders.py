"""BERT / ViT / ResNet export to Hugging Face directories, and copying tokenizer files.

Import -> export gives back the fixtures' safetensors bit for bit (names, shapes, dtypes, values,
BatchNorm statistics and counters included); export -> import gives back the same variables and
logits. No torch needed: the fixtures were written by transformers' PyTorch models.
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from ftlab import tree
from ftlab.interop.errors import HFExportError
from ftlab.interop.pretrained import export_hf, hf_config_for, hf_tensors, load_pretrained
from ftlab.models.resnet import ResNet

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("tiny_bert", "tiny_vit", "tiny_resnet", "tiny_resnet_basic")
_CACHE = {}


def load_hf_encoder(path, **overrides):
    p = load_pretrained(path, **overrides)
    return p.model, p.variables


def loaded(name):
    if name not in _CACHE:
        p = load_pretrained(FIXTURES / name)
        _CACHE[name] = p.model, p.variables, p.hf_config
    return _CACHE[name]


def split(variables):
    params = variables["params"]
    return params, {k: v for k, v in variables.items() if k != "params"}


def inputs(name):
    data = dict(np.load(FIXTURES / name / "inputs_logits.npz"))
    if name == "tiny_bert":
        batch = {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    else:
        batch = jnp.asarray(data["pixel_values"]).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return batch, data["logits"]


def outputs(model, variables, batch):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(model.apply)(variables, batch))


def assert_same_variables(a, b):
    a, b = tree.flatten(a), tree.flatten(b)
    assert a.keys() == b.keys()
    for k in a:
        assert np.shape(a[k]) == np.shape(b[k]) and np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_the_fixture_and_reimports_exactly(name, tmp_path):
    model, variables, config = loaded(name)
    params, state = split(variables)
    out = export_hf(tmp_path / "export", params, config, model_state=state)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == config

    original = load_file(str(FIXTURES / name / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == original.keys()
    for k, v in original.items():  # names, shapes, dtypes (int64 counters too) and values
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        assert np.array_equal(exported[k], v), k
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}

    model2, variables2 = load_hf_encoder(out)
    assert model2 == model
    assert_same_variables(variables2, variables)
    batch, torch_logits = inputs(name)
    logits = outputs(model2, variables2, batch)
    np.testing.assert_array_equal(logits, outputs(model, variables, batch))
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=0)


def test_bare_backbones_are_written_without_the_task_prefix(tmp_path):
    model, variables, config = loaded("tiny_bert")
    params = {k: v for k, v in variables["params"].items() if k != "classifier"}
    bare = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    bare["architectures"] = ["BertModel"]
    out = export_hf(tmp_path / "bert", params, bare)
    names = set(load_file(str(out / "model.safetensors")))
    assert "pooler.dense.weight" in names and "encoder.layer.1.output.dense.bias" in names
    assert not any(n.startswith(("bert.", "classifier")) for n in names)
    backbone, again = load_hf_encoder(out)  # architectures say BertModel: no classifier
    assert_same_variables(again["params"], params)
    batch, _ = inputs("tiny_bert")
    pooled = outputs(backbone, again, batch)
    assert pooled.shape == (3, 32)
    np.testing.assert_array_equal(pooled, outputs(model.clone(num_labels=0), again, batch))

    model, variables, config = loaded("tiny_resnet")
    params = {k: v for k, v in variables["params"].items() if k != "classifier"}
    bare = {**config, "architectures": ["ResNetModel"]}
    tensors = hf_tensors(params, bare, model_state={"batch_stats": variables["batch_stats"]})
    prefixed = set(load_file(str(FIXTURES / "tiny_resnet" / "model.safetensors")))
    assert set(tensors) == {
        n.removeprefix("resnet.") for n in prefixed if not n.startswith("classifier")
    }


def test_refuses_non_empty_directory_and_bad_inputs(tmp_path):
    _, variables, config = loaded("tiny_resnet")
    params, state = split(variables)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(HFExportError, match=r"taken.*non-empty directory"):
        export_hf(out, params, config, model_state=state)
    assert [f.name for f in out.iterdir()] == ["notes.txt"]

    target = tmp_path / "never"
    with pytest.raises(HFExportError, match=r"batch_stats"):  # running statistics are needed
        export_hf(target, params, config)
    with pytest.raises(HFExportError, match=r"5 labels .* 4 outputs"):
        labels5 = {str(i): f"L{i}" for i in range(5)}
        export_hf(target, params, {**config, "id2label": labels5}, model_state=state)
    with pytest.raises(HFExportError, match="ResNetModel.*ResNetForImageClassification"):
        export_hf(target, params, {**config, "architectures": ["ResNetModel"]}, model_state=state)
    with pytest.raises(HFExportError, match="do not import back"):  # config and weights differ
        export_hf(target, params, {**config, "embedding_size": 16}, model_state=state)
    extra = {**params, "extra": {"kernel": np.ones((2, 2), np.float32)}}
    with pytest.raises(HFExportError, match="'extra/kernel' has no Hugging Face name"):
        export_hf(target, extra, config, model_state=state)
    with pytest.raises(HFExportError, match="source .* is not a directory"):
        export_hf(target, params, config, model_state=state, source=tmp_path / "missing")
    assert not target.exists()  # every check ran before anything was written

    _, bert_vars, bert_config = loaded("tiny_bert")
    with pytest.raises(HFExportError, match="no model_state"):
        hf_tensors(bert_vars["params"], bert_config, model_state=state)


def test_config_written_for_an_ftlab_model_round_trips(tmp_path):
    """A ResNet built in ftlab (as the trainer's ``model.name = "resnet"``) exports with
    ``hf_config_for`` and imports back to the same model and variables."""
    model = ResNet(
        depths=(1, 1), hidden_sizes=(8, 16), embedding_size=8, layer_type="basic", num_labels=3
    )
    images = np.random.default_rng(0).normal(size=(2, 20, 20, 3)).astype(np.float32)
    # random values of the right shapes (boxed, as init returns them), batch statistics
    # away from their init values as after training
    rng = np.random.default_rng(1)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images))

    def fill(path, leaf):  # params stay boxed (LogicallyPartitioned), as init returns them
        shape = leaf.value.shape if hasattr(leaf, "value") else leaf.shape
        value = rng.normal(size=shape).astype(np.float32) * 0.3
        value = np.abs(value) + 0.5 if path[-1].key == "var" else value
        return leaf.replace_boxed(value) if hasattr(leaf, "replace_boxed") else value

    variables = jax.tree_util.tree_map_with_path(
        fill, boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )
    params, stats = variables["params"], variables["batch_stats"]
    config = hf_config_for(model)
    assert config["architectures"] == ["ResNetForImageClassification"]
    out = export_hf(tmp_path / "r", params, config, model_state={"batch_stats": stats})
    again_model, again = load_hf_encoder(out)
    assert again_model == model
    plain = nn.meta.unbox(variables)
    assert_same_variables(again, plain)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(again, images), apply(plain, images))
    for name in ("tiny_bert", "tiny_vit", "tiny_resnet_basic"):  # the fixtures' models too
        fixture_model = loaded(name)[0]
        assert type(fixture_model).from_hf_config(hf_config_for(fixture_model)) == fixture_model


def _tokenizer_dir(path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(path)
    return fast


def test_tokenizer_and_generation_files_are_copied(tmp_path):
    from transformers import AutoTokenizer

    _, variables, config = loaded("tiny_bert")
    source = tmp_path / "source"
    original = _tokenizer_dir(source)
    (source / "notes.txt").write_text("not an asset")
    copied = {f.name for f in source.iterdir()} - {"notes.txt"}
    assert "tokenizer.json" in copied

    out = export_hf(tmp_path / "bert", variables["params"], config, source=source)
    assert {f.name for f in out.iterdir()} == copied | {"config.json", "model.safetensors"}
    for name in copied:
        assert (out / name).read_bytes() == (source / name).read_bytes()
    reloaded = AutoTokenizer.from_pretrained(out)
    text = ["The cats sat on the mat", "the dog sat"]
    assert reloaded(text)["input_ids"] == original(text)["input_ids"]
    assert reloaded(text)["input_ids"][1] == [2, 5, 1, 7, 3]  # [CLS] the [UNK] sat [SEP]

    # decoders copy their generation defaults the same way
    gpt2 = load_pretrained(FIXTURES / "tiny_gpt2")
    out = export_hf(tmp_path / "gpt2", gpt2.params, gpt2.hf_config, source=gpt2.path)
    assert (out / "generation_config.json").read_bytes() == (
        FIXTURES / "tiny_gpt2" / "generation_config.json"
    ).read_bytes()
