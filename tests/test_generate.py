"""KV-cached generation (ftlab.eval.generate) against recomputing the whole sequence each step."""

from pathlib import Path

import jax
import numpy as np
import pytest

from ftlab.eval.generate import generate
from ftlab.interop.pretrained import load_pretrained
from ftlab.methods import build_method
from ftlab.schema import base_config

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ("tiny_gpt2", "tiny_llama")
NEW = 8  # GPT-2's fixture has 16 positions: 8 prompt + 8 new
_CACHE = {}


def loaded(name):
    if name not in _CACHE:
        _CACHE[name] = load_pretrained(FIXTURES / name)
    return _CACHE[name]


# two prompts of different lengths, left-padded to 8 (row 0: 5 tokens, row 1: 8)
IDS = np.array([[0, 0, 0, 11, 23, 5, 67, 42], [3, 14, 15, 92, 65, 35, 89, 79]], np.int32)
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8], np.int32)


def gen(name, ids=IDS, mask=MASK, **kw):
    p = loaded(name)
    kw.setdefault("max_new_tokens", NEW)
    with jax.default_matmul_precision("highest"):
        out = generate(p.model, p.params, ids, mask, **kw)
    return jax.tree.map(np.asarray, out)


def uncached_greedy(name, params=None, steps=NEW):
    """Greedy decoding that reruns the model on the whole sequence each step (no cache).

    The sequence lives in a fixed (2, 8 + steps) buffer (one compile): the causal mask keeps
    the not-yet-written tail from affecting the logits read at the last written position."""
    p = loaded(name)
    total = IDS.shape[1] + steps
    ids = np.zeros((2, total), np.int32)
    mask = np.ones((2, total), np.int32)
    ids[:, : IDS.shape[1]], mask[:, : IDS.shape[1]] = IDS, MASK
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    apply = jax.jit(lambda v, i: p.model.apply(v, i, attention_mask=mask, position_ids=positions))
    tokens, logits = [], []
    for step in range(steps):
        with jax.default_matmul_precision("highest"):
            out = apply({"params": params or p.params}, ids)
        last = np.asarray(out)[:, IDS.shape[1] + step - 1]
        token = last.argmax(-1).astype(np.int32)
        tokens.append(token)
        logits.append(last)
        ids[:, IDS.shape[1] + step] = token
    return np.stack(tokens, 1), np.stack(logits, 1)


_REF = {}


def reference(name):
    if name not in _REF:
        _REF[name] = uncached_greedy(name)
    return _REF[name]


@pytest.mark.parametrize("name", NAMES)
def test_cached_greedy_equals_uncached(name):
    want_tokens, want_logits = reference(name)
    out = gen(name, return_logits=True)
    assert out.tokens.shape == (2, NEW) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.tokens, want_tokens)
    assert np.abs(out.logits - want_logits).max() < 1e-4
    np.testing.assert_array_equal(out.lengths, [NEW, NEW])
    # The padded row decodes as the same prompt alone, unpadded (positions restart at 0).
    alone = gen(name, IDS[:1, 3:], MASK[:1, 3:], return_logits=True)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[0])
    assert np.abs(alone.logits[0] - out.logits[0]).max() < 1e-4
    # Right padding is accepted: shifted to the left-padded layout first.
    right_ids = np.stack([np.roll(IDS[0], -3), IDS[1]])
    right_mask = np.stack([np.roll(MASK[0], -3), MASK[1]])
    right = gen(name, right_ids, right_mask, return_logits=True)
    np.testing.assert_array_equal(right.tokens, out.tokens)


@pytest.mark.parametrize("name", NAMES)
def test_decode_prefill_matches_plain_call(name):
    """One decode=True call on a fresh cache gives the plain forward pass's logits."""
    from ftlab.eval.generate import init_cache

    p = loaded(name)
    cache = init_cache(p.model, 2, 12)
    assert int(cache["cache_index"]) == 0 and cache["key_mask"].shape == (2, 12)
    positions = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)
    plain_fn = jax.jit(lambda v: p.model.apply(v, IDS, attention_mask=MASK, position_ids=positions))
    cached_fn = jax.jit(
        lambda v: p.model.apply(v, IDS, attention_mask=MASK, decode=True, mutable=["cache"])
    )
    with jax.default_matmul_precision("highest"):
        plain = plain_fn({"params": p.params})
        cached, state = cached_fn({"params": p.params, "cache": cache})
    keep = MASK.astype(bool)
    assert np.abs(np.asarray(plain) - np.asarray(cached))[keep].max() < 1e-5
    assert int(state["cache"]["cache_index"]) == 8
    np.testing.assert_array_equal(state["cache"]["positions"], [5, 8])


