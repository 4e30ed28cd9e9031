"""Prompt tuning (``method.name = "prompt"``, ``ftlab.methods.prompt``): a trained soft prompt
prepended to the input embeddings of GPT-2 / LLaMA causal LMs and of T5's encoder.

PEFT parity on the peft-made fixtures (``peft_gpt2_prompt``, ``peft_llama_prompt``: logits
within 1e-5 in fp32 on the real tokens, re-export bit for bit, ftlab -> PEFT -> ftlab exact);
scan_layers; cached generation against uncached forwards; a tiny GPT-2 run (frozen leaves
bit-identical, optimizer state only for the prompt, the prompt trained, ``ftlab export --peft``,
exact resume after Ctrl-C); config errors naming the key; step FLOPs with the prompt.
T5 (``peft_t5_prompt``, PEFT's two-submodule table): logits within 1e-5 of PEFT's, the export
(one submodule) round trip bit for bit, cached greedy / beam decoding against uncached forwards
and PEFT's ``generate``, a few train steps of the T5 recipe's prompt config.
"""

import json
import os
import signal
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest
from safetensors.numpy import load_file

from ftlab import checkpoint, tree
from ftlab.config import ConfigError, apply_overrides, load_config
from ftlab.eval import plots
from ftlab.eval.generate import generate, generate_seq2seq
from ftlab.interop import peft_prompt
from ftlab.interop.errors import PeftAdapterError
from ftlab.interop.peft import export_method_adapter
from ftlab.interop.pretrained import load_pretrained
from ftlab.methods import build_method
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.models.layers import stack_layers
from ftlab.schema import base_config, validate
from ftlab.train import flops
from ftlab.train.loop import build, train

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).parent.parent / "configs"
CASES = {"peft_gpt2_prompt": "tiny_gpt2", "peft_llama_prompt": "tiny_llama"}
_BASES = {}


def _base(name, head=None):
    if (name, head) not in _BASES:
        _BASES[name, head] = load_pretrained(FIXTURES / name, head=head)
    return _BASES[name, head]


def _method_cfg(**prompt):
    c = base_config().method
    c.name = "prompt"
    for k, v in prompt.items():
        c.prompt[k] = v
    return c


def _logits(p, method, trainable, frozen, batch):
    with jax.default_matmul_precision("highest"):
        run = jax.jit(lambda t, f, b: method.apply(p.model, t, f, b, train=False))
        return np.asarray(run(trainable, frozen, batch))


# -- PEFT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_peft_fixture_runs_as_in_peft_and_reexports_bit_exactly(case, tmp_path):
    p = _base(CASES[case])
    with np.load(FIXTURES / case / "reference.npz") as d:
        ref = dict(d)
    adapter = peft_prompt.load_prompt_adapter(FIXTURES / case, p.params, p.hf_config)
    method, trainable, frozen = adapter.split(p.params)
    v = method.prompt_tokens
    assert v == {"peft_gpt2_prompt": 4, "peft_llama_prompt": 3}[case]
    assert adapter.modules == {} and method.trained == ()
    batch = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    mask = ref["attention_mask"].astype(bool)  # row 1 right-padded
    ours = _logits(p, method, trainable, frozen, batch)
    assert ours.shape == ref["input_ids"].shape + (ref["peft_logits"].shape[-1],)
    theirs = ref["peft_logits"][:, v:]  # PEFT's logits include the v virtual positions
    assert np.abs(ours - theirs)[mask].max() < 1e-5  # measured ~1e-7
    with jax.default_matmul_precision("highest"):
        plain = np.asarray(jax.jit(p.model.apply)({"params": p.params}, batch))
    assert np.abs(plain - theirs)[mask].max() > 1e-1  # the prompt matters
    # nothing merges: the merged tree is the base
    merged = tree.flatten(jax.jit(method.merged_params)(trainable, frozen))
    assert all(np.array_equal(merged[k], v_) for k, v_ in tree.flatten(p.params).items())

    out = export_method_adapter(
        tmp_path / "out",
        method,
        trainable,
        frozen,
        p.hf_config,
        base_model_name_or_path=adapter.config["base_model_name_or_path"],
    )
    theirs_t = load_file(str(FIXTURES / case / "adapter_model.safetensors"))
    ours_t = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(ours_t) == sorted(theirs_t) == ["prompt_embeddings"]
    for k in theirs_t:
        assert ours_t[k].dtype == theirs_t[k].dtype and np.array_equal(ours_t[k], theirs_t[k])
    mine = json.loads((out / "adapter_config.json").read_text())
    ref_config = json.loads((FIXTURES / case / "adapter_config.json").read_text())
    ref_config.pop("peft_version")  # written by peft itself
    assert mine == ref_config
    back = peft_prompt.load_prompt_adapter(out, p.params, p.hf_config)
    assert back.method == method
    np.testing.assert_array_equal(
        back.leaves["prompt"]["embeddings"], adapter.leaves["prompt"]["embeddings"]
    )


