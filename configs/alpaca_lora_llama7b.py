"""Alpaca-LoRA: LLaMA-7B instruction-tuned with LoRA on the cleaned Alpaca data.

Source: tloen/alpaca-lora (finetune.py defaults and README): LLaMA-7B, LoRA r=8, alpha 16,
dropout 0.05 on q_proj and v_proj, AdamW lr 3e-4 with 100 warm-up steps, batch 128
(micro-batch 4 with gradient accumulation), 3 epochs, cutoff 256 tokens, the Alpaca prompt
template with the prompt masked out of the loss (train_on_inputs=False), 2000 examples held
out for validation; data ``yahma/alpaca-cleaned``. It reports no single benchmark number: the
expected outcome is a model that follows instructions as text-davinci-003 roughly does, and
a validation loss near 0.8-0.9 (nats/token) at the end of training, as users of the
repository report.

    ftlab train configs/alpaca_lora_llama7b.py --workdir runs/alpaca_lora \
        --config.model.pretrained=/path/to/llama-7b-hf

``:runlocal`` uses a 2-layer LLaMA (width 32, random init), the 72-row sample in
configs/data and the tiny offline tokenizer: a smoke test of the pipeline, not a result.
"""

from pathlib import Path

from ftlab.recipes import runlocal_steps
from ftlab.schema import base_config

HERE = Path(__file__).parent
ARGS = ("runlocal",)  # what get_config(arg) accepts


def get_config(arg=None):
    c = base_config()
    c.model.name = "hf"
    c.model.pretrained = "huggyllama/llama-7b"
    c.model.remat = True

    c.data.source = "hf"
    c.data.name = "yahma/alpaca-cleaned"
    c.data.columns = "prompt=instruction,context=input,response=output"
    c.data.task = "causal_lm"
    c.data.template = "alpaca"
    c.data.max_length = 256
    c.data.train_on_inputs = False
    c.data.val_fraction = 2000 / 51760  # Alpaca-LoRA's val_set_size=2000
    c.data.test_fraction = 0.0
    c.data.stratify = False

    c.method.name = "lora"
    c.method.lora.rank = 8
    c.method.lora.alpha = 16.0
    c.method.lora.dropout = 0.05
    c.method.lora.targets = (r"self_attn/(q|v)_proj/kernel",)

    c.optim.name = "adamw"
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "linear"
    c.optim.accum_steps = 32  # 128 = 32 micro-batches of 4

    c.train.loss = "causal_lm"
    c.train.batch_size = 128
    c.train.num_epochs = 3
    c.train.eval_every = 200
    c.train.log_every = 10
    c.train.eval_batch_size = 8
    c.checkpoint.every_steps = 200
    c.early_stopping.metric = "val/loss"

    if arg == "runlocal":
        c.model.pretrained = ""
        c.model.remat = False
        c.model.hf_config = {
            "model_type": "llama",
            "vocab_size": 512,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
        }
        c.data.name = ""
        c.data.path = str(HERE / "data" / "alpaca_sample.json")
        c.data.tokenizer = str(HERE / "assets" / "tiny_bpe")
        c.data.max_length = 160
        c.data.val_fraction = 0.2
        c.data.test_fraction = 0.1
        c.optim.accum_steps = 2
        runlocal_steps(c, batch_size=8, lr=1e-3)
    return c
