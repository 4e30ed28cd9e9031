"""Building blocks shared by ftlab's model families (GPT-2, LLaMA, BERT, ViT, ResNet).

- activations by their Hugging Face names (``activation``);
- reading Hugging Face configs (``hf_get``, ``num_labels``, ``hf_config_dict``, ``hf_fields``);
- logically partitioned layers (``dense``, ``layer_norm``);
- attention: additive masks (``attention_bias`` causal, ``padding_bias``), the decoders'
  grouped-query ``attention`` and the encoders' ``SelfAttention`` module;
- decoder inputs and heads (``unpack_inputs``, ``decoder_inputs``, ``last_token_index``,
  ``classify``, ``decoder_head``);
- the decoders' key/value cache for autoregressive decoding (``kv_cache``, ``Decoder`` with
  ``decode=True``; see ``Decoder``);
- stacks of identical blocks run as one ``nn.scan`` (``layer_stack``, the models'
  ``scan_layers=True``) and the conversion of their parameters to and from the per-layer tree
  (``stack_layers``, ``unstack_layers``).

Functions that create layers (``dense``, ``layer_norm``, ``classify``, ``decoder_head``) are
called inside a compact ``__call__``: the layers belong to the calling module.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# -- activations ----------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation HF calls ``name`` (``gelu`` is the exact erf form, ``gelu_new`` the tanh)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


# -- reading Hugging Face configs ----------------------------------------------------------

# ftlab field -> Hugging Face config key, where the encoders name a field differently.
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "mlp_size": "intermediate_size",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
}


def hf_get(hf: Any, name: str, default: Any = None) -> Any:
    """A field of a ``transformers`` config object or of its ``config.json`` dict (None: default)."""
    if isinstance(hf, Mapping):
        value = hf.get(name, default)
    else:
        value = getattr(hf, name, default)
    return default if value is None else value


def num_labels(hf: Any, default: int) -> int:
    """``len(id2label)`` when the config has labels, else its ``num_labels``, else ``default``."""
    id2label = hf_get(hf, "id2label")
    if id2label:
        return len(id2label)
    return int(hf_get(hf, "num_labels", default))


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A transformers config (or its dict) as a plain dict that always holds ``num_labels``."""
    if isinstance(config, Mapping):
        c = dict(config)
    else:
        c = config.to_dict()
        c["num_labels"] = getattr(config, "num_labels", None)
    if c.get("num_labels") is None:
        c["num_labels"] = len(c.get("id2label") or {}) or 2
    return c


def hf_fields(
    cls: type, config: Any, required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, Any]:
    """Keyword arguments of ``cls`` read from a HF config (keys renamed by ``HF_NAMES``).

    A ``required`` field missing from the config is a ``KeyError``; a missing ``optional`` one
    takes the field's default in ``cls``.
    """
    c = hf_config_dict(config)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs = {name: c[HF_NAMES.get(name, name)] for name in required}
    kwargs.update({name: c.get(HF_NAMES.get(name, name), defaults[name]) for name in optional})
    return kwargs


# -- layers -------------------------------------------------------------------------------


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    dtype: Any,
    param_dtype: Any,
    name: str,
    std: float = 0.02,
    use_bias: bool = True,
) -> nn.Dense:
    """``nn.Dense`` with a normal(std) kernel and zero bias, both logically partitioned."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


def layer_norm(
    eps: float, axis: str = "embed", *, dtype: Any, param_dtype: Any, name: str
) -> nn.LayerNorm:
    """``nn.LayerNorm`` with unit scale and zero bias on the logical ``axis``."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis,)),
        name=name,
    )


# -- attention ------------------------------------------------------------------------------


def _key_mask(attention_mask: jax.Array) -> jax.Array:
    """(batch, k_len) 1/0 mask -> boolean (batch, 1, 1, k_len)."""
    return jnp.asarray(attention_mask).astype(bool)[:, None, None, :]


def _additive(allowed: jax.Array, dtype: Any) -> jax.Array:
    return jnp.where(allowed, 0.0, jnp.finfo(dtype).min).astype(dtype)