def test_ftlab_to_peft_to_ftlab_and_export_errors(tmp_path):
    p = _base("tiny_gpt2")
    method = build_method(_method_cfg(num_virtual_tokens=5, init="vocab"), p.params)
    trainable, frozen = jax.jit(method.split)(p.params, jax.random.key(3))
    prompt = trainable["prompt"]["embeddings"]
    assert prompt.shape == (5, 32) and prompt.dtype == jnp.float32
    # "vocab" init: rows of the token embedding
    rows = np.asarray(p.params["wte"]["embedding"])
    assert all(any(np.array_equal(r, w) for w in rows) for r in np.asarray(prompt))
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    out = export_method_adapter(tmp_path / "a", method, trainable, frozen, p.hf_config)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "SAMPLE_VOCAB" and config["num_virtual_tokens"] == 5
    back = peft_prompt.load_prompt_adapter(out, p.params, p.hf_config)
    m2, t2, f2 = back.split(p.params)
    batch = {"input_ids": np.array([[3, 7, 11, 2]]), "attention_mask": np.ones((1, 4), int)}
    np.testing.assert_array_equal(
        _logits(p, m2, t2, f2, batch), _logits(p, method, trainable, frozen, batch)
    )
    # a head trained besides the prompt has no place in PEFT's prompt-tuning format
    with_head = {**trainable, "params": {"ln_f": {"bias": jnp.zeros(32)}}}
    with pytest.raises(PeftAdapterError, match="also trains"):
        export_method_adapter(tmp_path / "b", method, with_head, frozen, p.hf_config)
    assert not (tmp_path / "b").exists()
    # a LoRA adapter is not a prompt-tuning one
    with pytest.raises(PeftAdapterError, match="PROMPT_TUNING"):
        peft_prompt.load_prompt_adapter(FIXTURES / "peft_gpt2", p.params, p.hf_config)
    # the wrong model: a LLaMA prompt of another width fits no GPT-2 ... (same width here)
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((out / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "num_virtual_tokens": 4}))
    (bad / "adapter_model.safetensors").write_bytes(
        (out / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(PeftAdapterError, match="num_virtual_tokens 4"):
        peft_prompt.load_prompt_adapter(bad, p.params, p.hf_config)


# -- the model hook -----------------------------------------------------------------------------


def test_scan_layers_and_batched_prompt():
    p = _base("tiny_gpt2")
    rng = np.random.default_rng(0)
    prompt = rng.normal(size=(3, 32)).astype(np.float32)
    batch = {"input_ids": rng.integers(0, 100, (2, 6)), "attention_mask": np.ones((2, 6), int)}
    batch["attention_mask"][1, 4:] = 0

    def three(params, e):  # shared prompt, one per row, hidden states
        apply = lambda x, **kw: p.model.apply({"params": params}, batch, prompt_embeds=x, **kw)
        return apply(e), apply(jnp.stack([e, e])), apply(e, return_hidden=True)[0]

    scan_model = p.model.clone(scan_layers=True)
    with jax.default_matmul_precision("highest"):
        unrolled, per_row, hidden = jax.jit(three)(p.params, prompt)
        scanned = jax.jit(lambda q, x: scan_model.apply({"params": q}, batch, prompt_embeds=x))(
            stack_layers(p.params, "h"), prompt
        )
    assert unrolled.shape == (2, 6, 100) and hidden.shape == (2, 6, 32)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(per_row, unrolled)
    with pytest.raises(ValueError, match="LM head"):
        cls = _base("tiny_gpt2", "classifier")
        cls.model.apply({"params": cls.params}, batch, prompt_embeds=prompt)


def test_cached_generation_equals_uncached_forwards():
    p = _base("tiny_gpt2")
    method = build_method(_method_cfg(num_virtual_tokens=3), p.params)
    trainable, frozen = jax.jit(method.split)(p.params, jax.random.key(1))
    trainable = {**trainable, "prompt": {"embeddings": trainable["prompt"]["embeddings"] * 0.3}}
    ids = np.array([[5, 9, 14, 3, 22], [0, 0, 7, 31, 8]], np.int32)  # row 1 left-padded
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int32)
    steps, length = 4, ids.shape[1]
    with jax.default_matmul_precision("highest"):
        out = generate(
            p.model,
            None,
            ids,
            mask,
            max_new_tokens=steps,
            adapter=method,
            trainable=trainable,
            frozen=frozen,
            return_logits=True,
        )
        # uncached: the whole sequence (prompt + tokens so far) again at each step, one
        # compiled shape (causal: the unfilled tail does not reach the filled positions)
        fwd = jax.jit(lambda t, f, b: method.apply(p.model, t, f, b, train=False))
        seq = np.concatenate([ids, np.zeros((2, steps), np.int32)], axis=1)
        m = np.concatenate([mask, np.ones((2, steps), np.int32)], axis=1)
        positions = np.maximum(np.cumsum(m, axis=1) - 1, 0)  # as the cache counts them
        for i in range(steps):
            batch = {"input_ids": seq, "attention_mask": m, "position_ids": positions}
            logits = np.asarray(fwd(trainable, frozen, batch))[:, length + i - 1]
            np.testing.assert_allclose(np.asarray(out.logits[:, i]), logits, atol=2e-5, rtol=0)
            token = logits.argmax(-1).astype(np.int32)
            np.testing.assert_array_equal(np.asarray(out.tokens[:, i]), token)
            seq[:, length + i] = token


# -- config -------------------------------------------------------------------------------------


def test_config_errors():
    def lm(**overrides):
        cfg = load_config(f"{CONFIGS / 'gpt2_e2e.py'}:lora,runlocal")
        prompt = {"method.name": "prompt", "method.prompt.num_virtual_tokens": 4}
        return apply_overrides(cfg, {**prompt, **overrides})

    validate(lm())
    # T5 (seq2seq): its recipe with method.name "prompt" validates; other losses do not
    t5 = load_config(f"{CONFIGS / 't5_e2e.py'}:lora,runlocal")
    validate(apply_overrides(t5, {"method.name": "prompt"}))
    with pytest.raises(ConfigError, match="config.method.name: .*T5.*not train.loss 'mse'"):
        validate(apply_overrides(t5, {"method.name": "prompt", "train.loss": "mse"}))
    for overrides, key in [
        ({"method.prompt.num_virtual_tokens": 0}, "config.method.prompt.num_virtual_tokens"),
        ({"method.prompt.init": "zeros"}, "config.method.prompt.init"),
        ({"method.prompt.init": "text"}, "config.method.prompt.init_text"),
        ({"train.loss": "cross_entropy"}, "config.method.name"),
    ]:
        with pytest.raises(ConfigError, match=key):
            validate(lm(**overrides))
    with pytest.raises(ConfigError, match="num_virtual_tokens"):  # a typo names the key
        lm(**{"method.prompt.num_virtual_token": 4})
    gpt2 = _base("tiny_gpt2")
    with pytest.raises(ConfigError, match="config.method.prompt.num_virtual_tokens"):
        build_method(_method_cfg(num_virtual_tokens=-1), gpt2.params)
    # a sequence classifier, an encoder: refused, naming method.name and what is supported
    for params in (_base("tiny_gpt2", "classifier").params, _base("tiny_bert").params):
        with pytest.raises(
            ConfigError, match=r"config.method.name: 'prompt'.*GPT-2 and LLaMA and T5"
        ):
            build_method(_method_cfg(num_virtual_tokens=2), params)
    # text init: the run's tokenizer tokenises it, repeated / cut to the virtual tokens
    tok = lambda text: {"input_ids": [ord(c) % 100 for c in text]}
    cfg = _method_cfg(num_virtual_tokens=5, init="text", init_text="abc")
    method = build_method(cfg, gpt2.params, tokenizer=tok)
    assert method.prompt_init_ids == (97, 98, 99, 97, 98)
    trainable, _ = method.split(gpt2.params, jax.random.key(0))
    np.testing.assert_array_equal(
        trainable["prompt"]["embeddings"],
        np.asarray(gpt2.params["wte"]["embedding"])[[97, 98, 99, 97, 98]],
    )
    with pytest.raises(ConfigError, match="config.method.prompt.init"):
        build_method(cfg, gpt2.params)  # no tokenizer


# -- end to end ---------------------------------------------------------------------------------

SHORT = {
    "method.name": "prompt",
    "method.prompt.num_virtual_tokens": 4,
    "method.prompt.init": "vocab",
    "method.frozen_dtype": "float32",
    "optim.lr": 0.3,
    "train.num_steps": 8,
    "train.eval_every": 8,
    "checkpoint.every_steps": 8,
    "eval.generate_examples": 0,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny GPT-2 (configs/gpt2_e2e.py:runlocal) prompt-tuned 8 steps: straight, and
    interrupted by Ctrl-C at step 4 then resumed (plots not rendered)."""
    root = tmp_path_factory.mktemp("prompt")
    cfg = apply_overrides(load_config(f"{CONFIGS / 'gpt2_e2e.py'}:lora,runlocal"), SHORT)
    start = build(cfg)  # the initial state (the model is randomly initialised from the seed)
    out = {"root": root, "cfg": cfg, "start": start}
    data = start.data

    def ctrl_c_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_save", lambda fig, path: (plt.close(fig), Path(path))[1])
        out["straight"] = train(cfg, root / "straight", data=data)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, root / "resumed", on_step=ctrl_c_at_4, data=data)
        out["resumed"] = train(cfg, root / "resumed", data=data)
    return out


def _final_state(runs, run):
    start = runs["start"]
    target = jax.device_get(start.state)
    ckpts = checkpoint.Checkpoints(runs["root"] / run / "checkpoints", save_every=8)
    state, meta = ckpts.restore(target)
    ckpts.close()
    return start.method, state, target, meta


def test_training_trains_only_the_prompt_and_exports_it(runs, tmp_path):
    from ftlab.cli import main

    method, state, start, meta = _final_state(runs, "straight")
    assert meta["step"] == 8 and method.prompt_tokens == 4
    assert sorted(tree.flatten(state.frozen)) == sorted(tree.flatten(start.frozen))
    for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(start.frozen)):
        np.testing.assert_array_equal(x, y)
    # the saved params are the base (a prompt merges into no weight): the frozen tree
    saved = checkpoint.load_pytree(runs["root"] / "straight" / "params")
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(start.frozen)):
        np.testing.assert_array_equal(x, y)
    assert {k for k, v in state.trainable.items() if jax.tree.leaves(v)} == {"prompt"}
    moved = state.trainable["prompt"]["embeddings"] - start.trainable["prompt"]["embeddings"]
    assert np.abs(moved).max() > 0.1
    opt = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(x.size for x in opt) == 2 * 4 * 32  # adam's mu and nu of the prompt only
    s = runs["straight"]
    assert s["trainable_params"] == 4 * 32
    before = json.loads((runs["root"] / "straight" / "before.json").read_text())
    assert s["val"]["loss"] < before["val"]["loss"]
    # `ftlab export RUN --peft DIR` writes PEFT's prompt-tuning adapter of the trained prompt
    assert main(["export", str(runs["root"] / "straight"), "--peft", str(tmp_path / "peft")]) == 0
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(
        saved["prompt_embeddings"], state.trainable["prompt"]["embeddings"]
    )
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["token_dim"] == 32


def test_exact_resume_is_bit_identical(runs):
    _, a, _, _ = _final_state(runs, "straight")
    _, b, _, _ = _final_state(runs, "resumed")
    assert int(a.step) == int(b.step) == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert runs["straight"]["test"] == runs["resumed"]["test"]


def test_step_flops_count_the_prompt():
    """Tiny GPT-2 of tests/test_bench.py (2 layers, width 8, vocabulary 16, tied head), batch 2
    x 4 tokens, a 2-token prompt: 6 positions, every matmul (1,664 weights) frozen but on the
    gradient's path to the prompt (4N), attention 3 x 4 * 6 * 8 per layer and position."""
    model = GPT2(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = nn.meta.unbox(shapes["params"])
    method = build_method(_method_cfg(num_virtual_tokens=2), params)
    trainable, frozen = jax.eval_shape(lambda q: method.split(q, jax.random.key(1)), params)
    f = flops.method_step_flops(method, trainable, frozen, batch=2, seq_len=4, tied=True)
    assert f.tokens == 12 and f.matmul_params == 1_664 and f.frozen_grad_params == 1_664
    assert f.per_token == 4 * 1_664 + 2 * 3 * 4 * 6 * 8


def test_the_prompt_is_replicated_and_the_frozen_base_stays_sharded():
    """fsdp=4 x tensor=2: the soft prompt (v, embed) and its optimizer state are replicated
    (small, read by every data shard), the frozen base keeps its fsdp / tensor shardings."""
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from ftlab.parallel import AXES, shard
    from ftlab.train import optim

    model = GPT2(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=128, n_layer=1, n_head=4, n_inner=512)
    )
    variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 8), np.int32))
    cfg = base_config()
    cfg.method = _method_cfg(num_virtual_tokens=4)
    method = build_method(cfg.method, nn.meta.unbox(variables["params"]))
    tx, _ = optim.optimizer(cfg.optim, 10)
    abstract = shard.abstract_state(shard.init_state_fn(method, tx, 0), variables)
    sh = shard.state_shardings(abstract, variables, AbstractMesh((1, 4, 2), AXES))
    assert abstract.trainable["prompt"]["embeddings"].shape == (4, 128)
    assert sh.trainable["prompt"]["embeddings"].spec == P()
    assert set(sh.trainable) == {"params", "lora", "prompt"} and not jax.tree.leaves(
        sh.trainable["params"]
    )
    moments = [
        x for x in jax.tree.leaves(abstract.opt_state) if getattr(x, "shape", ()) == (4, 128)
    ]
    assert len(moments) == 2  # adamw's mu and nu, for the prompt alone
    assert sh.frozen["h_0"]["mlp"]["c_fc"]["kernel"].spec != P()