def test_sampling_deterministic_and_filters():
    name = "tiny_llama"
    greedy = gen(name).tokens
    kw = {"method": "sample", "temperature": 1.0}
    a = gen(name, rng=jax.random.key(1), **kw).tokens
    b = gen(name, rng=jax.random.key(1), **kw).tokens
    c = gen(name, rng=jax.random.key(2), **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, greedy)
    top1 = gen(name, rng=jax.random.key(3), top_k=1, **kw).tokens
    np.testing.assert_array_equal(top1, greedy)
    nucleus = gen(name, rng=jax.random.key(4), top_p=1e-6, **kw).tokens
    np.testing.assert_array_equal(nucleus, greedy)
    hot = gen(name, rng=jax.random.key(5), top_k=5, temperature=3.0, method="sample").tokens
    assert not np.array_equal(hot, greedy)


def test_eos_stops_a_row_and_pads_after():
    name = "tiny_llama"
    greedy = reference(name)[0]
    eos = int(greedy[0, 2])
    out = gen(name, eos_token_id=eos, pad_token_id=-1)
    for row in range(2):
        hits = np.flatnonzero(greedy[row] == eos)
        stop = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(out.tokens[row, :stop], greedy[row, :stop])
        assert (out.tokens[row, stop:] == -1).all()
        assert out.lengths[row] == stop
    assert out.lengths[0] == 3 and (out.tokens[0, 3:] == -1).all()
    # Every row stopping at its first token ends the loop: the rest is padding.
    first = gen(name, eos_token_id=[int(greedy[0, 0]), int(greedy[1, 0])], pad_token_id=-1)
    np.testing.assert_array_equal(first.tokens[:, 0], greedy[:, 0])
    assert (first.tokens[:, 1:] == -1).all()
    np.testing.assert_array_equal(first.lengths, [1, 1])


def test_lora_generates_unmerged_as_merged():
    name = "tiny_gpt2"
    p = loaded(name)
    cfg = base_config().method
    cfg.name, cfg.lora.targets = "lora", (r"attn/(q|v)_proj/kernel",)
    method = build_method(cfg, p.params)
    trainable, frozen = method.split(p.params, jax.random.key(0))
    trainable["lora"] = jax.tree.map(lambda x: x + 0.3, trainable["lora"])
    with jax.default_matmul_precision("highest"):
        factored = generate(
            p.model,
            None,
            IDS,
            MASK,
            max_new_tokens=NEW,
            adapter=method,
            trainable=trainable,
            frozen=frozen,
            return_logits=True,
        )
        merged = generate(
            p.model,
            method.merged_params(trainable, frozen),
            IDS,
            MASK,
            max_new_tokens=NEW,
            return_logits=True,
        )
    np.testing.assert_array_equal(np.asarray(factored.tokens), np.asarray(merged.tokens))
    assert np.abs(np.asarray(factored.logits) - np.asarray(merged.logits)).max() < 1e-4
    base_logits = reference(name)[1]
    assert np.abs(np.asarray(factored.logits[:, 0]) - base_logits[:, 0]).max() > 1e-3


def test_argument_errors():
    p = loaded("tiny_gpt2")
    with pytest.raises(ValueError, match="choose one of greedy, sample"):
        generate(p.model, p.params, IDS, MASK, max_new_tokens=2, method="beam")
    with pytest.raises(ValueError, match="needs an rng"):
        generate(p.model, p.params, IDS, MASK, max_new_tokens=2, method="sample")
    with pytest.raises(ValueError, match="method='greedy' only"):
        generate(p.model, p.params, IDS, MASK, max_new_tokens=2, method="sample", num_beams=2)
    with pytest.raises(ValueError, match="prompt_mask shape"):
        generate(p.model, p.params, IDS, MASK[:, :4], max_new_tokens=2)


def sequence_logprob(name, tokens, lengths):
    """Sum of log-probabilities of each row's first ``lengths`` tokens after its prompt."""
    p = loaded(name)
    ids = np.concatenate([IDS, tokens], axis=1)
    mask = np.concatenate([MASK, np.ones(tokens.shape, np.int32)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with jax.default_matmul_precision("highest"):
        logits = p.model.apply(
            {"params": p.params}, ids, attention_mask=mask, position_ids=positions
        )
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))[:, IDS.shape[1] - 1 : -1]
    picked = np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return np.array([picked[b, : lengths[b]].sum() for b in range(len(tokens))])


