"""T5 (``ftlab.models.t5``, ``ftlab.interop.t5``) against transformers' PyTorch model.

The fixtures (tests/fixtures/tiny_t5: v1.0 relu + tied head; tiny_t5_v11: gated-gelu + untied
head; peft_t5: a LoRA q/v adapter) were written by ``tests/fixtures/make_t5_fixtures.py`` with
torch; these tests need no torch.
"""

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest
from safetensors.numpy import load_file

from ftlab import tree
from ftlab.data.text import seq2seq_arrays, text_to_text_dataset
from ftlab.eval.generate import decode_sources, generate_seq2seq
from ftlab.interop.family import get_family
from ftlab.interop.peft import export_peft_adapter, load_peft_adapter
from ftlab.interop.pretrained import export_hf, hf_tensors, load_pretrained
from ftlab.methods import build_method
from ftlab.models.layers import stack_layers
from ftlab.models.t5 import T5, T5Config, relative_position_bucket, shift_right
from ftlab.schema import base_config
from ftlab.train import losses
from ftlab.train.state import TrainState
from ftlab.train.step import make_eval_step, make_train_step

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("tiny_t5", "tiny_t5_v11")
TOL = 1e-4
_CACHE: dict = {}


def loaded(name):
    if name not in _CACHE:
        _CACHE[name] = load_pretrained(FIXTURES / name)
    return _CACHE[name]


def data(name):
    with np.load(FIXTURES / name / "inputs_logits.npz") as d:
        return dict(d)