# -- T5 (the paper's model): the prompt goes to the encoder ------------------------------------

T5_KEYS = ("input_ids", "attention_mask", "decoder_input_ids")


def _t5_case():
    p = _base("tiny_t5")
    with np.load(FIXTURES / "peft_t5_prompt" / "reference.npz") as d:
        ref = dict(d)
    adapter = peft_prompt.load_prompt_adapter(FIXTURES / "peft_t5_prompt", p.params, p.hf_config)
    return p, ref, adapter


def test_t5_peft_fixture_runs_as_in_peft_and_round_trips(tmp_path):
    """peft_t5_prompt (PEFT's default 2 submodules: a (6, 32) table, the first 3 rows on the
    encoder): ftlab's logits are PEFT's; the export (1 submodule, a (3, 32) table, which PEFT
    loads and runs the same: checked by hand, ~4e-7) re-imports bit for bit."""
    p, ref, adapter = _t5_case()
    method, trainable, frozen = adapter.split(p.params)
    assert method.prompt_tokens == 3 and method.prompt_source == "shared/embedding"
    assert adapter.modules == {} and method.trained == ()
    table = load_file(str(FIXTURES / "peft_t5_prompt" / "adapter_model.safetensors"))
    table = table["prompt_embeddings"]
    assert table.shape == (6, 32) and adapter.config["num_transformer_submodules"] == 2
    np.testing.assert_array_equal(trainable["prompt"]["embeddings"], table[:3])
    assert len(adapter.notes) == 1 and "rows 3..5 (unused) were dropped" in adapter.notes[0]
    batch = {k: ref[k] for k in T5_KEYS}  # source row 1 padded from position 6
    ours = _logits(p, method, trainable, frozen, batch)
    assert ours.shape == ref["peft_logits"].shape == (2, 6, 100)  # the decoder's positions
    assert np.abs(ours - ref["peft_logits"]).max() < 1e-5  # measured ~5e-7
    with jax.default_matmul_precision("highest"):
        plain = np.asarray(jax.jit(p.model.apply)({"params": p.params}, batch))
    assert np.abs(plain - ref["peft_logits"]).max() > 1e-2  # the prompt matters (~0.39)
    # a (batch, v, d) prompt, one per row, is the shared one; encode + encoder_hidden_states
    # with the source mask extended by v ones is the full call
    with jax.default_matmul_precision("highest"):
        prompt = trainable["prompt"]["embeddings"]

        def both(params, e):
            per_row = p.model.apply({"params": params}, batch, prompt_embeds=jnp.stack([e, e]))
            ids, mask = batch["input_ids"], batch["attention_mask"]
            enc = p.model.apply({"params": params}, ids, mask, prompt_embeds=e, method="encode")
            full_mask = jnp.concatenate([jnp.ones((2, 3), mask.dtype), mask], axis=1)
            split = p.model.apply(
                {"params": params},
                None,
                full_mask,
                batch["decoder_input_ids"],
                encoder_hidden_states=enc,
            )
            return per_row, enc, split

        per_row, enc, split = jax.jit(both)(p.params, prompt)
    assert enc.shape == (2, 3 + 10, 32)
    np.testing.assert_allclose(per_row, ours, atol=1e-6, rtol=0)
    np.testing.assert_allclose(split, ours, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="encoder_hidden_states already"):
        p.model.apply(
            {"params": p.params},
            None,
            None,
            batch["decoder_input_ids"],
            encoder_hidden_states=enc,
            prompt_embeds=prompt,
        )

    out = export_method_adapter(
        tmp_path / "out",
        method,
        trainable,
        frozen,
        p.hf_config,
        base_model_name_or_path=adapter.config["base_model_name_or_path"],
    )
    mine = json.loads((out / "adapter_config.json").read_text())
    ref_config = json.loads((FIXTURES / "peft_t5_prompt" / "adapter_config.json").read_text())
    ref_config.pop("peft_version")  # written by peft itself
    assert mine == {**ref_config, "num_transformer_submodules": 1}
    assert mine["task_type"] == "SEQ_2_SEQ_LM" and mine["num_layers"] == 2
    saved = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    assert saved.dtype == np.float32 and np.array_equal(saved, table[:3])
    back = peft_prompt.load_prompt_adapter(out, p.params, p.hf_config)
    assert back.method == method and back.notes == []
    np.testing.assert_array_equal(back.leaves["prompt"]["embeddings"], saved)
    again = export_method_adapter(
        tmp_path / "again",
        *back.split(p.params),
        p.hf_config,
        base_model_name_or_path=adapter.config["base_model_name_or_path"],
    )
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (again / name).read_bytes() == (out / name).read_bytes()

    # errors: a T5 prompt on a decoder (and back), other submodule counts, another task type
    gpt2 = _base("tiny_gpt2")
    with pytest.raises(PeftAdapterError, match="task_type 'SEQ_2_SEQ_LM'.*'CAUSAL_LM'"):
        peft_prompt.load_prompt_adapter(out, gpt2.params, gpt2.hf_config)
    with pytest.raises(PeftAdapterError, match="task_type 'CAUSAL_LM'.*'SEQ_2_SEQ_LM'"):
        peft_prompt.load_prompt_adapter(FIXTURES / "peft_llama_prompt", p.params, p.hf_config)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**mine, "num_transformer_submodules": 3}))
    (bad / "adapter_model.safetensors").write_bytes(
        (out / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(PeftAdapterError, match="num_transformer_submodules 3"):
        peft_prompt.load_prompt_adapter(bad, p.params, p.hf_config)
    (bad / "adapter_config.json").write_text(json.dumps({**mine, "num_transformer_submodules": 2}))
    with pytest.raises(PeftAdapterError, match=r"need \(6, 32\)"):  # a (3, 32) table for 2 x 3
        peft_prompt.load_prompt_adapter(bad, p.params, p.hf_config)
    with pytest.raises(PeftAdapterError, match="SEQ_2_SEQ_LM adapter, not 'CAUSAL_LM'"):
        export_method_adapter(
            tmp_path / "c", method, trainable, frozen, p.hf_config, task_type="CAUSAL_LM"
        )


def test_t5_cached_decoding_with_the_prompt_equals_uncached_forwards():
    """generate_seq2seq with a prompt-tuning adapter (the encoder reads the prompt once): greedy
    tokens are the argmax of uncached ``Method.apply`` forwards, its logits theirs; with the
    fixture's prompt, greedy and 3-beam tokens are those of PEFT's ``generate``."""
    p, ref, adapter = _t5_case()
    method, trainable, frozen = adapter.split(p.params)
    ids, mask = ref["input_ids"], ref["attention_mask"]
    steps = 8
    with jax.default_matmul_precision("highest"):
        kw = {"max_new_tokens": steps, "adapter": method, "frozen": frozen}
        # return_logits as below: one compilation serves both prompts (traced)
        theirs = generate_seq2seq(
            p.model, None, ids, mask, trainable=trainable, return_logits=True, **kw
        )
        beams = generate_seq2seq(p.model, None, ids, mask, trainable=trainable, num_beams=3, **kw)
        # a prompt moved off the fixture's: varied tokens to follow step by step
        moved = {
            **trainable,
            "prompt": {"embeddings": trainable["prompt"]["embeddings"] * 1.3 + 0.1},
        }
        out = generate_seq2seq(p.model, None, ids, mask, trainable=moved, return_logits=True, **kw)
        fwd = jax.jit(lambda t, f, b: method.apply(p.model, t, f, b, train=False))
        dec = np.zeros((2, steps), np.int32)  # the start token (0), then the tokens so far
        for i in range(steps):
            batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
            logits = np.asarray(fwd(moved, frozen, batch))[:, i]
            np.testing.assert_allclose(np.asarray(out.logits[:, i]), logits, atol=2e-5, rtol=0)
            token = logits.argmax(-1).astype(np.int32)
            np.testing.assert_array_equal(np.asarray(out.tokens[:, i]), token)
            if i + 1 < steps:
                dec[:, i + 1] = token
    assert len(set(np.asarray(out.tokens).ravel().tolist())) > 2
    np.testing.assert_array_equal(theirs.tokens, ref["peft_greedy_ids"])
    np.testing.assert_array_equal(beams.tokens, ref["peft_beam3_ids"])
    assert beams.tokens.shape == (2, steps) and np.isfinite(np.asarray(beams.scores)).all()


def test_t5_prompt_tuning_trains_only_the_prompt():
    """configs/t5_e2e.py:lora,runlocal (the recipe of the LoRA training-loop test in
    tests/test_t5.py) made a prompt-tuning config: it validates, and its method, optimizer and
    loss train tiny_t5 (the loop's train step, with the config's dropout) for a few steps:
    the prompt alone moves, the frozen leaves stay bit-identical, the optimizer state is the
    prompt's only. (The whole loop is run on GPT-2 by ``runs`` above.)"""
    from ftlab.train import losses, optim
    from ftlab.train.state import TrainState
    from ftlab.train.step import make_train_step

    cfg = load_config(f"{CONFIGS / 't5_e2e.py'}:lora,runlocal")
    cfg = apply_overrides(
        cfg,
        {
            "method.name": "prompt",
            "method.prompt.num_virtual_tokens": 4,
            "method.prompt.init": "vocab",
            "optim.lr": 0.3,
            "optim.warmup_steps": 0,
            "train.num_steps": 3,
        },
    )
    validate(cfg)
    assert cfg.train.loss == "seq2seq"
    p = _base("tiny_t5")
    method = build_method(cfg.method, p.params)
    assert method.prompt_tokens == 4 and method.prompt_source == "shared/embedding"
    trainable, frozen = jax.jit(method.split)(p.params, jax.random.key(cfg.seed))
    rows = np.asarray(p.params["shared"]["embedding"])  # "vocab": rows of the embedding
    prompt0 = np.asarray(trainable["prompt"]["embeddings"])
    assert prompt0.shape == (4, 32)
    assert all(any(np.array_equal(r, w) for w in rows) for r in prompt0)
    tx, schedule = optim.optimizer(cfg.optim, cfg.train.num_steps)
    loss = losses.per_example_loss(cfg.train.loss, cfg.train.label_smoothing)
    step = jax.jit(make_train_step(p.model, method, tx, schedule, loss))
    with np.load(FIXTURES / "tiny_t5" / "inputs_logits.npz") as d:
        inputs = {k: d[k] for k in T5_KEYS}
    labels = np.concatenate([inputs["decoder_input_ids"][:, 1:], np.ones((2, 1), np.int32)], 1)
    labels[1, 4:] = -100  # a padded target
    batch = {"inputs": inputs, "labels": labels, "weights": (labels >= 0).sum(-1) * 1.0}
    state = start = TrainState.create(trainable, frozen, tx, seed=cfg.seed)
    start = jax.device_get(start)
    seen = []
    for _ in range(3):
        state, metrics = step(state, batch)
        seen.append(float(metrics["loss"]))
    state = jax.device_get(state)
    assert np.isfinite(seen).all()

    @jax.jit
    def eval_loss(t):  # without dropout: the steps lowered the batch's loss
        logits = method.apply(p.model, t, start.frozen, inputs, train=False)
        return (loss(logits, batch) * batch["weights"]).sum() / batch["weights"].sum()

    assert float(eval_loss(state.trainable)) < float(eval_loss(start.trainable))
    frozen0, frozen1 = tree.flatten(start.frozen), tree.flatten(state.frozen)
    assert frozen1.keys() == frozen0.keys() and "shared/embedding" in frozen1
    for path, value in frozen0.items():
        np.testing.assert_array_equal(frozen1[path], value, err_msg=path)
    assert {k for k, v in state.trainable.items() if jax.tree.leaves(v)} == {"prompt"}
    assert np.abs(state.trainable["prompt"]["embeddings"] - prompt0).max() > 1e-3
    opt = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert sum(np.size(x) for x in opt) == 2 * 4 * 32  # adamw's mu and nu of the prompt only