def padding_bias(attention_mask: jax.Array) -> jax.Array:
    """(batch, k_len) 1/0 mask -> additive (batch, 1, 1, k_len) bias (float32 min where 0)."""
    return _additive(_key_mask(attention_mask), jnp.float32)


def attention_bias(
    attention_mask: jax.Array | None, batch: int, length: int, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Additive (batch, 1, query, key) bias: causal, plus padding keys masked out (mask 0)."""
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & _key_mask(attention_mask)
    return _additive(jnp.broadcast_to(allowed, (batch, 1, length, length)), dtype)


ATTENTION = ("auto", "xla", "cudnn", "splash", "naive")


def _dropout_active(dropout: Callable[[jax.Array], jax.Array] | None) -> bool:
    """Whether ``dropout`` changes anything (an ``nn.Dropout`` that is deterministic or of rate
    0 does not; any other callable is assumed to)."""
    if dropout is None:
        return False
    if isinstance(dropout, nn.Dropout):
        return not dropout.deterministic and dropout.rate > 0
    return True


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    scale: float,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
    *,
    impl: str = "auto",
    causal: bool = False,
) -> jax.Array:
    """Multi-head / grouped-query attention, softmax in float32.

    ``q``: (batch, length, heads, dim); ``k``, ``v``: (batch, keys, kv_heads, dim) with
    ``heads`` a multiple of ``kv_heads`` (query head ``h`` reads kv head ``h // group``);
    ``bias``: additive, 0 where allowed and the dtype's minimum where masked, broadcastable to
    (batch, 1, length, keys) (``attention_bias``, ``padding_bias``), or None. ``keys`` is
    ``length`` except when decoding with a cache (the cache's length). Returns (batch, length,
    heads, dim).

    ``impl`` (``config.model.attention``):

    - ``auto`` / ``xla``: ``jax.nn.dot_product_attention`` with ``implementation=None`` (XLA's
      fused attention; grouped-query heads natively, the bias as its boolean ``mask``);
    - ``cudnn``: the same call with ``implementation="cudnn"`` (GPU only: bf16/fp16 inputs);
    - ``splash``: the Pallas splash-attention kernel of TPUs (``splash_attention``; needs the
      ``causal`` flag, reads padding from the bias; no cache);
    - ``naive``: the materialised softmax written out here (the reference).

    Attention dropout (training with a rate > 0) always takes the naive path: the fused calls
    have no dropout.
    """
    b, t, h, d = q.shape
    kvh = k.shape[2]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} key/value heads")
    if impl not in ATTENTION:
        raise ValueError(f"attention implementation {impl!r}: choose one of {', '.join(ATTENTION)}")
    if impl != "naive" and not _dropout_active(dropout):
        mask = None if bias is None else allowed_from_bias(bias)
        if impl == "splash":
            return splash_attention(q, k, v, scale, causal=causal, key_mask=_key_rows(mask, b))
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            scale=scale,
            implementation="cudnn" if impl == "cudnn" else None,
        )
    q = q.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * scale
    if bias is not None:
        scores = scores + bias[:, :, None].astype(jnp.float32)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if dropout is not None:
        weights = dropout(weights)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
    return out.reshape(b, t, h, d)


def allowed_from_bias(bias: jax.Array) -> jax.Array:
    """The boolean mask (True: attend) of an additive 0 / dtype-minimum bias."""
    return bias > jnp.finfo(bias.dtype).min / 2


def _key_rows(mask: jax.Array | None, batch: int) -> jax.Array | None:
    """(batch, keys) padding mask read off a causal or padding mask's last query row (every
    real key is visible from the last position)."""
    if mask is None:
        return None
    return jnp.broadcast_to(mask[:, 0, -1, :], (batch, mask.shape[-1]))


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    *,
    causal: bool,
    key_mask: jax.Array | None = None,
    interpret: bool | None = None,
    block: int = 128,
) -> jax.Array:
    """Attention through the Pallas splash-attention kernel (TPU; ``interpret`` runs it on any
    backend, default: when not on TPU).

    Shapes as ``attention`` (grouped-query heads through ``make_splash_mqa`` per kv head);
    ``key_mask`` (batch, keys) marks real tokens: padding becomes segment 0 and real tokens
    segment 1, so real queries attend to real keys only (padded query rows differ from the
    naive path's; the loss never reads them). Sequence lengths must be multiples of ``block``
    (128) and the kernel wants head dims that are multiples of 128.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if t % block or s % block:
        raise ValueError(f"splash attention needs lengths that are multiples of {block}: {t}, {s}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    group = h // kvh
    base = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv_compute=block,
        block_kv=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = sa.make_splash_mqa_single_device(
        sa.MultiHeadMask([base] * group), block_sizes=sizes, interpret=interpret
    )
    # (batch, kv_heads, group, length, dim): each kv head serves its group of query heads
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kvh, group, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    if key_mask is None:
        run = jax.vmap(jax.vmap(kernel))  # over batch, then kv heads
        out = run(qh, kh, vh)
    else:
        ids = key_mask.astype(jnp.int32)

        def one(qb, kb, vb, idb):
            seg = sa.SegmentIds(q=idb[:t] if t == s else jnp.ones((t,), jnp.int32), kv=idb)
            return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=seg))(qb, kb, vb)

        out = jax.vmap(one)(qh, kh, vh, ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def kv_cache(
    module: nn.Module, k: jax.Array, v: jax.Array, decode: bool
) -> tuple[jax.Array, jax.Array]:
    """Keys and values to attend to, through ``module``'s ``cache`` collection when ``decode``.

    The usual linen pattern: the first ``decode`` call (``init``, with inputs of the maximum
    length) creates ``cached_key`` / ``cached_value`` (batch, max_length, kv_heads, dim) and
    ``cache_index`` (0) and attends over its own inputs; later calls (with ``mutable=["cache"]``)
    write ``k``, ``v`` at ``cache_index``, advance it by their length and return the whole cache
    (unfilled slots are masked by the ``Decoder``'s bias). Writing past the end is not checked
    (``dynamic_update_slice`` clamps); the caller sizes the cache.
    """
    if not decode:
        return k, v
    initialized = module.has_variable("cache", "cached_key")
    cached_k = module.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = module.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    index = module.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
        return k, v
    i = index.value
    start = (0, i, 0, 0)
    cached_k.value = jax.lax.dynamic_update_slice(
        cached_k.value, k.astype(cached_k.value.dtype), start
    )
    cached_v.value = jax.lax.dynamic_update_slice(
        cached_v.value, v.astype(cached_v.value.dtype), start
    )
    index.value = i + k.shape[1]
    return cached_k.value, cached_v.value


class SelfAttention(nn.Module):
    """Multi-head attention with ``query``/``key``/``value``/``output`` dense projections.

    ``bias`` is additive, broadcastable to (batch, heads, q_len, k_len); softmax runs in float32;
    ``attention_impl`` picks the kernel (``attention``).
    """

    hidden_size: int
    num_heads: int
    attention_dropout: float = 0.0
    use_bias: bool = True
    stddev: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str = "auto"  # ATTENTION

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array | None = None, *, train: bool = False):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype, "std": self.stddev}

        def heads(name: str) -> jax.Array:
            y = dense(
                self.hidden_size, ("embed", "heads"), use_bias=self.use_bias, name=name, **kw
            )(x)
            return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        drop = nn.Dropout(self.attention_dropout, deterministic=not train)
        out = attention(
            q, k, v, bias, 1.0 / float(np.sqrt(head_dim)), drop, impl=self.attention_impl
        )
        out = out.reshape(*x.shape[:-1], self.hidden_size)
        return dense(self.hidden_size, ("heads", "embed"), name="output", **kw)(out)