def batch(d):
    return {k: d[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}


@functools.cache
def _apply(model):
    return jax.jit(lambda p, x: model.apply({"params": p}, x))


def forward(model, params, inputs):
    with jax.default_matmul_precision("highest"):
        return np.asarray(_apply(model)(params, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    p, d = loaded(name), data(name)
    assert p.notes == [] and isinstance(p.model, T5)
    cfg = p.model.config
    assert cfg.tie_word_embeddings == (name == "tiny_t5") and cfg.scale == (name == "tiny_t5")
    assert ("lm_head" in p.params) == (name == "tiny_t5_v11")
    logits = forward(p.model, p.params, batch(d))
    assert logits.dtype == np.float32 and logits.shape == d["logits"].shape
    assert np.abs(logits - d["logits"]).max() < TOL


def test_relative_buckets_and_shift_right():
    # HF's buckets (read off transformers' T5Attention) for the fixture's settings (8 buckets,
    # max distance 20) and the defaults (32, 128)
    rel = np.arange(-6, 7)
    encoder = [2, 2, 2, 2, 2, 1, 0, 5, 6, 6, 6, 6, 6]
    decoder = [5, 4, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0]
    assert relative_position_bucket(rel, True, 8, 20).tolist() == encoder
    assert relative_position_bucket(rel, False, 8, 20).tolist() == decoder
    far = np.array([-200, -20, 0, 20, 200])
    assert relative_position_bucket(far, True).tolist() == [15, 10, 0, 26, 31]
    labels = np.array([[5, 6, 1, -100], [7, 1, -100, -100]])
    np.testing.assert_array_equal(shift_right(labels, 0, 0), [[0, 5, 6, 1], [0, 7, 1, 0]])


def test_greedy_generation_equals_transformers_and_cached_equals_uncached():
    # v1.1 fixture: greedy ids as HF's; each step's logits, computed with the encoder run once
    # and the decoder's key/value cache, equal a full forward over [start, tokens so far]
    p, d = loaded("tiny_t5_v11"), data("tiny_t5_v11")
    steps = d["decoder_input_ids"].shape[1] - 1  # the parity test's shape: compiled once
    with jax.default_matmul_precision("highest"):
        out = generate_seq2seq(
            p.model,
            p.params,
            d["input_ids"],
            d["attention_mask"],
            max_new_tokens=steps,
            return_logits=True,
        )
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, d["greedy_ids"][:, 1 : 1 + steps])
    assert (d["greedy_ids"][:, 0] == p.model.config.decoder_start_token_id).all()
    full = forward(p.model, p.params, {**batch(d), "decoder_input_ids": d["greedy_ids"][:, :-3]})
    np.testing.assert_array_equal(d["greedy_ids"][:, 1 : 1 + steps], tokens)
    assert np.abs(np.asarray(out.logits) - full[:, :steps]).max() < 1e-5


class IdTokenizer:
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_beam_search_equals_transformers():
    # v1.0 fixture: HF's 3-beam search picks other tokens than greedy on row 1; decoded the
    # way evaluation by generation does (decode_sources: a Method, batches, text out)
    p, d = loaded("tiny_t5"), data("tiny_t5")
    assert (d["beam_ids"] != d["greedy_ids"]).any()
    cfg = base_config()
    cfg.method.name = "full"
    method = build_method(cfg.method, p.params)
    trainable, frozen = method.split(p.params, jax.random.key(0))
    cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.num_beams = 2, 8, 3
    cfg.eval.length_penalty, cfg.eval.no_repeat_ngram_size = 1.0, 0
    sources = [
        row[mask.astype(bool)].tolist() for row, mask in zip(d["input_ids"], d["attention_mask"])
    ]
    with jax.default_matmul_precision("highest"):
        texts = decode_sources(p.model, method, trainable, frozen, sources, IdTokenizer(), cfg.eval)
    assert texts == [" ".join(str(t) for t in row[1:] if t > 1) for row in d["beam_ids"]]


def test_beam_search_encodes_each_source_once(monkeypatch):
    """With beams the encoder runs on the sources, not on sources x beams (its output is
    repeated per beam, as Hugging Face does); given ``encoder_hidden_states`` the model runs
    no encoder at all (init then creates no encoder parameters)."""
    p, d = loaded("tiny_t5"), data("tiny_t5")
    rows = []
    encode = T5.encode

    def counted(module, input_ids, attention_mask=None, *, train=False):
        rows.append(input_ids.shape[0])
        return encode(module, input_ids, attention_mask, train=train)

    monkeypatch.setattr(T5, "encode", counted)
    out = generate_seq2seq(
        p.model,
        p.params,
        d["input_ids"],
        d["attention_mask"],
        max_new_tokens=2,  # a length no other test decodes: traced here, not cached
        num_beams=3,
    )
    assert np.shape(out.tokens) == (2, 2) and rows == [2]
    encoded = np.zeros((2, 5, p.model.config.d_model), np.float32)
    shapes = jax.eval_shape(
        lambda: p.model.init(
            jax.random.key(0),
            None,
            None,
            decoder_input_ids=np.zeros((2, 3), np.int32),
            encoder_hidden_states=encoded,
        )
    )
    assert "encoder" not in shapes["params"] and "decoder" in shapes["params"]


def test_decode_api_primes_once_then_steps():
    # the cache's layout: cross-attention keys from the encoder, one decoder index
    p, d = loaded("tiny_t5"), data("tiny_t5")
    b, s = d["input_ids"].shape
    shapes = jax.eval_shape(
        lambda: p.model.init(
            jax.random.key(0), d["input_ids"], d["attention_mask"], np.zeros((b, 9), np.int32),
            decode=True,
        )["cache"]
    )  # fmt: skip
    assert shapes["decoder"]["block_1"]["cross_attn"]["cross_key"].shape == (b, s, 4, 8)
    assert shapes["decoder"]["block_0"]["self_attn"]["cached_key"].shape == (b, 9, 4, 8)
    assert shapes["encoder_mask"].shape == (b, s) and "encoder" not in shapes
    with pytest.raises(ValueError, match="primed cache"):
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), dict(shapes))
        zeros.pop("encoder_mask")
        jax.eval_shape(
            lambda: p.model.apply(
                {"params": p.params, "cache": zeros},
                np.zeros((b, 1), np.int32),
                decode=True,
                mutable=["cache"],
            )
        )


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip_is_bit_exact(name, tmp_path):
    p = loaded(name)
    out = export_hf(tmp_path / "hf", p.params, p.hf_config, source=FIXTURES / name)
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert written.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value)
    back = load_pretrained(out)
    for path, value in tree.flatten(p.params).items():
        np.testing.assert_array_equal(tree.flatten(back.params)[path], value)
    assert json.loads((out / "config.json").read_text())["model_type"] == "t5"


def test_config_of_an_ftlab_model_exports():
    from ftlab.interop.pretrained import hf_config_for

    p = loaded("tiny_t5_v11")
    config = hf_config_for(p.model)
    assert config["tie_word_embeddings"] is False and config["scale_decoder_outputs"] is False
    tensors = hf_tensors(p.params, config)
    assert "lm_head.weight" in tensors and "decoder.embed_tokens.weight" not in tensors


T5_SMALL = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6}
T5_BASE = {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12}


