"""Exact parameter counts of real decoder configs, from shapes alone (``jax.eval_shape``).

Configs are built with transformers' config classes (no download, no weights allocated).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import transformers

from ftlab import tree
from ftlab.methods import build_method, select
from ftlab.models.gpt2 import GPT2, LOGICAL_AXES, GPT2Config
from ftlab.models.llama import Llama, LlamaConfig, rope_frequencies
from ftlab.schema import base_config


def boxed_shapes(model):
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])


def llama_hf(hidden, layers, heads, mlp, vocab, **fields):
    """A ``transformers.LlamaConfig`` of the given widths and depth (other fields as given)."""
    return transformers.LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp,
        vocab_size=vocab,
        **fields,
    )


def method_config(name, **fields):
    cfg = base_config().method
    cfg.name = name
    for key, value in fields.items():
        section, attr = key.split("__")
        cfg[section][attr] = value
    return cfg


def trainable_count(cfg, shapes):
    method = build_method(cfg, shapes)
    trainable, _ = jax.eval_shape(lambda p: method.split(p, jax.random.key(0)), shapes)
    return tree.count(trainable), trainable


@pytest.fixture(scope="module")
def gpt2_medium():
    hf = transformers.GPT2Config(
        n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024
    )
    boxed = boxed_shapes(GPT2(GPT2Config.from_hf_config(hf)))
    return boxed, nn.meta.unbox(boxed)


@pytest.fixture(scope="module")
def llama_7b():
    hf = llama_hf(4096, 32, 32, 11008, 32000, tie_word_embeddings=False)
    boxed = boxed_shapes(Llama(LlamaConfig.from_hf_config(hf)))
    return boxed, nn.meta.unbox(boxed)


def test_gpt2_medium_count_and_paths(gpt2_medium):
    _, shapes = gpt2_medium
    assert tree.count(shapes) == 354_823_168  # tied head: wte counted once
    flat = tree.flatten(shapes)
    assert "lm_head/kernel" not in flat
    assert flat["wte/embedding"].shape == (50257, 1024)
    assert flat["wpe/embedding"].shape == (1024, 1024)
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        assert flat[f"h_0/attn/{name}/kernel"].shape == (1024, 1024)
        assert flat[f"h_23/attn/{name}/bias"].shape == (1024,)
    assert flat["h_0/mlp/c_fc/kernel"].shape == (1024, 4096)
    assert flat["h_0/mlp/c_proj/kernel"].shape == (4096, 1024)
    assert {"h_0/ln_1/scale", "h_0/ln_2/bias", "ln_f/scale", "ln_f/bias"} <= set(flat)
    assert all(v.dtype == jnp.float32 for v in flat.values())


def test_gpt2_medium_lora_q_v(gpt2_medium):
    _, shapes = gpt2_medium
    cfg = method_config("lora", lora__rank=4, lora__targets=(r"attn/(q|v)_proj/kernel",))
    n, trainable = trainable_count(cfg, shapes)
    assert n == 393_216  # 24 layers * 2 kernels * (1024*4 + 4*1024)
    lora = tree.flatten(trainable["lora"])
    assert len(lora) == 24 * 2 * 2
    assert lora["h_5/attn/v_proj/kernel/a"].shape == (1024, 4)
    assert lora["h_5/attn/v_proj/kernel/b"].shape == (4, 1024)


def test_gpt2_medium_top_two_blocks(gpt2_medium):
    _, shapes = gpt2_medium
    pattern = base_config().method.partial.block_pattern
    assert select.block_index("h_12/attn/q_proj/kernel", pattern) == 12
    assert select.block_index("ln_f/scale", pattern) is None
    assert select.block_index("wte/embedding", pattern) is None
    n, trainable = trainable_count(method_config("partial", partial__last_k=2), shapes)
    assert n == 25_192_448  # 2 * 12,596,224
    assert sorted(trainable["params"]) == ["h_22", "h_23"]


def test_llama_7b_count_and_lora(llama_7b):
    _, shapes = llama_7b
    assert tree.count(shapes) == 6_738_415_616
    flat = tree.flatten(shapes)
    assert flat["embed_tokens/embedding"].shape == (32000, 4096)
    assert flat["lm_head/kernel"].shape == (4096, 32000)
    assert flat["layers_31/self_attn/o_proj/kernel"].shape == (4096, 4096)
    assert flat["layers_0/mlp/gate_proj/kernel"].shape == (4096, 11008)
    assert flat["layers_0/mlp/down_proj/kernel"].shape == (11008, 4096)
    assert flat["layers_0/input_layernorm/scale"].shape == (4096,)
    assert flat["norm/scale"].shape == (4096,)
    assert not any(p.endswith("/bias") for p in flat)
    pattern = base_config().method.partial.block_pattern
    assert select.block_index("layers_7/mlp/up_proj/kernel", pattern) == 7
    cfg = method_config("lora", lora__rank=8, lora__targets=(r"self_attn/(q|v)_proj/kernel",))
    assert trainable_count(cfg, shapes)[0] == 4_194_304


def test_logical_axes_on_every_weight(gpt2_medium, llama_7b):
    def axes(boxed):
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
        out = {}
        for path, box in tree.flatten(boxed).items():
            assert len(box.names) == box.value.ndim, path
            assert set(box.names) <= set(LOGICAL_AXES), (path, box.names)
            out[path] = box.names
        return out

    g = axes(gpt2_medium[0])
    assert g["wte/embedding"] == ("vocab", "embed")
    assert g["wpe/embedding"] == ("positions", "embed")
    assert g["h_0/attn/q_proj/kernel"] == ("embed", "heads")
    assert g["h_0/attn/k_proj/kernel"] == ("embed", "kv_heads")
    assert g["h_0/attn/c_proj/kernel"] == ("heads", "embed")
    assert g["h_0/mlp/c_fc/kernel"] == ("embed", "mlp")
    assert g["h_0/mlp/c_fc/bias"] == ("mlp",)
    assert g["ln_f/scale"] == ("embed",)
    m = axes(llama_7b[0])
    assert m["lm_head/kernel"] == ("embed", "vocab")
    assert m["layers_0/self_attn/v_proj/kernel"] == ("embed", "kv_heads")
    assert m["layers_0/mlp/down_proj/kernel"] == ("mlp", "embed")
    assert m["norm/scale"] == ("embed",)


def test_gqa_tied_and_classifier_shapes():
    hf = llama_hf(64, 1, 8, 96, 50, num_key_value_heads=2, tie_word_embeddings=True, num_labels=5)
    cfg = LlamaConfig.from_hf_config(hf)
    assert (cfg.kv_heads, cfg.dim, cfg.num_labels) == (2, 8, 5)
    lm = tree.flatten(nn.meta.unbox(boxed_shapes(Llama(cfg))))
    assert lm["layers_0/self_attn/k_proj/kernel"].shape == (64, 16)
    assert lm["layers_0/self_attn/q_proj/kernel"].shape == (64, 64)
    assert "lm_head/kernel" not in lm
    clf = tree.flatten(nn.meta.unbox(boxed_shapes(Llama(cfg, head="classifier"))))
    assert clf["score/kernel"].shape == (64, 5)
    g = GPT2Config.from_hf_config(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, tie_word_embeddings=False)
    )
    untied = tree.flatten(nn.meta.unbox(boxed_shapes(GPT2(g))))
    assert untied["lm_head/kernel"].shape == (32, 50257)


def test_config_parsing():
    g = GPT2Config.from_hf_config({"n_embd": 64, "n_head": 4, "n_inner": None}, embd_pdrop=0.0)
    assert (g.inner, g.head_dim, g.embd_pdrop, g.tie_word_embeddings) == (256, 16, 0.0, True)
    old = LlamaConfig.from_hf_config(
        {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "rope_theta": 1e6,
            "rope_scaling": {"type": "linear", "factor": 2.0},
        }
    )
    assert old.rope_theta == 1e6 and old.rope_type == "linear"
    unscaled = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=1e6)
    assert rope_frequencies(old) == pytest.approx(rope_frequencies(unscaled) / 2.0)
    new = LlamaConfig.from_hf_config(
        transformers.LlamaConfig(hidden_size=64, num_attention_heads=4)
    )
    assert new.rope_theta == 10000.0 and new.rope_type == "default"
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_hf_config(
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}
        )
    with pytest.raises(ValueError, match="not a multiple"):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
