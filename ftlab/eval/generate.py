"""Batched autoregressive generation for ftlab's decoders (GPT-2, LLaMA) with a key/value cache,
and for encoder-decoders (T5: ``generate_seq2seq``, the same search after one encoder pass).

``generate`` prefills the prompts in one call of the model with ``decode=True`` (see
``ftlab.models.layers.Decoder``) and then decodes one token a step inside a jitted
``jax.lax.while_loop``; the loop ends when every row has emitted an EOS token or after
``max_new_tokens`` steps. ``num_beams`` > 1 runs Hugging Face's beam search instead
(``length_penalty``; ``no_repeat_ngram_size`` applies to every method).

Padding convention: the prompts share one cache index, so they are run **left-padded** (real
tokens at the right end of each row, ``prompt_mask`` 1 on them, 0 on padding). Right-padded
rows (a contiguous run of real tokens from the left) are shifted to the right first, so either
padding is accepted; each row needs at least one real token. A left-padded row gets the
positions ``0, 1, ...`` it would have had unpadded (``cumsum(mask) - 1``, as Hugging Face), so
its tokens do not depend on how much padding the batch needed.

LoRA (or any ``ftlab.methods.Method``): pass ``adapter=method, trainable=..., frozen=...``
(``params`` may then be None). The LoRA factors run inside their layers through the method's
interceptor, unmerged, exactly as ``Method.apply``; ``adapter.merged_params(trainable, frozen)``
as ``params`` gives the same tokens up to float rounding. A prompt-tuning adapter's soft prompt
(``Method.prompt_tokens`` = v) is prepended at the prefill (``prompt_embeds``, see
``ftlab.models.layers.Decoder``); the cache has v more slots, and there is no merged form.
``generate_seq2seq`` gives T5's encoder the soft prompt instead (``T5.encode(prompt_embeds=...)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.methods import Method
from ftlab.methods import lora as lora_lib

METHODS = ("greedy", "sample")


class Generated(NamedTuple):
    """What ``generate`` returns.

    ``tokens``: (batch, max_new_tokens) int32 new tokens, the EOS included, ``pad_token_id``
    after it (and in steps never run because every row had finished); ``lengths``: (batch,)
    tokens generated per row (EOS included); ``logits``: (batch, max_new_tokens, vocab) float32
    raw (unprocessed) logits each token was chosen from, with ``return_logits`` (else None;
    zeros for steps never run; beam search: None); ``scores``: (batch,) beam search's score
    of each returned sequence (sum of log-probabilities / length ** length_penalty), else None.
    """

    tokens: jax.Array
    lengths: jax.Array
    logits: jax.Array | None
    scores: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class _Settings:
    max_new_tokens: int
    method: str
    eos: tuple[int, ...]
    pad: int
    num_beams: int
    length_penalty: float
    no_repeat_ngram_size: int
    adapter: Method | None
    return_logits: bool


def init_cache(model: nn.Module, batch: int, max_length: int) -> dict:
    """An empty ``cache`` collection for ``batch`` rows of up to ``max_length`` tokens.

    Shapes come from ``model.init(..., decode=True)`` under ``jax.eval_shape`` (nothing is
    computed); every leaf is zeros (cache index 0, no slot filled).
    """

    def init():
        ids = jnp.zeros((batch, max_length), jnp.int32)
        return model.init(jax.random.key(0), ids, decode=True)["cache"]

    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init))


def left_pad(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows shifted right so that each row's last real token is in the last column.

    Left-padded rows are unchanged; a right-padded row (real tokens first) becomes left-padded.
    """
    length = ids.shape[1]
    mask = jnp.asarray(mask).astype(bool)
    last = jnp.argmax(jnp.where(mask, jnp.arange(length)[None], -1), axis=1)
    shift = length - 1 - last
    roll = jax.vmap(lambda row, s: jnp.roll(row, s))
    return roll(ids, shift), roll(mask, shift)