# -- stacks of blocks: unrolled or one nn.scan ----------------------------------------------

SCAN_AXIS = "layers"  # logical axis name of the leading (layer) axis of scanned parameters
SCAN_NAMES = ("h", "layers", "layer")  # the scanned stack's name in ftlab's models


@functools.cache
def _positional(block: type[nn.Module], train_keyword: bool, carry: bool) -> type[nn.Module]:
    """``block`` called as ``(x, *broadcast, train)``: ``train`` positional (so ``nn.remat`` can
    mark it static), returning ``(x, None)`` when ``carry`` (the (carry, output) pair
    ``nn.scan`` wants). Same fields, same submodules, so the same parameter paths."""

    def __call__(self, x, *args):
        *args, train = args
        y = (
            block.__call__(self, x, *args, train=train)
            if train_keyword
            else block.__call__(self, x, *args, train)
        )
        return (y, None) if carry else y

    prefix = "Scanned" if carry else "Positional"
    return type(
        f"{prefix}{block.__name__}",
        (block,),
        {"__call__": __call__, "__module__": block.__module__},
    )


REMAT_POLICIES = ("none", "dots", "full")


def remat_policy(remat: bool | str) -> tuple[bool, Callable | None]:
    """``(recompute?, jax.checkpoint policy)`` of a model's ``remat`` field: ``False`` /
    ``"none"``: keep every activation; ``True`` / ``"full"``: recompute the whole block in the
    backward pass (save only its inputs); ``"dots"``: save the results of the matmuls without
    batch dimensions (``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``: the
    projections), recompute the cheap elementwise work and attention's batched products."""
    if remat in (False, None, "", "none"):
        return False, None
    if remat in (True, "full"):
        return True, None
    if remat == "dots":
        return True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat {remat!r}: choose one of {', '.join(REMAT_POLICIES)}")


