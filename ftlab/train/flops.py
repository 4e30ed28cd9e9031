"""Model FLOPs of a fine-tuning step, the accelerators' peak FLOP/s, and model FLOPs
utilisation (MFU); shared by ``ftlab bench`` and the training loop's ``train/mfu``.

The count (``step_flops``) is the usual one for transformers, per matmul weight and token:

- forward ``2`` FLOPs per weight (every matmul runs forward);
- backward, activation gradients (``dX``): ``2`` more where a trained parameter lies *upstream*
  (earlier in the forward pass), so the gradient must flow through this matmul to reach it;
- backward, weight gradients (``dW``): ``2`` more where the weight itself is trained.

So a fully trained weight costs ``6N`` (``4N`` when nothing trained lies upstream of it: no
activation gradient), a frozen weight that gradients pass through ``4N``
(2N forward + 2N activation gradients: LoRA's frozen base, the LM head above trained blocks),
and a frozen weight below every trained parameter ``2N`` (forward only: the lower blocks of
top-k training). Attention's own matmuls (``QK^T`` and ``AV``, counted over the full square
``T x T`` as XLA computes them, with no causal halving) add ``4 * T * d_attn`` per token and
layer forward, three times that where gradients flow: the PaLM count ``6N + 12 L H Q T`` for
full fine-tuning. Embedding look-ups are gathers, not matmuls; a tied LM head is a matmul
with the embedding matrix. Norms, activations, softmax and the loss are not counted (a few %
of XLA's ``cost_analysis()`` figure, which counts them).

"Upstream" is decided by each leaf's position in the forward pass, read from its path: the
layer index (``h_3``, ``layers_12``), then the stage within a block (norm, attention input
projections, attention, output projection, norm, MLP in, MLP out); embeddings come first, the
final norm and the heads last.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Iterable, Mapping

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), by device_kind substring;
# the first match wins, so specific names come before the ones they contain.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is 756e12
    ("A100", 312e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v4", 275e12),
)

PEAK_ENV = "FTLAB_PEAK_FLOPS"  # per-device peak FLOP/s to use where the table has none


def peak_flops(device_kind: str | None = None) -> tuple[float, str] | None:
    """``(peak FLOP/s per device, where the figure comes from)`` for ``device_kind`` (default:
    the first jax device), or None where it is unknown (CPU, unlisted chips). The environment
    variable ``FTLAB_PEAK_FLOPS`` (e.g. ``989e12``) overrides the table."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]), f"${PEAK_ENV}"
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    for name, value in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return value, f"dense bf16 peak of {name}"
    return None


