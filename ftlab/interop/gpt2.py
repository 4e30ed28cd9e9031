"""GPT-2 (``model_type`` ``gpt2``): ``ftlab.models.gpt2.GPT2`` and its one name table.

HF's ``Conv1D`` weights are stored (in, out) like Flax kernels (no transpose); the fused
``c_attn`` is split into ftlab's ``q_proj``/``k_proj``/``v_proj`` (and fused again on export).
"""

from __future__ import annotations

from ftlab.interop import _decoder
from ftlab.interop.family import Family, register_family
from ftlab.interop.table import LINEAR, Entry, Table, layer_norm, rows, split
from ftlab.models.gpt2 import GPT2, GPT2Config

QKV = tuple(f"h_{{i}}/attn/{n}_proj" for n in "qkv")

TABLE = Table(
    rows(
        Entry("wte.weight", "wte/embedding"),
        Entry("wpe.weight", "wpe/embedding"),
        layer_norm("h.{i}.{ln:ln_1|ln_2}", "h_{i}/{ln}"),
        Entry("h.{i}.attn.c_attn.weight", tuple(f"{m}/kernel" for m in QKV), split(-1)),
        Entry("h.{i}.attn.c_attn.bias", tuple(f"{m}/bias" for m in QKV), split(-1)),
        Entry("h.{i}.attn.c_proj.weight", "h_{i}/attn/c_proj/kernel"),  # Conv1D: (in, out)
        Entry("h.{i}.attn.c_proj.bias", "h_{i}/attn/c_proj/bias"),
        Entry("h.{i}.mlp.{m:c_fc|c_proj}.weight", "h_{i}/mlp/{m}/kernel"),
        Entry("h.{i}.mlp.{m:c_fc|c_proj}.bias", "h_{i}/mlp/{m}/bias"),
        layer_norm("ln_f", "ln_f"),
        Entry("lm_head.weight", "lm_head/kernel", LINEAR, head=True),
        Entry("score.weight", "score/kernel", LINEAR, head=True),
    )
)

FAMILY = register_family(
    Family(
        model_type="gpt2",
        build=_decoder.builder(GPT2Config.from_hf_config, GPT2),
        table=lambda config: TABLE,
        example_inputs=_decoder.example_inputs,
        prefix="transformer.",
        heads=_decoder.HEADS,
        tied_heads=("lm",),
        architectures={
            "lm": "GPT2LMHeadModel",
            "classifier": "GPT2ForSequenceClassification",
            "none": "GPT2Model",
        },
        head_of_arch={
            "GPT2LMHeadModel": "lm",
            "GPT2DoubleHeadsModel": "lm",
            "GPT2ForSequenceClassification": "classifier",
            "GPT2Model": "none",
        },
        ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),  # old causal-mask buffers
        droppable=(r"lm_head/.*", r"score/.*"),
        fresh=(r"score/.*",),
        peft_task=_decoder.PEFT_TASK,
        check_export=_decoder.tied_check(True),
        model_class=GPT2,
    )
)