def layer_stack(
    block: type[nn.Module],
    length: int,
    *,
    num_broadcast: int,
    scan: bool,
    remat: bool | str,
    train_keyword: bool = False,
) -> type[nn.Module]:
    """The module class a model instantiates for its stack of ``length`` identical blocks.

    ``block`` is called ``(x, *broadcast, train)`` (``train`` by keyword when
    ``train_keyword``), ``num_broadcast`` arguments shared by every layer (attention bias,
    rotary tables); the class returned always takes ``train`` positionally.

    ``scan=False``: ``block`` (under ``nn.remat`` when ``remat``; a subclass passing ``train``
    on by keyword when ``train_keyword``), to instantiate once per layer as ``<name>_<i>``.
    ``scan=True``: one ``nn.scan`` module, called the same way but returning ``(x, None)``,
    whose ``params`` leaves carry a leading ``length`` axis named ``SCAN_AXIS`` (one compiled
    block instead of ``length``; the per-layer trees convert with ``stack_layers`` /
    ``unstack_layers``). Dropout keys are split
    per layer, so dropout masks differ from the unrolled model's; with dropout off (eval) the
    two compute the same function. ``remat`` recomputes each block's activations in the
    backward pass (``remat_policy``: ``True``/``"full"``, ``"dots"``, ``False``/``"none"``;
    ``prevent_cse=False`` under scan, as ``jax.checkpoint`` advises)."""
    static = (num_broadcast + 2,)  # self, x, *broadcast, train
    recompute, policy = remat_policy(remat)
    if not scan:
        body = _positional(block, train_keyword, carry=False) if train_keyword else block
        return nn.remat(body, static_argnums=static, policy=policy) if recompute else body
    body = _positional(block, train_keyword, carry=True)
    if recompute:
        body = nn.remat(body, static_argnums=static, prevent_cse=False, policy=policy)
    return nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * (num_broadcast + 1),
        length=length,
        metadata_params={nn.PARTITION_NAME: SCAN_AXIS},
    )


def _layer_groups(params: Mapping[str, Any]) -> dict[str, dict[int, str]]:
    """``{"h": {0: "h_0", 1: "h_1"}}`` for the top-level keys named ``<name>_<index>``."""
    groups: dict[str, dict[int, str]] = {}
    for key in params:
        m = re.fullmatch(r"(.+)_(\d+)", key)
        if m:
            groups.setdefault(m.group(1), {})[int(m.group(2))] = key
    return groups


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _xp(leaves: Sequence[Any]):
    """numpy for numpy leaves (host memory stays host memory), else jax.numpy."""
    return np if all(isinstance(v, np.ndarray | np.generic) for v in leaves) else jnp


