"""The speed and memory levers, each checked against the plain path on tiny models (CPU):
fused attention (XLA, Pallas splash in interpret mode) against the naive softmax, the frozen
base stored in bfloat16, LoRA never forming ``a @ b``, chunked cross-entropy, remat
policies, bfloat16 optimizer state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import pytest

from ftlab.config import ConfigError
from ftlab.methods import build_method
from ftlab.models.bert import Bert
from ftlab.models.gpt2 import GPT2, GPT2Config
from ftlab.models.layers import attention, attention_bias, padding_bias
from ftlab.models.llama import Llama, LlamaConfig
from ftlab.schema import base_config, validate
from ftlab.train import losses, optim
from ftlab.train.loop import use_fast_cpu_rng
from ftlab.train.state import TrainState
from ftlab.train.step import make_train_step, training_loss

GPT = GPT2Config(
    vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4, attn_pdrop=0.0,
    embd_pdrop=0.0, resid_pdrop=0.0,
)  # fmt: skip
LLAMA = LlamaConfig(
    vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)  # fmt: skip
B, T = 2, 24
use_fast_cpu_rng()  # as every training run does on CPU: random initialisers compile in ms


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 96, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, 17:] = 0  # right padding in the second row
    labels = np.where(mask == 1, np.roll(ids, -1, axis=1), -100).astype(np.int32)
    labels[:, -1] = -100
    labels[0, :5] = -100  # a masked prompt
    return {"input_ids": ids, "attention_mask": mask}, labels


@pytest.fixture(scope="module")
def gpt_params():
    ids, _ = _batch()
    return nn.meta.unbox(jax.jit(GPT2(GPT).init)(jax.random.key(0), ids["input_ids"]))["params"]


@pytest.fixture(scope="module")
def llama_params():
    ids, _ = _batch()
    return nn.meta.unbox(jax.jit(Llama(LLAMA).init)(jax.random.key(1), ids["input_ids"]))["params"]


# -- 1. fused attention ---------------------------------------------------------------------


def test_fused_attention_equals_naive_causal_gqa_padding():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 10, 6, 8))
    k = jax.random.normal(ks[1], (2, 10, 2, 8))  # 3 query heads per kv head
    v = jax.random.normal(ks[2], (2, 10, 2, 8))
    mask = np.ones((2, 10), int)
    mask[1, 7:] = 0
    for bias in (attention_bias(jnp.asarray(mask), 2, 10), padding_bias(jnp.asarray(mask))):
        ref = attention(q, k, v, bias, 0.3, impl="naive")
        out = attention(q, k, v, bias, 0.3, impl="xla")
        np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoders_fused_attention_equals_naive(family, gpt_params, llama_params):
    inputs, _ = _batch()
    cls, config, params = (
        (GPT2, GPT, gpt_params) if family == "gpt2" else (Llama, LLAMA, llama_params)
    )
    out = {
        impl: jax.jit(cls(config, attention_impl=impl).apply)({"params": params}, inputs)
        for impl in ("naive", "xla")
    }
    keep = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(out["xla"][keep], out["naive"][keep], atol=1e-5)


def test_encoder_fused_attention_equals_naive():
    kw = {"vocab_size": 50, "hidden_size": 32, "num_layers": 1, "num_heads": 4,
          "intermediate_size": 48, "max_position_embeddings": 32, "num_labels": 3}  # fmt: skip
    inputs, _ = _batch()
    ids = inputs["input_ids"] % 50
    params = jax.jit(Bert(**kw).init)(jax.random.key(0), ids)["params"]
    out = {
        impl: jax.jit(Bert(**kw, attention_impl=impl).apply)(
            {"params": params}, ids, inputs["attention_mask"]
        )
        for impl in ("naive", "xla")
    }
    np.testing.assert_allclose(out["xla"], out["naive"], atol=1e-5)


def test_splash_attention_kernel_in_interpret_mode_equals_naive():
    """The TPU kernel (Pallas, interpreted on CPU): causal, grouped-query, a padded row."""
    b, t, h, kvh, d = 1, 128, 2, 1, 128
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k = jax.random.normal(ks[1], (b, t, kvh, d))
    v = jax.random.normal(ks[2], (b, t, kvh, d))
    mask = np.ones((b, t), int)
    mask[0, 100:] = 0
    bias = attention_bias(jnp.asarray(mask), b, t)
    ref = attention(q, k, v, bias, d**-0.5, impl="naive")
    out = attention(q, k, v, bias, d**-0.5, impl="splash", causal=True)
    keep = mask.astype(bool)  # padded query rows are never read by a loss
    np.testing.assert_allclose(out[keep], ref[keep], atol=2e-5)


# -- 2. frozen base dtype -------------------------------------------------------------------


def _method_cfg(frozen_dtype="float32", targets=(r"attn/(q|v)_proj/kernel",)):
    c = base_config().method
    c.unlock()
    c.name, c.frozen_dtype = "lora", frozen_dtype
    c.lora.rank, c.lora.alpha, c.lora.targets = 4, 8.0, targets
    return c


def _step_fn(model, method, chunk=0, state_dtype="float32"):
    ocfg = base_config().optim
    ocfg.unlock()
    ocfg.state_dtype = state_dtype
    tx, lr = optim.optimizer(ocfg, 10)
    tcfg = mc.ConfigDict({"loss_chunk": chunk, "label_smoothing": 0.0})
    loss, kwargs = training_loss(tcfg, method, losses.per_example_loss("causal_lm"))
    return tx, jax.jit(make_train_step(model, method, tx, lr, loss, model_kwargs=kwargs))


def _lm_batch():
    inputs, labels = _batch()
    weights = (labels >= 0).sum(-1).astype(np.float32)
    return {"inputs": inputs, "labels": labels, "weights": weights}


def test_bf16_frozen_base_halves_bytes_and_steps_like_float32(gpt_params):
    model, batch = GPT2(GPT), _lm_batch()
    states, metrics = {}, {}
    for dtype in ("float32", "bfloat16"):
        method = build_method(_method_cfg(dtype), gpt_params)
        trainable, frozen = method.split(gpt_params, jax.random.key(3))
        tx, step = _step_fn(model, method)
        state = TrainState.create(trainable, frozen, tx, 0)
        states[dtype], metrics[dtype] = step(state, batch)
    f32, bf16 = states["float32"], states["bfloat16"]
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
    assert nbytes(bf16.frozen) * 2 == nbytes(f32.frozen)
    assert {x.dtype for x in jax.tree.leaves(bf16.frozen)} == {jnp.dtype(jnp.bfloat16)}
    for leaf in jax.tree.leaves((bf16.trainable, bf16.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    np.testing.assert_allclose(metrics["bfloat16"]["loss"], metrics["float32"]["loss"], rtol=1e-2)
    for a, b in zip(jax.tree.leaves(bf16.trainable), jax.tree.leaves(f32.trainable)):
        np.testing.assert_allclose(a, b, atol=2e-3)
    merged = build_method(_method_cfg("bfloat16"), gpt_params).merged_params(
        bf16.trainable, bf16.frozen
    )
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.float32)}  # export


def test_bf16_frozen_base_checkpoints_and_resumes_exactly(tmp_path, gpt_params):
    """Orbax saves and restores the bf16 leaves as bf16; a step from the restored state is
    bit-identical to one from the state that was saved (the loop's resume path)."""
    from ftlab import checkpoint

    model, batch = GPT2(GPT), _lm_batch()
    method = build_method(_method_cfg("bfloat16"), gpt_params)
    trainable, frozen = method.split(gpt_params, jax.random.key(3))
    tx, step = _step_fn(model, method)
    state, _ = step(TrainState.create(trainable, frozen, tx, 0), batch)
    ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints", save_every=1)
    ckpts.save(1, state, {}, force=True)
    ckpts.wait()
    restored, _ = ckpts.restore(TrainState.create(trainable, frozen, tx, 0))
    ckpts.close()
    leaves = jax.tree.leaves(restored.frozen)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    after = [step(s, batch)[0] for s in (state, restored)]
    for x, y in zip(jax.tree.leaves(after[0]), jax.tree.leaves(after[1])):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


# -- 3. LoRA never forms W + a @ b in the step ----------------------------------------------


def _dot_shapes(jaxpr, out):
    """Operand shapes of every ``dot_general`` in ``jaxpr`` and the jaxprs nested in it
    (scan, remat, custom derivatives, pjit)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    _dot_shapes(sub, out)
    return out


def test_lora_step_never_multiplies_a_by_b(gpt_params):
    model, batch = GPT2(GPT), _lm_batch()
    method = build_method(_method_cfg(), gpt_params)
    trainable, frozen = method.split(gpt_params, jax.random.key(3))
    tx, step = _step_fn(model, method)
    state = TrainState.create(trainable, frozen, tx, 0)
    shapes = _dot_shapes(jax.make_jaxpr(step)(state, batch).jaxpr, [])
    a, b = (GPT.n_embd, 4), (4, GPT.n_embd)
    assert any(a in s for s in shapes), "the LoRA factors should appear in the step's matmuls"
    # a @ b, or its transpose in the backward pass: an (embed, embed) product of the factors
    assert (a, b) not in shapes and (b[::-1], a[::-1]) not in shapes
    # the merged form (export) is the one that forms it
    merged = _dot_shapes(
        jax.make_jaxpr(method.merged_params)(state.trainable, state.frozen).jaxpr, []
    )
    assert (a, b) in merged


# -- 4. chunked cross-entropy ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_cross_entropy_equals_plain_loss_and_gradients(family, gpt_params, llama_params):
    cls, config, params = (
        (GPT2, GPT, gpt_params) if family == "gpt2" else (Llama, LLAMA, llama_params)
    )
    model, batch = cls(config), _lm_batch()

    def plain(p):
        logits = model.apply({"params": p}, batch["inputs"])
        return jnp.sum(losses.causal_lm_loss(logits, batch) * batch["weights"])

    def chunked(p, chunk):
        hidden, kernel = model.apply({"params": p}, batch["inputs"], return_hidden=True)
        per = losses.chunked_causal_lm_loss(hidden, kernel, batch, chunk)
        return jnp.sum(per * batch["weights"])

    ref, ref_grad = jax.jit(jax.value_and_grad(plain))(params)
    chunk = 8 if family == "gpt2" else 7  # divides the length 24; does not (padded)
    val, grad = jax.jit(jax.value_and_grad(chunked), static_argnums=1)(params, chunk)
    np.testing.assert_allclose(val, ref, atol=1e-5, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_chunked_loss_refuses_lora_on_the_lm_head(llama_params):
    method = build_method(_method_cfg(targets=("lm_head/kernel",)), llama_params)
    tcfg = mc.ConfigDict({"loss_chunk": 8, "label_smoothing": 0.0})
    with pytest.raises(ConfigError, match="loss_chunk"):
        training_loss(tcfg, method, losses.per_example_loss("causal_lm"))


# -- 5. remat policies, bf16 optimizer state ------------------------------------------------


def test_remat_policies_give_the_same_gradients(gpt_params):
    """dots and full remat, unrolled and under nn.scan, against no remat (unrolled: the
    scanned model computes the same function, tests/test_scan_layers.py)."""
    from ftlab.models.layers import stack_layers

    batch = _lm_batch()

    def grads(remat, scan):
        model = GPT2(GPT, remat=remat, scan_layers=scan)

        def loss(p):
            logits = model.apply({"params": p}, batch["inputs"], train=True)
            return jnp.sum(losses.causal_lm_loss(logits, batch) * batch["weights"])

        return jax.jit(jax.grad(loss))(stack_layers(gpt_params, "h") if scan else gpt_params)

    ref = {False: grads("none", False)}
    ref[True] = stack_layers(ref[False], "h")
    for scan in (False, True):
        for policy in ("dots", "full"):
            got = grads(policy, scan)
            for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref[scan])):
                np.testing.assert_allclose(x, y, atol=1e-6)


def test_bf16_optimizer_state(gpt_params):
    model, batch = GPT2(GPT), _lm_batch()
    method = build_method(_method_cfg(), gpt_params)
    trainable, frozen = method.split(gpt_params, jax.random.key(3))
    out = {}
    for dtype in ("float32", "bfloat16"):
        tx, step = _step_fn(model, method, state_dtype=dtype)
        state = TrainState.create(trainable, frozen, tx, 0)
        for _ in range(3):
            state, _ = step(state, batch)
        out[dtype] = state
    floats = [
        x
        for x in jax.tree.leaves(out["bfloat16"].opt_state)
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
    for a, b in zip(
        jax.tree.leaves(out["bfloat16"].trainable), jax.tree.leaves(out["float32"].trainable)
    ):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, atol=5e-3)


def test_new_keys_are_validated():
    for key, bad in [
        ("model.attention", "flash"),
        ("model.remat_policy", "some"),
        ("method.frozen_dtype", "int8"),
        ("optim.state_dtype", "float16"),
        ("train.loss_chunk", -1),
    ]:
        c = base_config()
        section, name = key.split(".")
        c[section][name] = bad
        with pytest.raises(ConfigError, match=key):
            validate(c)
    c = base_config()
    c.train.loss_chunk = 128  # the default loss is cross_entropy, not causal_lm
    with pytest.raises(ConfigError, match="train.loss_chunk"):
        validate(c)
