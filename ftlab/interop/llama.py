"""LLaMA (``model_type`` ``llama``): ``ftlab.models.llama.Llama`` and its one name table."""

from __future__ import annotations

from ftlab.interop import _decoder
from ftlab.interop.family import Family, register_family
from ftlab.interop.table import LINEAR, Entry, Table, linear, rows
from ftlab.models.llama import Llama, LlamaConfig

TABLE = Table(
    rows(
        Entry("embed_tokens.weight", "embed_tokens/embedding"),
        linear("layers.{i}.self_attn.{p:q_proj|k_proj|v_proj|o_proj}", "layers_{i}/self_attn/{p}"),
        linear("layers.{i}.mlp.{p:gate_proj|up_proj|down_proj}", "layers_{i}/mlp/{p}"),
        Entry(
            "layers.{i}.{n:input_layernorm|post_attention_layernorm}.weight",
            "layers_{i}/{n}/scale",
        ),
        Entry("norm.weight", "norm/scale"),
        Entry("lm_head.weight", "lm_head/kernel", LINEAR, head=True),
        Entry("score.weight", "score/kernel", LINEAR, head=True),
    )
)

FAMILY = register_family(
    Family(
        model_type="llama",
        build=_decoder.builder(LlamaConfig.from_hf_config, Llama),
        table=lambda config: TABLE,
        example_inputs=_decoder.example_inputs,
        prefix="model.",
        heads=_decoder.HEADS,
        tied_heads=("lm",),
        architectures={
            "lm": "LlamaForCausalLM",
            "classifier": "LlamaForSequenceClassification",
            "none": "LlamaModel",
        },
        head_of_arch={
            "LlamaForCausalLM": "lm",
            "LlamaForSequenceClassification": "classifier",
            "LlamaModel": "none",
        },
        ignore=(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
        droppable=(r"lm_head/.*", r"score/.*"),
        fresh=(r"score/.*",),
        peft_task=_decoder.PEFT_TASK,
        check_export=_decoder.tied_check(False),
        model_class=Llama,
    )
)