@pytest.mark.parametrize(
    "hf, count",
    [
        ({**T5_SMALL, "num_heads": 8}, 60_506_624),
        ({**T5_BASE, "num_heads": 12}, 222_903_552),
    ],
)
def test_parameter_counts_from_shapes(hf, count):
    family = get_family("t5")
    model = family.build({"model_type": "t5", **hf}, "lm", {}, {})
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), family.example_inputs(model)))
    leaves = jax.tree.leaves(nn.meta.unbox(shapes["params"]))
    assert sum(int(np.prod(x.shape)) for x in leaves) == count


def test_scan_layers_equals_unrolled():
    p, d = loaded("tiny_t5"), data("tiny_t5")
    # also the reference softmax (attention_impl="naive") against the fused default
    assert p.model.attention_impl == "auto"
    scanned = T5(p.model.config, scan_layers=True, remat=True, attention_impl="naive")
    params = dict(p.params)
    for stack in ("encoder", "decoder"):
        params[stack] = stack_layers(params[stack], "block")
    np.testing.assert_allclose(
        forward(scanned, params, batch(d)), forward(p.model, p.params, batch(d)), atol=1e-5
    )
    # export takes the scanned tree as it is: the per-layer tree's tensors, bit for bit
    scanned_tensors = hf_tensors(jax.device_get(params), p.hf_config)
    tensors = hf_tensors(jax.device_get(p.params), p.hf_config)
    assert scanned_tensors.keys() == tensors.keys()
    assert all(np.array_equal(scanned_tensors[k], v) for k, v in tensors.items())


def test_peft_lora_adapter_runs_as_in_peft():
    p = loaded("tiny_t5")
    with np.load(FIXTURES / "peft_t5" / "reference.npz") as ref:
        ref = dict(ref)
    adapter = load_peft_adapter(FIXTURES / "peft_t5", p.params, p.hf_config)
    assert sorted(adapter.factors) == sorted(
        f"{s}/block_{i}/{a}/{m}/kernel"
        for s, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "cross_attn")))
        for i in (0, 1)
        for a in attns
        for m in "qv"
    )
    method, trainable, frozen = adapter.split(p.params)
    merged = forward(p.model, method.merged_params(trainable, frozen), batch(ref))
    assert np.abs(merged - ref["merged_logits"]).max() < TOL
    assert np.abs(merged - ref["peft_logits"]).max() < TOL
    assert np.abs(forward(p.model, p.params, batch(ref)) - ref["peft_logits"]).max() > 1e-2