def measure_matmul_flops(
    size: int = 2048, dtype: str = "float32", repeats: int = 5, clock=time.perf_counter
) -> float:
    """FLOP/s of the default device on one ``size x size`` matmul (the best of ``repeats``): an
    achievable-peak estimate where no vendor figure applies (CPU). ``clock=time.process_time``
    gives FLOPs per CPU-second of this process instead (less sensitive to other jobs)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = clock()
        f(a, b).block_until_ready()
        times.append(clock() - t0)
    return 2 * size**3 / min(times)  # the best run: closest to what the hardware can do


# -- positions in the forward pass ----------------------------------------------------------

_LAYER = re.compile(r"(?:^|/)(?:h|layers|layer|blocks|block)_(\d+)(?:/|$)")
_EMBEDDINGS = re.compile(r"(?:^|/)(?:wte|wpe|embed_tokens|embeddings?)(?:/|$)")
_STACKED = re.compile(r"^(?:h|layers|layer|blocks|block)/")  # scan_layers: all layers in one leaf
# stage within a block (by module name); attention's own matmuls sit at ATTENTION
_STAGES = (
    (re.compile(r"(?:^|/)(?:ln_1|input_layernorm)/"), 0.0),
    (re.compile(r"(?:^|/)(?:q_proj|k_proj|v_proj|c_attn|query|key|value)/"), 1.0),
    (re.compile(r"(?:^|/)(?:attn|self_attn|attention)/(?:c_proj|o_proj|out_proj|output)/"), 3.0),
    (re.compile(r"(?:^|/)(?:ln_2|post_attention_layernorm)/"), 4.0),
    (re.compile(r"(?:^|/)(?:c_fc|gate_proj|up_proj|fc1|intermediate)/"), 5.0),
    (re.compile(r"(?:^|/)mlp/(?:c_proj|down_proj|fc2)/|(?:^|/)output/"), 6.0),
)
ATTENTION = 2.0


def position(path: str, num_layers: int) -> tuple[float, float]:
    """``(layer, stage)`` of a parameter path in the forward pass: embeddings ``(-1, 0)``,
    block leaves ``(i, stage)``, anything after the blocks (final norm, heads) ``(L, 0..)``."""
    if _EMBEDDINGS.search(path):
        return (-1.0, 0.0)
    m = _LAYER.search(path)
    layer = float(m.group(1)) if m else (0.0 if _STACKED.search(path) else None)
    if layer is None:  # final norm, LM head, classifier
        return (float(num_layers), 1.0 if re.search(r"(?:head|score|classifier)", path) else 0.0)
    for rx, stage in _STAGES:
        if rx.search(path):
            return (layer, stage)
    return (layer, 0.0)


# -- the count ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one train step, and how they were counted."""

    total: float  # FLOPs per step
    tokens: int  # tokens per step (batch x sequence)
    matmul_params: int  # N: weights used in matmuls (tied head counted once as a matmul)
    trained_matmul_params: int  # of N, weights that get gradients (6 FLOPs/token each)
    frozen_grad_params: int  # frozen weights that activation gradients pass (4 FLOPs/token)
    frozen_forward_params: int  # frozen weights below every trained leaf (2 FLOPs/token)
    attention_flops: float  # per step, forward + backward
    layers: int
    seq_len: int
    attn_width: int

    @property
    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)

    @property
    def formula(self) -> str:
        return (
            "FLOPs/step = tokens x (6*N_trained + 4*N_frozen_grad + 2*N_frozen_fwd) + attention "
            "(a trained weight with nothing trained upstream: 4, no activation gradient); "
            "attention = tokens x 4*T*d_attn per layer (QK^T, AV; full T x T, no causal halving), "
            "x3 in layers gradients flow through; "
            f"tokens={self.tokens:,}, N_trained={self.trained_matmul_params:,}, "
            f"N_frozen_grad={self.frozen_grad_params:,}, "
            f"N_frozen_fwd={self.frozen_forward_params:,}, T={self.seq_len}, "
            f"d_attn={self.attn_width}, layers={self.layers} "
            f"-> {self.total / 1e9:.2f} GFLOP/step"
        )

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "per_token": self.per_token,
            "formula": self.formula,
        }


