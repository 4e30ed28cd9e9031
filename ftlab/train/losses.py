"""Losses, each ``(outputs, batch) -> mean loss`` over the weighted examples of a batch.

``batch["weights"]`` (1 for real examples, 0 for padding) keeps padded evaluation
batches exact; losses are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, dict], tuple[jax.Array, jax.Array]]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with (optional) label smoothing."""
    logits = logits.astype(jnp.float32)
    if labels.ndim == logits.ndim:  # soft labels (mixup): already a distribution per example
        targets = labels.astype(jnp.float32)
    else:
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def masked_lm_loss(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean token cross-entropy over positions where ``mask`` is set (prompt/padding excluded)."""
    per_token = cross_entropy(logits, targets, label_smoothing)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def causal_lm_loss(logits: jax.Array, batch: dict, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example mean next-token cross-entropy over the trained positions.

    ``batch["labels"]`` holds the target of each position (the next token, already shifted),
    or a negative value (``IGNORE_INDEX``) where nothing is trained: prompt, padding. Batches
    weight each example by its target-token count (``weights``), so the batch loss is the mean
    over tokens, as Hugging Face's Trainer computes it.
    """
    labels = batch["labels"]
    mask = (labels >= 0).astype(jnp.float32)
    per_token = cross_entropy(logits, jnp.maximum(labels, 0), label_smoothing)
    return jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def seq2seq_lm_loss(logits: jax.Array, batch: dict, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example mean token cross-entropy of an encoder-decoder (T5) on its decoder targets.

    ``logits``: (batch, target length, vocab) for ``decoder_input_ids`` = the labels shifted
    right (``ftlab.models.t5.shift_right``: start token first), so position ``i`` predicts
    ``batch["labels"][:, i]`` with no further shift; negative labels (padding) are not trained.
    The same reduction as ``causal_lm_loss``, whose labels are shifted the same way.
    """
    return causal_lm_loss(logits, batch, label_smoothing)


def chunked_causal_lm_loss(
    hidden: jax.Array,
    kernel: jax.Array,
    batch: dict,
    chunk: int,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """``causal_lm_loss(hidden @ kernel, batch)`` computed ``chunk`` positions at a time.

    ``hidden``: (batch, length, embed) final hidden states, ``kernel``: (embed, vocab) LM head
    (``Decoder(return_hidden=True)``). A scan over chunks of the sequence forms each chunk's
    float32 logits, its token losses summed per example, under ``jax.checkpoint`` (the backward
    pass recomputes the chunk's logits), so batch x length x vocabulary logits never exist at
    once: at most batch x chunk x vocabulary. Same value and gradients as the plain path.
    """
    labels = batch["labels"]
    b, t, e = hidden.shape
    n = -(-t // chunk)
    if n * chunk != t:  # pad to whole chunks; padded positions have no target
        hidden = jnp.pad(hidden, ((0, 0), (0, n * chunk - t), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, n * chunk - t)), constant_values=-1)
    hs = hidden.reshape(b, n, chunk, e).swapaxes(0, 1)
    ls = labels.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def part(h, lab, w):
        logits = jnp.dot(h, w).astype(jnp.float32)
        per_token = cross_entropy(logits, jnp.maximum(lab, 0), label_smoothing)
        return jnp.sum(per_token * (lab >= 0), -1)

    def body(total, xs):
        return total + part(*xs, kernel), None

    sums, _ = jax.lax.scan(body, jnp.zeros((b,), jnp.float32), (hs, ls))
    count = jnp.sum((labels >= 0).astype(jnp.float32), -1)
    return sums / jnp.maximum(count, 1.0)


def chunked_causal_lm(chunk: int, label_smoothing: float = 0.0):
    """``(outputs, batch) -> per-example losses`` for a model called with
    ``return_hidden=True`` (outputs: ``(hidden, kernel)``)."""
    return lambda outputs, batch: chunked_causal_lm_loss(
        outputs[0], outputs[1], batch, chunk, label_smoothing
    )


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example squared error, summed over output dimensions."""
    outputs = outputs.astype(jnp.float32).reshape(outputs.shape[0], -1)
    return jnp.sum((outputs - targets.reshape(outputs.shape)) ** 2, axis=-1)


def per_example_loss(
    name: str, label_smoothing: float = 0.0
) -> Callable[[jax.Array, dict], jax.Array]:
    """The configured loss as ``(outputs, batch) -> per-example losses``."""
    if name == "cross_entropy":
        return lambda logits, batch: cross_entropy(logits, batch["labels"], label_smoothing)
    if name == "causal_lm":
        return lambda logits, batch: causal_lm_loss(logits, batch, label_smoothing)
    if name == "seq2seq":
        return lambda logits, batch: seq2seq_lm_loss(logits, batch, label_smoothing)
    if name == "mse":
        return lambda outputs, batch: squared_error(outputs, batch["labels"])
    raise ValueError(f"unknown loss {name!r}")


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(values)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