def test_peft_lora_adapter_exports_as_peft_wrote_it(tmp_path):
    p = loaded("tiny_t5")
    adapter = load_peft_adapter(FIXTURES / "peft_t5", p.params, p.hf_config)
    out = export_peft_adapter(
        tmp_path / "out",
        adapter.factors,
        adapter.spec,
        p.params,
        p.hf_config,
        modules_to_save=adapter.modules,
        base_model_name_or_path=adapter.config["base_model_name_or_path"],
    )
    theirs = load_file(str(FIXTURES / "peft_t5" / "adapter_model.safetensors"))
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    mine = json.loads((out / "adapter_config.json").read_text())
    ref = json.loads((FIXTURES / "peft_t5" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "use_dora"):
        assert mine[key] == ref[key], key
    assert sorted(mine["target_modules"]) == sorted(ref["target_modules"])


def test_seq2seq_loss_masks_padding():
    labels = np.array([[3, 4, 1, -100], [5, 1, -100, -100]])
    logits = np.random.default_rng(0).normal(size=(2, 4, 10)).astype(np.float32)
    loss = losses.seq2seq_lm_loss(jnp.asarray(logits), {"labels": labels})
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    row0 = -np.mean([logp[0, i, labels[0, i]] for i in range(3)])
    row1 = -np.mean([logp[1, i, labels[1, i]] for i in range(2)])
    np.testing.assert_allclose(np.asarray(loss), [row0, row1], rtol=1e-5)


class CharTokenizer:
    """Letters a-z as ids 3..28, a space 2; pad 0, eos 1 (T5's ids)."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [[ord(c) - ord("a") + 3 if c != " " else 2 for c in t] for t in texts]}


def test_seq2seq_arrays_shift_targets_behind_the_start_token():
    out = seq2seq_arrays(CharTokenizer(), ["ab", "abcdef"], ["cd", "c"], 5, target_length=3)
    inputs, labels = out["inputs"], out["labels"]
    np.testing.assert_array_equal(inputs["input_ids"], [[3, 4, 1, 0, 0], [3, 4, 5, 6, 1]])
    np.testing.assert_array_equal(inputs["attention_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(labels, [[5, 6, 1], [5, 1, -100]])
    np.testing.assert_array_equal(inputs["decoder_input_ids"], [[0, 5, 6], [0, 5, 1]])
    np.testing.assert_array_equal(inputs["decoder_attention_mask"], [[1, 1, 1], [1, 1, 1]])
    np.testing.assert_array_equal(inputs["decoder_input_ids"], shift_right(labels, 0, 0))
    cut = seq2seq_arrays(CharTokenizer(), ["a"], ["abcdef"], 4, prefix="b")
    np.testing.assert_array_equal(cut["inputs"]["input_ids"], [[4, 3, 1, 0]])
    np.testing.assert_array_equal(cut["labels"], [[3, 4, 5, 6]])  # cut: no eos
    # text-to-text columns -> a seq2seq Dataset (prompt [+ context] -> response)
    frame = pd.DataFrame({"prompt": ["ab", "ab"], "context": ["c", None], "response": ["d", "ef"]})
    frames = {"train": frame, "val": frame.iloc[:0], "test": frame}
    data = text_to_text_dataset(frames, CharTokenizer(), 6, 3)
    assert data.task == "seq2seq" and len(data.val) == 0
    np.testing.assert_array_equal(
        data.train.inputs["input_ids"][:, :4], [[3, 4, 2, 5], [3, 4, 1, 0]]
    )
    np.testing.assert_array_equal(data.train.labels, [[6, 1, -100], [7, 8, 1]])
    np.testing.assert_array_equal(data.train.weights, [2, 3])
    assert list(data.test.text["response"]) == ["d", "ef"]


def test_lora_on_attention_trains_only_its_factors():
    # a one-layer T5 (each stack), LoRA on every q / v projection (self and cross attention)
    model = T5(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4))
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(8)]
    arrays = seq2seq_arrays(CharTokenizer(), words[:4], words[4:], 8, target_length=6)
    inputs, labels = arrays["inputs"], arrays["labels"]
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs)["params"])
    params = jax.tree.map(lambda x: 0.3 * rng.standard_normal(x.shape, np.float32), shapes)
    cfg = base_config().method
    cfg.name = "lora"
    cfg.lora.targets = (r".*_attn/(q|v)/kernel",)
    cfg.lora.rank = 2
    method = build_method(cfg, params)
    trainable, frozen = method.split(params, jax.random.key(0))
    assert tree.flatten(trainable.get("params", {})) == {}
    assert len(tree.flatten(trainable["lora"])) == 2 * 6  # a, b on 6 q / v kernels
    tx = optax.adam(1e-2)
    state = TrainState.create(trainable, frozen, tx, seed=0)
    step = jax.jit(make_train_step(model, method, tx, lambda s: 1e-2, losses.seq2seq_lm_loss))
    weights = (labels >= 0).sum(-1).astype(np.float32)
    for _ in range(3):
        state, metrics = step(state, {"inputs": inputs, "labels": labels, "weights": weights})
        assert np.isfinite(float(metrics["loss"]))
    for path, value in tree.flatten(frozen).items():
        assert np.array_equal(np.asarray(tree.flatten(state.frozen)[path]), np.asarray(value)), path
    before, after = tree.flatten(trainable["lora"]), tree.flatten(state.trainable["lora"])
    assert all(not np.array_equal(after[k], before[k]) for k in before if k.endswith("/b"))
    # evaluation of a seq2seq model: token counts, hits and plain cross-entropy per example
    evaluate = jax.jit(make_eval_step(model, method, losses.seq2seq_lm_loss, task="seq2seq"))
    metrics = evaluate(state, {"inputs": inputs, "labels": labels, "weights": weights})
    np.testing.assert_array_equal(metrics["tokens"], (labels >= 0).sum(-1))
    assert metrics["nll"].shape == (4,) and (metrics["correct"] <= metrics["tokens"]).all()


def test_lora_on_t5_attention_through_the_training_loop_trains_only_its_factors(tmp_path):
    """configs/t5_e2e.py:lora,runlocal (LoRA on every attention's q / v) trained by the loop
    (as tests/test_recipes.py and tests/test_commands.py train it): the frozen leaves of the
    saved state are bit-identical to the starting model's, and only the factors moved."""
    from ftlab import saved_run
    from ftlab.config import load_config
    from ftlab.train.loop import train

    config = Path(__file__).resolve().parents[1] / "configs" / "t5_e2e.py"
    cfg = load_config(f"{config}:lora,runlocal")
    cfg.train.num_steps, cfg.train.eval_every, cfg.checkpoint.every_steps = 4, 2, 2
    cfg.eval.generate_examples = 0
    summary = train(cfg, tmp_path / "run")
    restored = saved_run.restore(
        tmp_path / "run", cfg, saved_run.choose_checkpoint(tmp_path / "run", cfg, "last")
    )
    assert restored.checkpoint.step == 4
    start, end = restored.run.state, restored.state  # the config's initial state, step 4's
    assert tree.flatten(end.trainable.get("params", {})) == {}  # nothing but the factors
    factors = tree.flatten(end.trainable["lora"])
    assert len(factors) == 2 * 12  # a, b on 12 q / v kernels: 2 encoder, 2 x 2 decoder blocks
    assert summary["trainable_params"] == sum(np.size(v) for v in factors.values())
    frozen0, frozen = tree.flatten(start.frozen), tree.flatten(end.frozen)
    assert frozen.keys() == frozen0.keys() and any(k.endswith("q/kernel") for k in frozen)
    for path, value in frozen0.items():
        np.testing.assert_array_equal(np.asarray(frozen[path]), np.asarray(value), err_msg=path)
    before = tree.flatten(start.trainable["lora"])
    assert all(not np.array_equal(factors[k], before[k]) for k in before if k.endswith("/b"))


def test_source_prefix_and_target_length_from_the_config(tmp_path, monkeypatch, capsys):
    """``data.source_prefix`` / ``data.target_length`` reach the tokenised sources and labels
    of configs/t5_e2e.py:runlocal's data, evaluation by generation encodes the same sources,
    and bad values or a typo are errors naming the key (the CLI exits 2)."""
    from ftlab import cli
    from ftlab.config import ConfigError, apply_overrides, load_config
    from ftlab.data.loading import load_dataset
    from ftlab.eval import generation_eval
    from ftlab.schema import validate

    config = Path(__file__).resolve().parents[1] / "configs" / "t5_e2e.py"
    cfg = load_config(f"{config}:full,runlocal")
    cfg = apply_overrides(cfg, {"data.source_prefix": "data to text: ", "data.target_length": 12})
    data = load_dataset(cfg.data)
    tok = data.tokenizer
    prefix = tok("data to text: ", add_special_tokens=False)["input_ids"]
    test = data.test
    assert len(prefix) > 2 and all(s.startswith("data to text: ") for s in test.text["source"])
    ids, mask = test.inputs["input_ids"], test.inputs["attention_mask"]
    assert ids.shape[1] == cfg.data.max_length and test.labels.shape == (len(test), 12)
    heads = {tuple(row[: len(prefix)]) for row in ids}
    plain = tok(str(test.text["prompt"][0]), add_special_tokens=False)["input_ids"]
    assert heads == {tuple(prefix)} and tuple(ids[0][: len(plain)]) != tuple(plain)
    assert (test.labels[:, -1] >= 0).any()  # some targets fill all 12 (cut): the bound holds
    assert test.inputs["decoder_input_ids"].shape == (len(test), 12)

    # evaluation by generation encodes exactly the training sources (prefix included)
    seen = []

    def fake_decode(model, method, trainable, frozen, ids, tokenizer, cfg):
        seen.extend(ids)
        return ["x"] * len(ids)

    monkeypatch.setattr(generation_eval, "decode_sources", fake_decode)
    cfg.eval.generate_examples = 3
    generation_eval.evaluate_seq2seq(None, None, None, None, test, tok, cfg.eval)
    first = [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)][:1]
    assert len(seen) == 3 and seen[:1] == first

    # wrong values and typos are named
    for key, value, message in [
        ("data.target_length", -1, "config.data.target_length: must be 0"),
        ("data.source_prefix", "x", "only for text-to-text data"),
    ]:
        bad = apply_overrides(load_config(f"{config}:full,runlocal"), {key: value})
        if key == "data.source_prefix":
            bad.data.task = "causal_lm"
        with pytest.raises(ConfigError, match=message):
            validate(bad)
    with pytest.raises(ConfigError, match="did you mean 'data.source_prefix'"):
        apply_overrides(cfg, {"data.source_prefx": "x"})
    argv = ["train", f"{config}:full,runlocal", "--workdir", str(tmp_path / "w")]
    assert cli.main([*argv, "--config.data.target_length=-3"]) == 2
    assert "config.data.target_length" in capsys.readouterr().err