def test_beam_search_scores_and_length_penalty():
    name, steps = "tiny_llama", NEW
    greedy_tokens = reference(name)[0]
    beam = gen(name, max_new_tokens=steps, num_beams=3, length_penalty=0.0)
    assert beam.logits is None and beam.scores.shape == (2,)
    np.testing.assert_array_equal(beam.lengths, [steps, steps])
    # The cached, reordered beams score what the model gives the sequence without a cache.
    want = sequence_logprob(name, beam.tokens, beam.lengths)
    assert np.abs(beam.scores - want).max() < 1e-4
    assert not np.array_equal(beam.tokens, greedy_tokens)
    assert (want >= sequence_logprob(name, greedy_tokens, [steps, steps]) - 1e-5).all()
    # With EOS: finished hypotheses are scored sum_logprobs / generated_length ** penalty.
    eos = int(beam.tokens[0, 0])
    out = gen(name, max_new_tokens=steps, num_beams=3, length_penalty=0.5, eos_token_id=eos)
    assert out.lengths[0] == 1 and (out.lengths <= steps).all()
    for row in range(2):
        n = out.lengths[row]
        assert (out.tokens[row, n:] == 0).all()
        assert (out.tokens[row, : n - 1] != eos).all()
    want = sequence_logprob(name, out.tokens, out.lengths) / out.lengths**0.5
    assert np.abs(out.scores - want).max() < 1e-4


def test_beam_search_exhaustive_when_beams_cover_vocab():
    """100 beams over a 100-token vocabulary, two steps: the best pair of all 10,000."""
    name = "tiny_gpt2"
    beam = gen(name, max_new_tokens=2, num_beams=100, length_penalty=0.0)
    p = loaded(name)
    ids = np.concatenate([np.repeat(IDS, 100, 0), np.tile(np.arange(100), 2)[:, None]], axis=1)
    mask = np.concatenate([np.repeat(MASK, 100, 0), np.ones((200, 1), np.int32)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with jax.default_matmul_precision("highest"):
        logits = p.model.apply(
            {"params": p.params}, ids, attention_mask=mask, position_ids=positions
        )
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    first = logp[::100, -2, :]  # (2, vocab): log p(t1 | prompt)
    second = logp[:, -1, :].reshape(2, 100, 100)  # log p(t2 | prompt, t1)
    total = first[:, :, None] + second
    best = np.array([np.unravel_index(np.argmax(t), t.shape) for t in total])
    np.testing.assert_array_equal(beam.tokens, best)
    assert np.abs(beam.scores - total.reshape(2, -1).max(1)).max() < 1e-4


def test_no_repeat_ngram():
    def repeats(row, n):
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        return len(grams) != len(set(grams))

    name = "tiny_gpt2"
    full = lambda out: [np.concatenate([IDS[b][MASK[b] == 1], out.tokens[b]]) for b in range(2)]
    greedy = reference(name)[0]
    assert any(repeats(np.concatenate([IDS[b][MASK[b] == 1], greedy[b]]), 2) for b in range(2))
    for n, kw in ((2, {}), (2, {"num_beams": 2})):
        out = gen(name, no_repeat_ngram_size=n, **kw)
        assert not any(repeats(r, n) for r in full(out))


def test_quantized_base_without_lora_generates():
    """A frozen probe over an int8 base (no LoRA factors): the cached decoder dequantises
    through the method's interceptor, as ``Method.apply`` does; its greedy tokens are the
    argmax of uncached forwards through ``Method.apply``."""
    name = "tiny_gpt2"
    p = loaded(name)
    cfg = base_config().method
    cfg.name, cfg.trainable, cfg.quantize = "frozen", ("ln_f/",), "int8"
    method = build_method(cfg, p.params)
    assert method.quantized and not method.lora_targets
    trainable, frozen = method.split(p.params, jax.random.key(0))
    with jax.default_matmul_precision("highest"):
        out = generate(
            p.model,
            None,
            IDS,
            MASK,
            max_new_tokens=NEW,
            adapter=method,
            trainable=trainable,
            frozen=frozen,
            return_logits=True,
        )
    total = IDS.shape[1] + NEW
    ids = np.zeros((2, total), np.int32)
    mask = np.ones((2, total), np.int32)
    ids[:, : IDS.shape[1]], mask[:, : IDS.shape[1]] = IDS, MASK
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    kwargs = {"attention_mask": mask, "position_ids": positions}
    apply = jax.jit(lambda t, f, i: method.apply(p.model, t, f, i, train=False, **kwargs))
    tokens, logits = [], []
    for step in range(NEW):
        with jax.default_matmul_precision("highest"):
            last = np.asarray(apply(trainable, frozen, ids))[:, IDS.shape[1] + step - 1]
        tokens.append(last.argmax(-1).astype(np.int32))
        logits.append(last)
        ids[:, IDS.shape[1] + step] = tokens[-1]
    np.testing.assert_array_equal(np.asarray(out.tokens), np.stack(tokens, 1))
    assert np.abs(np.asarray(out.logits) - np.stack(logits, 1)).max() < 1e-4
    # int8 rounding moved the logits off the float32 model's (the base really is quantised)
    assert np.abs(np.asarray(out.logits[:, 0]) - reference(name)[1][:, 0]).max() > 1e-6