def _filter(logits: jax.Array, knobs: dict[str, jax.Array]) -> jax.Array:
    """Temperature, then top-k (``top_k`` 0: off), then top-p (``top_p`` 1: off) filtering of
    (batch, vocab) logits. The knobs are traced, so changing them does not recompile."""
    logits = logits / knobs["temperature"]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    vocab = logits.shape[-1]
    k = jnp.where(knobs["top_k"] > 0, jnp.minimum(knobs["top_k"], vocab), vocab)
    kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    ordered = jnp.where(jnp.arange(vocab)[None] < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ahead of each token
    keep = (before < knobs["top_p"]).at[:, 0].set(True)  # at least the most likely token
    threshold = jnp.take_along_axis(ordered, (keep.sum(axis=-1) - 1)[:, None], axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _choose(logits: jax.Array, key: jax.Array, s: _Settings, knobs) -> jax.Array:
    if s.method == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, _filter(logits, knobs), axis=-1).astype(jnp.int32)


def banned_ngrams(history: jax.Array, valid: jax.Array, filled: jax.Array, n: int, vocab: int):
    """(rows, vocab) True where a token would repeat an ``n``-gram already in the history.

    ``history`` (rows, capacity) tokens of which the first ``filled`` columns are written;
    ``valid`` marks real tokens (prompt padding takes part in no n-gram). As Hugging Face's
    ``no_repeat_ngram_size``: the last ``n - 1`` tokens, followed by the candidate, may not
    form an n-gram that occurred before.
    """
    rows, capacity = history.shape
    if n < 1 or capacity < n:
        return jnp.zeros((rows, vocab), bool)
    starts = jnp.arange(capacity - n + 1)
    windows = jnp.stack([history[:, starts + j] for j in range(n)], axis=-1)  # (rows, W, n)
    ok = jnp.stack([valid[:, starts + j] for j in range(n)], axis=-1).all(-1)
    ok = ok & (starts + n <= filled)[None]
    if n > 1:
        last = jax.lax.dynamic_slice_in_dim(history, filled - (n - 1), n - 1, axis=1)
        ok = ok & (windows[..., :-1] == last[:, None]).all(-1)
        ok = ok & (filled >= n - 1)
    hits = jnp.zeros((rows, vocab), jnp.int32)
    hits = hits.at[jnp.arange(rows)[:, None], windows[..., -1]].add(ok.astype(jnp.int32))
    return hits > 0


def _forward(model, s: _Settings, params, factors):
    def forward(cache, tokens, tokens_mask, prompt=None):
        extra = {} if prompt is None else {"prompt_embeds": prompt}  # soft prompt: prefill only

        def call():
            return model.apply(
                {"params": params, "cache": cache},
                tokens,
                attention_mask=tokens_mask,
                decode=True,
                mutable=["cache"],
                **extra,
            )

        logits, state = _intercepted(s, factors, call)
        return logits[:, -1].astype(jnp.float32), state["cache"]

    return forward


def _run(
    model, s: _Settings, params, factors, ids, mask, rng, knobs, prefill=None, prompt=None
) -> Generated:
    """``prefill(ids, mask) -> (last logits, cache)`` replaces the prompt's pass through a
    fresh cache (an encoder-decoder primes its cache with the encoder: ``generate_seq2seq``);
    ``prompt`` (v, embed): a soft prompt (prompt tuning) prepended at the prefill."""
    if s.num_beams > 1:
        return _beam_search(model, s, params, factors, ids, mask, prefill, prompt)
    batch, length = ids.shape
    ids, mask = left_pad(ids, mask)
    eos = jnp.asarray(s.eos if s.eos else (-1,), jnp.int32)
    forward = _forward(model, s, params, factors)
    history = jnp.concatenate([ids, jnp.zeros((batch, s.max_new_tokens), jnp.int32)], axis=1)
    valid = jnp.concatenate([mask, jnp.zeros((batch, s.max_new_tokens), bool)], axis=1)

    def pick(logits, step, finished, history, valid):
        chosen = logits
        if s.no_repeat_ngram_size > 0:
            ban = banned_ngrams(
                history, valid, length + step, s.no_repeat_ngram_size, logits.shape[-1]
            )
            chosen = jnp.where(ban, -jnp.inf, logits)
        token = _choose(chosen, jax.random.fold_in(rng, step), s, knobs)
        token = jnp.where(finished, s.pad, token)
        history = history.at[:, length + step].set(token)
        valid = valid.at[:, length + step].set(~finished)
        return token, finished | jnp.isin(token, eos), history, valid

    if prefill is None:
        room = length + s.max_new_tokens + (0 if prompt is None else prompt.shape[0])
        logits, cache = forward(init_cache(model, batch, room), ids, mask, prompt)
    else:
        logits, cache = prefill(ids, mask)
    finished = jnp.zeros((batch,), bool)
    token, done, history, valid = pick(logits, 0, finished, history, valid)
    tokens = jnp.full((batch, s.max_new_tokens), s.pad, jnp.int32).at[:, 0].set(token)
    lengths = jnp.ones((batch,), jnp.int32)
    vocab = logits.shape[-1]
    all_logits = jnp.zeros((batch, s.max_new_tokens if s.return_logits else 0, vocab))
    if s.return_logits:
        all_logits = all_logits.at[:, 0].set(logits)

    def cond(state):
        step, _, done, *_ = state
        return (step < s.max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, done, cache, tokens, lengths, all_logits, history, valid = state
        # finished rows feed their (masked) pad, clipped to a valid id
        fed = jnp.clip(token, 0, vocab - 1)[:, None]
        logits, cache = forward(cache, fed, ~done[:, None])
        lengths = lengths + (~done).astype(jnp.int32)
        token, done, history, valid = pick(logits, step, done, history, valid)
        tokens = tokens.at[:, step].set(token)
        if s.return_logits:
            all_logits = all_logits.at[:, step].set(logits)
        return step + 1, token, done, cache, tokens, lengths, all_logits, history, valid

    state = (jnp.int32(1), token, done, cache, tokens, lengths, all_logits, history, valid)
    _, _, _, _, tokens, lengths, all_logits, _, _ = jax.lax.while_loop(cond, body, state)
    return Generated(tokens, lengths, all_logits if s.return_logits else None)


def _beam_search(
    model, s: _Settings, params, factors, ids, mask, prefill=None, prompt=None
) -> Generated:
    """Hugging Face's (vectorised, transformers >= 4.50) beam search, ``early_stopping=False``.

    Each step keeps the ``max(2, 1 + n_eos) * num_beams`` best continuations of all beams; the
    best ``num_beams`` not ending in EOS run on, those among the first ``num_beams`` that end in
    EOS (or reach ``max_new_tokens``) become finished hypotheses scored
    ``sum_logprobs / generated_length ** length_penalty``; a row stops once its best running
    beam can no longer beat its worst finished one (HF's heuristic).
    """
    batch, length = ids.shape
    k, steps = s.num_beams, s.max_new_tokens
    ids, mask = left_pad(ids, mask)
    ids, mask = jnp.repeat(ids, k, axis=0), jnp.repeat(mask, k, axis=0)
    rows = batch * k
    forward = _forward(model, s, params, factors)
    eos = jnp.asarray(s.eos if s.eos else (-1,), jnp.int32)
    keep = max(2, 1 + len(s.eos)) * k
    neg = jnp.float32(-1.0e9)
    if prefill is None:
        room = length + steps + (0 if prompt is None else prompt.shape[0])
        logits, cache = forward(init_cache(model, rows, room), ids, mask, prompt)
    else:
        logits, cache = prefill(ids, mask)
    vocab = logits.shape[-1]
    history = jnp.concatenate([ids, jnp.zeros((rows, steps), jnp.int32)], axis=1)
    valid = jnp.concatenate([mask, jnp.zeros((rows, steps), bool)], axis=1)

    def gather(x, index):  # x (batch, beams, ...), index (batch, n)
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def body(state):
        step, logits, cache, history, valid, run_seq, run_score, fin_seq, fin_score, fin, open_ = (
            state
        )
        logp = jax.nn.log_softmax(logits, axis=-1)
        if s.no_repeat_ngram_size > 0:
            ban = banned_ngrams(history, valid, length + step, s.no_repeat_ngram_size, vocab)
            logp = jnp.where(ban, -jnp.inf, logp)
        acc = (logp.reshape(batch, k, vocab) + run_score[..., None]).reshape(batch, k * vocab)
        top_lp, top_idx = jax.lax.top_k(acc, keep)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand = gather(run_seq, parent).at[:, :, step].set(token)
        hits = jnp.isin(token, eos) | (step + 1 >= steps)
        # running beams: the best k candidates that did not stop
        run_lp = top_lp + hits.astype(jnp.float32) * neg
        run_lp, nxt = jax.lax.top_k(run_lp, k)
        run_seq, run_parent, run_token = gather(cand, nxt), gather(parent, nxt), gather(token, nxt)
        # finished hypotheses: candidates among the first k that stopped
        just = hits & (jnp.arange(keep) < k)[None]
        scores = top_lp / ((step + 1.0) ** s.length_penalty)
        scores = scores + (~open_[:, None]).astype(jnp.float32) * neg + (~just) * neg
        all_seq = jnp.concatenate([fin_seq, cand], axis=1)
        all_score = jnp.concatenate([fin_score, scores], axis=1)
        all_fin = jnp.concatenate([fin, just], axis=1)
        fin_score, best = jax.lax.top_k(all_score, k)
        fin_seq, fin = gather(all_seq, best), gather(all_fin, best)
        # reorder the cache and the history to the running beams' parents, append their tokens
        flat = (run_parent + jnp.arange(batch)[:, None] * k).reshape(rows)
        cache = jax.tree.map(
            lambda x: x[flat] if (x.ndim >= 1 and x.shape[0] == rows) else x, cache
        )
        history = history[flat].at[:, length + step].set(run_token.reshape(rows))
        valid = valid[flat].at[:, length + step].set(True)
        # HF's early-stop heuristic (early_stopping=False)
        best_running = run_lp[:, 0] / ((step + 1.0) ** s.length_penalty)
        worst = jnp.where(fin.all(axis=1), fin_score.min(axis=1), neg)
        open_ = open_ & (best_running > worst)
        go_on = (step + 1 < steps) & jnp.any(open_)
        logits, cache = jax.lax.cond(
            go_on,
            lambda c: forward(c, run_token.reshape(rows, 1), jnp.ones((rows, 1), bool)),
            lambda c: (logits, c),
            cache,
        )
        new = (step + 1, logits, cache, history, valid, run_seq, run_lp, fin_seq, fin_score)
        return new + (fin, open_)

    def cond(state):
        step, *_, open_ = state
        return (step < steps) & jnp.any(open_)

    run_seq = jnp.full((batch, k, steps), s.pad, jnp.int32)
    run_score = jnp.full((batch, k), neg).at[:, 0].set(0.0)
    fin_seq = jnp.full((batch, k, steps), s.pad, jnp.int32)
    fin_score = jnp.full((batch, k), neg)
    fin = jnp.zeros((batch, k), bool)
    open_ = jnp.ones((batch,), bool)
    state = (jnp.int32(0), logits, cache, history, valid, run_seq, run_score)
    state = jax.lax.while_loop(cond, body, state + (fin_seq, fin_score, fin, open_))
    tokens, scores = state[7][:, 0], state[8][:, 0]
    is_eos = jnp.isin(tokens, eos)
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, steps)
    return Generated(tokens, lengths.astype(jnp.int32), None, scores)


_run_jit = jax.jit(_run, static_argnums=(0, 1))


def generate(
    model: nn.Module,
    params: Mapping | None,
    prompt_ids: Any,
    prompt_mask: Any = None,
    *,
    max_new_tokens: int,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    adapter: Method | None = None,
    trainable: Mapping | None = None,
    frozen: Mapping | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    return_logits: bool = False,
) -> Generated:
    """Generate up to ``max_new_tokens`` tokens after each prompt (jitted, batched).

    ``prompt_ids`` (batch, length) with ``prompt_mask`` (1 = token, 0 = padding; default all
    ones), left- or right-padded (see the module docstring). ``method="greedy"`` takes the
    argmax; ``"sample"`` samples from ``softmax(logits / temperature)`` restricted to the
    ``top_k`` most likely tokens and then to the smallest set whose probability reaches
    ``top_p`` (as Hugging Face), with ``rng`` (step ``i`` uses ``fold_in(rng, i)``). A row stops
    at its first token in ``eos_token_id`` (an id or several) and is ``pad_token_id`` after.
    With ``adapter`` (a ``Method``), the model runs on ``adapter``'s ``trainable`` and
    ``frozen`` trees with LoRA factored; ``params`` is then ignored. ``num_beams`` > 1 runs
    beam search (greedy method only; see ``_beam_search``) and returns each row's best
    hypothesis; ``no_repeat_ngram_size`` n > 0 bans tokens that would repeat an n-gram of the
    prompt's real tokens and the generated ones (Hugging Face also counts padding tokens). The cache holds
    ``length + max_new_tokens`` positions (GPT-2: at most ``n_positions``), plus the soft
    prompt's v of a prompt-tuning adapter (prepended at the prefill).
    """
    args = _setup(
        params,
        prompt_ids,
        prompt_mask,
        max_new_tokens=max_new_tokens,
        method=method,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        rng=rng,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        adapter=adapter,
        trainable=trainable,
        frozen=frozen,
        num_beams=num_beams,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        return_logits=return_logits,
    )
    return _run_jit(model, *args, prompt=_soft_prompt(adapter, trainable))


def _setup(
    params,
    prompt_ids,
    prompt_mask,
    *,
    max_new_tokens,
    method,
    temperature,
    top_k,
    top_p,
    rng,
    eos_token_id,
    pad_token_id,
    adapter,
    trainable,
    frozen,
    num_beams,
    length_penalty,
    no_repeat_ngram_size,
    return_logits,
) -> tuple:
    """``generate``'s checks; ``(settings, params, factors, ids, mask, key, knobs)`` for
    ``_run``."""
    if method not in METHODS:
        raise ValueError(f"generate method {method!r}: choose one of {', '.join(METHODS)}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if num_beams > 1 and method != "greedy":
        raise ValueError("beam search (num_beams > 1) runs with method='greedy' only")
    if num_beams > 1 and return_logits:
        raise ValueError("return_logits is not available with beam search")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if method == "sample":
        if rng is None:
            raise ValueError('method="sample" needs an rng')
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    ids = jnp.asarray(prompt_ids, jnp.int32)
    if ids.ndim != 2:
        raise ValueError(f"prompt_ids must be (batch, length), got shape {ids.shape}")
    mask = jnp.ones(ids.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"prompt_mask shape {mask.shape} differs from prompt_ids {ids.shape}")
    if eos_token_id is None:
        eos: tuple[int, ...] = ()
    elif isinstance(eos_token_id, int):
        eos = (eos_token_id,)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    factors = None
    if adapter is not None:
        if trainable is None or frozen is None:
            raise ValueError("generate with an adapter needs its trainable and frozen trees")
        params = adapter.base_params(trainable, frozen)
        # the interceptor runs LoRA factors and dequantises quantised frozen kernels (QLoRA,
        # or a quantised base with no LoRA at all), as Method.apply installs it
        if adapter.lora_targets or adapter.quantized:
            by_kernel = adapter.lora_factors(trainable)
            factors = {p.rsplit("/", 1)[0]: f for p, f in by_kernel.items()}
    elif params is None:
        raise ValueError("generate needs params (or an adapter with trainable and frozen)")
    settings = _Settings(
        max_new_tokens,
        method,
        eos,
        int(pad_token_id),
        num_beams,
        float(length_penalty),
        no_repeat_ngram_size,
        adapter,
        return_logits,
    )
    knobs = {
        "temperature": jnp.float32(temperature),
        "top_k": jnp.int32(top_k or 0),
        "top_p": jnp.float32(1.0 if top_p is None else top_p),
    }
    key = jax.random.key(0) if rng is None else rng
    return settings, params, factors, ids, mask.astype(bool), key, knobs


# -- encoder-decoder models (T5) ------------------------------------------------------------


def _soft_prompt(adapter: Method | None, trainable: Mapping | None) -> jax.Array | None:
    """A prompt-tuning adapter's soft prompt (v, embed), else None."""
    return adapter.prompt_embeddings(trainable) if getattr(adapter, "prompt_tokens", 0) else None


def _intercepted(s: _Settings, factors, call):
    """``call()`` with the LoRA factors (and dequantisation) running inside their layers."""
    if factors is None:
        return call()
    with nn.intercept_methods(lora_lib.interceptor(factors, s.adapter.lora, None)):
        return call()


def _run_seq2seq(
    model, s: _Settings, params, factors, source, source_mask, start, rng, knobs, prompt=None
):
    """``_run`` for an encoder-decoder (``T5``, ``Whisper``): the decoder prompt is ``start``
    (a (prefix,) run of tokens, the same for every row: T5's start token, Whisper's forced
    prefix). The encoder runs once per source row (``model.encode``; ``source``: token ids or
    Whisper's log-mel features); the prefill primes every layer's cross-attention keys /
    values from its output (and the self-attention cache with the prefix). Beam search
    repeats the encoder's output per beam, as Hugging Face does, so the encoder's cost does
    not grow with the beams. ``prompt`` (v, embed): a soft prompt (prompt tuning) the encoder
    reads before the source (``T5.encode(prompt_embeds=...)``); its v positions are then part
    of the source, so the source mask gets v leading ones."""
    batch = source.shape[0]
    total = start.shape[0] + s.max_new_tokens
    extra = {} if prompt is None else {"prompt_embeds": prompt}
    context = _intercepted(
        s,
        factors,
        lambda: model.apply(
            {"params": params}, source, source_mask, method=type(model).encode, **extra
        ),
    )
    if prompt is not None:  # the encoder's output covers the v prompt positions too
        ones = jnp.ones((batch, prompt.shape[0]), source_mask.dtype)
        source_mask = jnp.concatenate([ones, source_mask], axis=1)

    def prefill(ids, mask):
        rows = ids.shape[0]
        src_mask = jnp.repeat(source_mask, rows // batch, axis=0)
        encoded = jnp.repeat(context, rows // batch, axis=0)

        def init():
            dec = jnp.zeros((rows, total), jnp.int32)
            variables = model.init(
                jax.random.key(0),
                None,
                src_mask,
                decoder_input_ids=dec,
                encoder_hidden_states=encoded,
                decode=True,
            )
            return variables["cache"]

        cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(init))

        def call():
            return model.apply(
                {"params": params, "cache": cache},
                None,
                src_mask,
                decoder_input_ids=ids,
                decoder_attention_mask=mask,
                encoder_hidden_states=encoded,
                decode=True,
                mutable=["cache"],
            )

        logits, state = _intercepted(s, factors, call)
        return logits[:, -1].astype(jnp.float32), state["cache"]

    ids = jnp.broadcast_to(start[None], (batch, start.shape[0]))
    return _run(model, s, params, factors, ids, jnp.ones(ids.shape, bool), rng, knobs, prefill)


_run_seq2seq_jit = jax.jit(_run_seq2seq, static_argnums=(0, 1))


def generate_seq2seq(
    model: nn.Module,
    params: Mapping | None,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    max_new_tokens: int,
    decoder_start_token_id: int | Sequence[int] | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    adapter: Method | None = None,
    trainable: Mapping | None = None,
    frozen: Mapping | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    return_logits: bool = False,
    input_features: Any = None,
) -> Generated:
    """``generate`` for an encoder-decoder (``ftlab.models.t5.T5``): the source
    ``input_ids`` / ``attention_mask`` (either padding) go through the encoder once, the
    decoder starts from ``decoder_start_token_id`` and runs with its key/value cache (see
    ``T5``). Start, EOS and pad ids default to the model config's. Same methods, knobs and
    ``Generated`` as ``generate`` (``tokens``: the new tokens, the start token not included;
    Hugging Face's ``generate`` output is the start token followed by them).

    Whisper (``ftlab.models.whisper.Whisper``): ``input_features`` (batch, mels, frames)
    replace ``input_ids`` / ``attention_mask``, and ``decoder_start_token_id`` is the forced
    prefix (``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>``; a sequence of ids
    is a prefix for any model), which every row starts from.

    A prompt-tuning ``adapter`` (T5): the encoder reads its soft prompt before each source (as
    PEFT's ``PeftModelForSeq2SeqLM.generate``), and the decoder attends to those v positions
    too (the source mask gets v leading ones).
    """
    cfg = getattr(model, "config", None)
    if decoder_start_token_id is None:
        decoder_start_token_id = getattr(cfg, "decoder_start_token_id", None)
    if decoder_start_token_id is None:
        raise ValueError("generate_seq2seq needs a decoder_start_token_id")
    if eos_token_id is None:
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(cfg, "pad_token_id", 0) or 0
    if input_features is not None:  # Whisper: log-mel features, no source mask
        if input_ids is not None:
            raise ValueError("generate_seq2seq takes input_ids or input_features, not both")
        features = jnp.asarray(input_features, jnp.float32)
        input_ids, attention_mask = np.zeros((features.shape[0], 1), np.int32), None
    s, params, factors, ids, mask, key, knobs = _setup(
        params,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        method=method,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        rng=rng,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        adapter=adapter,
        trainable=trainable,
        frozen=frozen,
        num_beams=num_beams,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        return_logits=return_logits,
    )
    start = jnp.atleast_1d(jnp.asarray(decoder_start_token_id, jnp.int32))
    if start.ndim != 1 or not start.shape[0]:
        raise ValueError(
            f"decoder_start_token_id must be an id or a non-empty run of ids, got shape "
            f"{start.shape}"
        )
    if input_features is not None:
        ids = features
    prompt = _soft_prompt(adapter, trainable)
    return _run_seq2seq_jit(model, s, params, factors, ids, mask, start, key, knobs, prompt=prompt)


def decode_sources(
    model: nn.Module,
    method: Method,
    trainable: Mapping,
    frozen: Mapping,
    sources: Sequence[Sequence[int]],
    tokenizer: Any,
    cfg: Any,
) -> list[str]:
    """The text an encoder-decoder writes for each source (token ids, as training encoded
    them: ``ftlab.data.text.seq2seq_arrays``), with ``config.eval``'s decoding settings
    (``batch_size``, ``max_new_tokens``, ``num_beams``, ``length_penalty``,
    ``no_repeat_ngram_size``), LoRA factored through ``method``, in fixed-size right-padded
    batches (one compilation). What evaluation by generation (BLEU) of a T5 run decodes."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max((len(s) for s in sources), default=1)
    texts: list[str] = []
    for start in range(0, len(sources), cfg.batch_size):
        chunk = sources[start : start + cfg.batch_size]
        ids = np.full((cfg.batch_size, width), pad, np.int32)
        mask = np.zeros((cfg.batch_size, width), np.int32)
        mask[:, 0] = 1  # filler rows need one real token
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        out = generate_seq2seq(
            model,
            None,
            ids,
            mask,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            adapter=method,
            trainable=trainable,
            frozen=frozen,
            num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        )
        texts += decoded_texts(out, len(chunk), tokenizer, eos)
    return texts


def decoded_texts(out: Generated, count: int, tokenizer: Any, eos: int | None) -> list[str]:
    """The first ``count`` rows' new tokens as text: each row's ``lengths`` tokens, EOS
    dropped, special tokens skipped."""
    tokens, lengths = jax.device_get(out.tokens), jax.device_get(out.lengths)
    rows = [[t for t in tokens[r, : lengths[r]].tolist() if t != eos] for r in range(count)]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