def _is_matmul(path: str, shape: tuple[int, ...]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name == "kernel" and len(shape) >= 2


def step_flops(
    shapes: Mapping[str, tuple[int, ...]],
    trained: Iterable[str],
    *,
    batch: int,
    seq_len: int,
    lora: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    tied_head: str | None = None,
    trained_input: bool = False,
) -> StepFlops:
    """The model FLOPs of one train step of a decoder over ``batch`` sequences of ``seq_len``.

    ``shapes``: every base parameter ``{path: shape}`` (frozen and trained); ``trained``: the
    base paths that get gradients; ``lora``: ``{kernel path: (a shape, b shape)}`` for LoRA
    factors (always trained; they sit at their kernel's position); ``tied_head``: the
    embedding path used as the LM head matrix when the head is tied (a matmul after the blocks,
    trained when that embedding is). Attention width and the number of layers are read from
    the attention query projections (``q_proj`` / ``query`` kernels). ``trained_input``: a
    trained input (prompt tuning's soft prompt), so gradients flow through every layer.
    """
    trained = set(trained)
    lora = dict(lora or {})
    layer_ids = {int(m.group(1)) for p in shapes if (m := _LAYER.search(p))}
    queries = [p for p in shapes if re.search(r"(?:^|/)(?:q_proj|query)/kernel$", p)]
    stacked = [p for p in queries if _STACKED.search(p)]
    num_layers = len(layer_ids) or (shapes[stacked[0]][0] if stacked else 0)
    attn_width = shapes[queries[0]][-1] if queries else 0
    attn_layers = len(queries) if not stacked else int(shapes[stacked[0]][0])

    # (position, size, trained) of every matmul weight
    matmuls: list[tuple[tuple[float, float], int, bool]] = []
    for path, shape in shapes.items():
        if _is_matmul(path, shape):
            matmuls.append((position(path, num_layers), math.prod(shape), path in trained))
    for path, (a, b) in lora.items():
        pos = position(path, num_layers)
        matmuls.append((pos, math.prod(a) + math.prod(b), True))
    if tied_head is not None:
        matmuls.append(
            ((float(num_layers), 1.0), math.prod(shapes[tied_head]), tied_head in trained)
        )
    trained_positions = [position(p, num_layers) for p in trained] + [
        position(p, num_layers) for p in lora
    ]
    first = min(trained_positions, default=(math.inf, math.inf))
    if trained_input:
        first = (-math.inf, -math.inf)

    tokens = batch * seq_len
    n = n_trained = n_grad = n_fwd = 0
    per_token = 0.0
    for pos, size, is_trained in matmuls:
        n += size
        grads_flow = first < pos  # a trained leaf upstream: dX needed
        per_token += 2 * size + (2 * size if grads_flow else 0) + (2 * size if is_trained else 0)
        if is_trained:
            n_trained += size
        elif grads_flow:
            n_grad += size
        else:
            n_fwd += size
    # attention's own matmuls per layer: forward 4*T*d, backward twice that where grads flow
    attention = 0.0
    layers = range(attn_layers) if not stacked else [0] * attn_layers
    for i in layers:
        fwd = 4 * seq_len * attn_width
        attention += fwd * (3 if first < (float(i), ATTENTION) else 1)
    total = tokens * (per_token + attention)
    lora_params = sum(math.prod(a) + math.prod(b) for a, b in lora.values())
    return StepFlops(
        total=float(total),
        tokens=tokens,
        matmul_params=int(n - lora_params),
        trained_matmul_params=int(n_trained),
        frozen_grad_params=int(n_grad),
        frozen_forward_params=int(n_fwd),
        attention_flops=float(tokens * attention),
        layers=int(num_layers),
        seq_len=seq_len,
        attn_width=int(attn_width),
    )


def method_step_flops(
    method, trainable: Mapping, frozen: Mapping, *, batch: int, seq_len: int, tied: bool
) -> StepFlops:
    """``step_flops`` for a ``ftlab.methods.Method``'s split trees (arrays or shape structs);
    ``tied``: the LM head is the token embedding (GPT-2)."""
    from ftlab import tree

    trained_flat = tree.flatten(trainable.get("params", {}))
    shapes = {p: tuple(v.shape) for p, v in {**tree.flatten(frozen), **trained_flat}.items()}
    factors = method.lora_factors(trainable) if method.lora_targets else {}
    lora = {p: (tuple(f["a"].shape), tuple(f["b"].shape)) for p, f in factors.items()}
    head = None
    if tied:
        head = next((p for p in shapes if re.search(r"(?:wte|embed_tokens)/embedding$", p)), None)
    prompt = int(getattr(method, "prompt_tokens", 0))  # a soft prompt: v more positions, all
    return step_flops(  # layers backpropagate to it
        shapes,
        trained_flat,
        batch=batch,
        seq_len=seq_len + prompt,
        lora=lora,
        tied_head=head,
        trained_input=prompt > 0,
    )


def mfu(flops_per_step: float, seconds_per_step: float, peak_per_device: float, devices: int = 1):
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    return flops_per_step / seconds_per_step / (peak_per_device * devices)


def mfu_per_example_rate(model, method, state, tokens_per_example: int | None) -> float | None:
    """MFU per training example per second: the step's model FLOPs for one example
    (``method_step_flops``) over the peak of all devices. Constant for a run, so the loop
    computes it once; None where either is unknown (models other than the causal-LM
    decoders, a device without a peak figure: CPU, unless ``FTLAB_PEAK_FLOPS`` is set)."""
    if not tokens_per_example or getattr(model, "head", None) != "lm":
        return None
    peak = peak_flops()
    if peak is None:
        return None
    import jax

    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    per_example = method_step_flops(
        method, state.trainable, state.frozen, batch=1, seq_len=tokens_per_example, tied=tied
    ).total
    return per_example / (peak[0] * jax.device_count())


def run_mfu(model, method, state, tokens_per_example: int | None, examples_per_sec: float):
    """``train/mfu`` of a training run at ``examples_per_sec`` (see ``mfu_per_example_rate``)."""
    scale = mfu_per_example_rate(model, method, state, tokens_per_example)
    if scale is None or examples_per_sec <= 0:
        return None
    return scale * examples_per_sec