def stack_layers(params: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """Per-layer subtrees ``<name>_0 .. <name>_{L-1}`` -> one subtree ``<name>`` whose leaves are
    the layers' leaves stacked on a new leading axis: the tree a ``scan_layers=True`` model
    takes. Other entries are kept as they are. ``name`` (``h``, ``layers``, ``layer``) may be
    left out when the tree has a single ``<name>_<i>`` group. Plain (unboxed) arrays only."""
    groups = _layer_groups(params)
    if name is None:
        if len(groups) != 1:
            found = ", ".join(f"{g}_<i>" for g in sorted(groups)) or "none"
            raise ValueError(f"stack_layers: pass name=; per-layer groups found: {found}")
        name = next(iter(groups))
    layers = groups.get(name)
    if not layers:
        raise ValueError(f"stack_layers: params have no {name}_0, {name}_1, ... subtrees")
    if name in params:
        raise ValueError(f"stack_layers: params already hold a {name!r} entry")
    if sorted(layers) != list(range(len(layers))):
        raise ValueError(
            f"stack_layers: {name}_<i> indices {sorted(layers)} are not 0..{len(layers) - 1}"
        )
    flats = [_flat(params[layers[i]]) for i in range(len(layers))]
    for i, flat in enumerate(flats[1:], 1):
        if flat.keys() != flats[0].keys():
            diff = sorted(flat.keys() ^ flats[0].keys())
            raise ValueError(f"stack_layers: {name}_{i} and {name}_0 differ in {diff[:5]}")
        bad = [p for p in flat if np.shape(flat[p]) != np.shape(flats[0][p])]
        if bad:
            raise ValueError(
                f"stack_layers: {name}_{i}/{bad[0]} has shape {np.shape(flats[i][bad[0]])}, "
                f"{name}_0/{bad[0]} has {np.shape(flats[0][bad[0]])}"
            )
    stacked = {
        path: _xp([f[path] for f in flats]).stack([f[path] for f in flats]) for path in flats[0]
    }
    out = {k: v for k, v in params.items() if k not in layers.values()}
    out[name] = _nested(stacked)
    return out


def unstack_layers(params: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    """The inverse of ``stack_layers``: subtree ``<name>`` with a leading layer axis ->
    ``<name>_0 .. <name>_{L-1}`` (the readable paths that import/export and method regexes
    use). ``name`` may be left out when exactly one of ``SCAN_NAMES`` is in the tree."""
    if name is None:
        found = [k for k in SCAN_NAMES if isinstance(params.get(k), Mapping)]
        if len(found) != 1:
            raise ValueError(
                f"unstack_layers: pass name=; scanned subtrees found among {SCAN_NAMES}: "
                f"{found or 'none'}"
            )
        name = found[0]
    if name not in params:
        raise ValueError(f"unstack_layers: params have no scanned subtree {name!r}")
    if _layer_groups(params).get(name):
        raise ValueError(f"unstack_layers: params hold both {name!r} and {name}_<i> entries")
    flat = _flat(params[name]) if isinstance(params[name], Mapping) else {}
    if not flat:
        raise ValueError(f"unstack_layers: {name!r} is not a subtree of stacked leaves")
    sizes = {np.shape(v)[0] if np.ndim(v) else None for v in flat.values()}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"unstack_layers: leaves of {name!r} do not share one leading layer axis "
            f"(sizes {sorted(map(str, sizes))})"
        )
    (length,) = sizes
    out = {k: v for k, v in params.items() if k != name}
    for i in range(length):
        out[f"{name}_{i}"] = _nested({p: v[i] for p, v in flat.items()})
    return out


def _without_scan(module: nn.Module, decode: bool) -> None:
    if decode and getattr(module, "scan_layers", False):
        raise ValueError(
            f"{type(module).__name__}: decode=True (key/value cache) needs the unrolled layers; "
            "build the model with scan_layers=False and convert the parameters with "
            "ftlab.models.layers.unstack_layers"
        )


# -- decoder inputs and heads ---------------------------------------------------------------

HEADS = ("lm", "classifier", "none")


def unpack_inputs(
    inputs: Any, attention_mask: jax.Array | None, position_ids: jax.Array | None
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """``input_ids`` or a batch dict ``{"input_ids", "attention_mask"?, "position_ids"?}``."""
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise KeyError(f"decoder inputs need 'input_ids'; got keys {sorted(inputs)}")
        attention_mask = inputs.get("attention_mask", attention_mask)
        position_ids = inputs.get("position_ids", position_ids)
        inputs = inputs["input_ids"]
    input_ids = jnp.asarray(inputs)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    return input_ids, attention_mask, position_ids


def decoder_inputs(
    model: str,
    head: str,
    inputs: Any,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Check ``head``, unpack the inputs, and default ``position_ids`` to ``0..length-1``."""
    if head not in HEADS:
        raise ValueError(f"{model} head {head!r}: choose one of {', '.join(HEADS)}")
    input_ids, attention_mask, position_ids = unpack_inputs(inputs, attention_mask, position_ids)
    if position_ids is None:
        b, t = input_ids.shape
        position_ids = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    return input_ids, attention_mask, position_ids


def last_token_index(
    input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None
) -> jax.Array:
    """Per row, the position the sequence-classification head reads.

    As Hugging Face: the rightmost token that is not ``pad_token_id`` when the config has one;
    otherwise the rightmost position the attention mask keeps; otherwise the last position.
    """
    b, t = input_ids.shape
    positions = jnp.arange(t)[None, :]
    if pad_token_id is not None:
        keep = input_ids != pad_token_id
    elif attention_mask is not None:
        keep = jnp.asarray(attention_mask).astype(bool)
    else:
        return jnp.full((b,), t - 1, jnp.int32)
    return jnp.argmax(jnp.where(keep, positions, -1), axis=-1).astype(jnp.int32)


def classify(
    x: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    pad_token_id: int | None,
    num_labels: int,
    std: float,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
) -> jax.Array:
    """The ``score`` head (no bias, as Hugging Face) on each row's last non-pad token."""
    index = last_token_index(input_ids, attention_mask, pad_token_id)
    pooled = jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]
    score = _head(num_labels, "classes", "score", std, dtype, param_dtype)
    return score(pooled).astype(jnp.float32)


def _head(features: int, axis: str, name: str, std: float, dtype, param_dtype) -> nn.Dense:
    """A bias-free output projection from ``embed`` to the logical ``axis``."""
    return dense(
        features,
        ("embed", axis),
        std=std,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def decoder_head(
    x: jax.Array,
    head: str,
    embed: nn.Embed,
    *,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    config: Any,
    vocab_size: int,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
) -> jax.Array:
    """Final hidden states ``x`` through a decoder's head: ``"none"`` returns them,
    ``"classifier"`` is ``classify``, ``"lm"`` is ``embed.attend`` when ``config`` ties the word
    embeddings, else a bias-free ``lm_head``. ``config`` gives ``pad_token_id``,
    ``num_labels``, ``initializer_range`` and ``tie_word_embeddings``; logits are float32."""
    if head == "none":
        return x
    std = config.initializer_range
    if head == "classifier":
        return classify(
            x,
            input_ids,
            attention_mask,
            config.pad_token_id,
            config.num_labels,
            std,
            dtype,
            param_dtype,
        )
    if config.tie_word_embeddings:
        return embed.attend(x).astype(jnp.float32)  # x @ embedding.T
    lm_head = _head(vocab_size, "vocab", "lm_head", std, dtype, param_dtype)
    return lm_head(x).astype(jnp.float32)


class Decoder(nn.Module):
    """What the decoder families share: fields, input handling, the decoding cache and the head.

    A subclass defines ``backbone(input_ids, position_ids, bias, train, decode)`` returning the
    final hidden states and the token ``nn.Embed`` (tied LM heads attend with it); ``bias`` is
    the additive attention bias (batch, 1, length, keys) and ``decode`` is passed to each
    attention layer's ``kv_cache``. ``__call__`` takes token ids (batch, length) or a batch
    dict holding ``input_ids`` and optionally ``attention_mask`` (1 = token, 0 = padding) and
    ``position_ids`` (default ``0..length-1`` per row), and applies ``decoder_head``. Logits are
    float32; ``dtype`` is the compute dtype, parameters are kept in ``param_dtype``; ``remat``
    recomputes each block in the backward pass (``remat_policy``: ``True``/``"full"``,
    ``"dots"``); ``attention_impl`` picks the attention kernel (``attention``).
    ``return_hidden=True`` (LM head only) returns ``(hidden, kernel)``: the final hidden states
    and the LM head's (embed, vocab) matrix in the compute dtype, so a loss can form the logits
    a chunk at a time (``hidden @ kernel`` are the logits). ``scan_layers`` runs the blocks as one
    ``nn.scan`` (``layer_stack``): one compiled block, parameters stacked on a leading
    ``layers`` axis under a single name (``stack_layers`` / ``unstack_layers`` convert);
    decoding with the cache then is an error (use the unrolled model).

    Decoding with a key/value cache (``decode=True``), the usual linen pattern:

    - ``model.init(rng, jnp.zeros((batch, max_length), int), decode=True)["cache"]`` (or
      ``ftlab.eval.generate.init_cache``) creates the ``cache`` collection: per attention layer
      ``cached_key``, ``cached_value``, ``cache_index``, and here ``cache_index``, ``key_mask``
      (batch, max_length: which cache slots hold real tokens) and ``positions`` (batch,: real
      tokens seen per row). All zeros: an empty cache.
    - ``model.apply({"params": p, "cache": c}, ids, attention_mask=m, decode=True,
      mutable=["cache"])`` appends a chunk (the prompt, then one token a step) and returns
      ``(logits, {"cache": c'})``. Queries attend causally to the filled part of the cache
      whose ``attention_mask`` was 1. Default positions continue each row's count of real
      tokens (``cumsum(mask) - 1`` over the prompt, as Hugging Face for left padding), so a
      left-padded row gets the positions it would have unpadded; explicit ``position_ids``
      win. All rows share one cache index: pad prompts on the left.

    With ``decode=False`` (the default) nothing of this runs.

    Soft prompt (prompt tuning, ``ftlab.methods.prompt``): ``prompt_embeds`` (v, embed) or
    (batch, v, embed) is prepended to the token embeddings, as PEFT's
    ``PeftModelForCausalLM.forward`` does through ``inputs_embeds``: the attention mask gets v
    leading ones, the virtual tokens take positions ``0..v-1`` and the real tokens ``v +``
    their positions (transformers' default positions over the ``v + length`` inputs; explicit
    ``position_ids`` are shifted by v, where PEFT drops them), GPT-2 adds its position table
    and LLaMA rotates at those positions, and the v prompt positions are sliced off the
    outputs (logits, ``return_hidden`` states), which stay aligned with ``input_ids``. LM head
    only. With ``decode=True`` pass it with the first chunk only (the prefill): the cache
    then holds v more slots (``init`` with ``max_length + v``) and later tokens continue the
    positions after them.
    """

    config: Any
    head: str = "lm"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool | str = False
    scan_layers: bool = False
    attention_impl: str = "auto"

    def backbone(
        self,
        input_ids: jax.Array,
        position_ids: jax.Array,
        bias: jax.Array,
        train: bool,
        decode: bool,
        prompt: jax.Array | None = None,
    ) -> tuple[jax.Array, nn.Embed]:
        """``prompt`` (batch, v, embed), when given, goes before the token embeddings;
        ``position_ids`` and ``bias`` then cover the ``v + length`` inputs."""
        raise NotImplementedError

    def _decode_bias(
        self, shape: tuple[int, int], attention_mask: jax.Array | None, position_ids: Any
    ) -> tuple[jax.Array, jax.Array]:
        """Positions and the additive bias of a decoding chunk of ``shape`` (batch, length);
        advances the cache counters."""
        b, t = shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else _bool(attention_mask)
        initialized = self.has_variable("cache", "key_mask")
        key_mask = self.variable("cache", "key_mask", jnp.zeros, (b, t), bool)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        seen = self.variable("cache", "positions", jnp.zeros, (b,), jnp.int32)
        if position_ids is None:
            counts = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
            position_ids = jnp.maximum(seen.value[:, None] + counts, 0)
        if not initialized:  # the init call: plain causal attention over its inputs
            return position_ids, attention_bias(attention_mask, b, t, self.dtype)
        i = index.value
        keys = jax.lax.dynamic_update_slice(key_mask.value, mask, (0, i))
        key_mask.value = keys
        index.value = i + t
        seen.value = seen.value + mask.sum(axis=1, dtype=jnp.int32)
        slot = jnp.arange(keys.shape[1])[None, :]
        causal = slot <= i + jnp.arange(t)[:, None]  # (t, keys)
        allowed = keys[:, None, None, :] & causal[None, None]
        return position_ids, _additive(allowed, self.dtype)

    def _prompt_inputs(
        self,
        prompt_embeds: jax.Array,
        b: int,
        attention_mask: jax.Array | None,
        position_ids: jax.Array,
        counted: bool,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """(prompt (b, v, embed), the mask with v leading ones, positions ``0..v-1`` then
        ``v + position_ids``; None when the decoding cache counts them: ``counted``)."""
        if self.head != "lm":
            raise ValueError(f"prompt_embeds (prompt tuning) needs the LM head, not {self.head!r}")
        prompt = jnp.asarray(prompt_embeds)
        if prompt.ndim == 2:
            prompt = prompt[None]
        if prompt.ndim != 3 or prompt.shape[0] not in (1, b):
            raise ValueError(
                f"prompt_embeds must be (v, embed) or ({b}, v, embed), got {prompt_embeds.shape}"
            )
        v = prompt.shape[1]
        prompt = jnp.broadcast_to(prompt, (b, *prompt.shape[1:]))
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask)
            mask = jnp.concatenate([jnp.ones((b, v), mask.dtype), mask], axis=1)
        positions = None
        if not counted:
            ahead = jnp.broadcast_to(jnp.arange(v, dtype=position_ids.dtype)[None], (b, v))
            positions = jnp.concatenate([ahead, position_ids + v], axis=1)
        return prompt, mask, positions

    @nn.compact
    def __call__(
        self,
        inputs: Any,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        train: bool = False,
        decode: bool = False,
        return_hidden: bool = False,
        prompt_embeds: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        explicit = position_ids is not None or (
            isinstance(inputs, Mapping) and inputs.get("position_ids") is not None
        )
        input_ids, attention_mask, position_ids = decoder_inputs(
            type(self).__name__, self.head, inputs, attention_mask, position_ids
        )
        b, t = input_ids.shape
        _without_scan(self, decode)
        prompt, full_mask, v = None, attention_mask, 0
        if prompt_embeds is not None:
            prompt, full_mask, position_ids = self._prompt_inputs(
                prompt_embeds, b, attention_mask, position_ids, decode and not explicit
            )
            v = prompt.shape[1]
        if decode:
            position_ids, bias = self._decode_bias(
                (b, v + t), full_mask, position_ids if explicit else None
            )
        else:
            bias = attention_bias(full_mask, b, v + t, self.dtype)
        x, embed = self.backbone(input_ids, position_ids, bias, train, decode, prompt)
        x = x[:, v:] if v else x
        if return_hidden:
            if self.head != "lm":
                raise ValueError(f"return_hidden=True needs the LM head, not {self.head!r}")
            if self.config.tie_word_embeddings:
                kernel = embed.embedding.T
            else:
                kernel = self.variables["params"]["lm_head"]["kernel"]
            return x, jnp.asarray(kernel, self.dtype)
        return decoder_head(
            x,
            self.head,
            embed,
            input_ids=input_ids,
            attention_mask=attention_mask,
            config=self.config,
            vocab_size=self.config.vocab_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(bool)
