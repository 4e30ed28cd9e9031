"""A fast counter-based PRNG for dropout masks on CPU.

Dropout needs many random bits per step (GPT-2 at 4 x 256 with 6 layers: ~17M) and cares
little about their cryptographic quality. jax's default threefry2x32 costs ~20 rounds of
integer arithmetic per pair of words; on CPU, where nothing fuses it away, it was ~12% of a
GPT-2 fine-tuning step. ``hash32`` keys give each element two rounds of a 32-bit integer
hash (Wellons' ``lowbias32`` constants) of its index, keyed by the key's two words: about
5x less work, statistically independent enough for Bernoulli masks (every bit of the output
depends on every bit of index and key).

The key type is registered with jax (``jax.extend.random.define_prng_impl``), so Flax's
``make_rng``, ``jax.random.fold_in`` and ``jax.random.bernoulli`` work on it unchanged:
``train_step`` converts its per-step threefry key with ``dropout_key`` and nothing else
changes. The masks differ from threefry's (a different, equally random stream); runs stay
a pure function of the seed and step, so resumed runs still match uninterrupted ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jex_random


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (bijective on uint32)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0xD35A2D97)
    return x ^ (x >> 15)


def _seed(seed: jax.Array) -> jax.Array:
    s = jnp.asarray(seed).astype(jnp.uint32)
    return jnp.stack([_mix(s), _mix(s ^ jnp.uint32(0x9E3779B9))])


def _bits32(key: jax.Array, n: int) -> jax.Array:
    k0, k1 = key[0], key[1]
    i = jax.lax.iota(jnp.uint32, n)
    return _mix(_mix(i ^ k0) + k1)


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    n = int(np.prod(shape))
    if bit_width == 64:
        bits = _bits32(key, 2 * n).reshape(2, n).astype(jnp.uint64)
        return ((bits[0] << jnp.uint64(32)) | bits[1]).reshape(shape)
    bits = _bits32(key, n).reshape(shape)
    if bit_width == 32:
        return bits
    dtype = {8: jnp.uint8, 16: jnp.uint16}[bit_width]
    return (bits >> jnp.uint32(32 - bit_width)).astype(dtype)


def _fold_in(key: jax.Array, data) -> jax.Array:
    d = _mix(jnp.asarray(data).astype(jnp.uint32) + jnp.uint32(0x7F4A7C15))
    return jnp.stack([_mix(key[0] ^ d), _mix(key[1] + _mix(d ^ jnp.uint32(0x85EBCA6B)))])


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    n = int(np.prod(shape))
    i = jax.lax.iota(jnp.uint32, n)
    k0 = _mix(key[0] ^ _mix(2 * i + jnp.uint32(1)))
    k1 = _mix(key[1] + _mix(2 * i + jnp.uint32(2)))
    return jnp.stack([k0, k1], axis=-1).reshape(*shape, 2)


HASH32 = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="ftlab_hash32",
    tag="fh32",
)

DROPOUT_RNGS = ("auto", "threefry", "hash32")


def dropout_key(key: jax.Array, kind: str = "auto") -> jax.Array:
    """The key dropout (and LoRA dropout) draws from, derived from a step's threefry key:
    ``hash32`` (see the module docstring) on CPU under ``auto``, the key itself elsewhere."""
    if kind not in DROPOUT_RNGS:
        raise ValueError(f"dropout rng {kind!r}: choose one of {', '.join(DROPOUT_RNGS)}")
    if kind == "auto":
        kind = "hash32" if jax.default_backend() == "cpu" else "threefry"
    if kind == "threefry":
        return key
    data = jax.random.key_data(key).reshape(-1)[:2].astype(jnp.uint32)
    return jax.random.wrap_key_data(data, impl=HASH32)
