"""Exact parameter counts of the encoder zoo at full size, from shapes alone (no weights).

Configs are transformers' own config classes (no download); the counts are those of the
PyTorch models (``sum(p.numel() for p in model.parameters())``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import BertConfig, ResNetConfig, ViTConfig

from ftlab import tree
from ftlab.models.bert import Bert
from ftlab.models.resnet import ResNet
from ftlab.models.vit import ViT


def _vit_config(image, patch, hidden, layers, heads, mlp, labels):
    return ViTConfig(
        image_size=image,
        patch_size=patch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        num_labels=labels,
    )


def _variables(model, sample):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), sample))


def _axes(boxed):
    """Every parameter carries logical axis names, one per dimension."""
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape), (leaf.names, leaf.value.shape)
    return {name for leaf in leaves for name in leaf.names if name}


def test_bert_base_count_and_paths():
    model = Bert.from_hf_config(BertConfig(), num_labels=0)  # encoder + pooler, no head
    variables = _variables(model, jnp.zeros((1, 16), jnp.int32))
    params = nn.meta.unbox(variables["params"])
    assert tree.count(params) == 109_482_240
    paths = tree.flatten(params)
    assert paths["layer_11/attention/query/kernel"].shape == (768, 768)
    assert paths["layer_0/intermediate/kernel"].shape == (768, 3072)
    assert "pooler/kernel" in paths and not any(p.startswith("classifier") for p in paths)
    assert _axes(variables["params"]) >= {"vocab", "embed", "heads", "mlp"}
    # A 2-class head adds 768 * 2 + 2.
    with_head = Bert.from_hf_config(BertConfig(num_labels=2))
    shapes = _variables(with_head, jnp.zeros((1, 16), jnp.int32))
    assert tree.count(nn.meta.unbox(shapes["params"])) == 109_482_240 + 1538


def test_vit_b16_count_and_paths():
    model = ViT.from_hf_config(_vit_config(224, 16, 768, 12, 12, 3072, 1000))
    variables = _variables(model, jnp.zeros((1, 224, 224, 3)))
    params = nn.meta.unbox(variables["params"])
    assert tree.count(params) == 86_567_656
    paths = tree.flatten(params)
    assert paths["embeddings/position"].shape == (1, 197, 768)
    assert paths["layer_11/mlp/fc1/kernel"].shape == (768, 3072)
    assert paths["classifier/kernel"].shape == (768, 1000)
    assert _axes(variables["params"]) >= {"embed", "heads", "mlp", "conv_in", "classes"}


def test_resnet50_count_and_paths():
    model = ResNet.from_hf_config(ResNetConfig(num_labels=1000))
    assert model.depths == (3, 4, 6, 3)
    variables = _variables(model, jnp.zeros((1, 224, 224, 3)))
    params = nn.meta.unbox(variables["params"])
    assert tree.count(params) == 25_557_032
    paths = tree.flatten(params)
    # v1.5: the stride of a downsampling block sits on its 3x3 conv.
    assert paths["stage_1/block_3/conv_1/kernel"].shape == (3, 3, 128, 128)
    assert paths["stage_3/block_15/conv_2/kernel"].shape == (1, 1, 512, 2048)
    assert set(tree.flatten(variables["batch_stats"])) == {
        p.rsplit("/", 1)[0] + "/" + s
        for p in paths
        if p.endswith("/scale")
        for s in ("mean", "var")
    }
    assert _axes(variables["params"]) >= {"conv_in", "conv_out", "classes"}


def test_resnet18_basic_blocks_count():
    config = ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=1000
    )
    model = ResNet.from_hf_config(config)
    variables = _variables(model, jnp.zeros((1, 224, 224, 3)))
    assert tree.count(nn.meta.unbox(variables["params"])) == 11_689_512  # torchvision resnet18


def test_compute_dtype_keeps_float32_params():
    model = ViT.from_hf_config(_vit_config(8, 4, 16, 1, 2, 32, 3), dtype=jnp.bfloat16)
    assert (model.num_layers, model.mlp_size, model.hidden_dropout) == (1, 32, 0.0)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    params = nn.meta.unbox(variables["params"])
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype("float32")}
    logits = jax.jit(model.apply)({"params": params}, jnp.ones((2, 8, 8, 3)))
    assert logits.dtype == jnp.bfloat16 and logits.shape == (2, 3)
