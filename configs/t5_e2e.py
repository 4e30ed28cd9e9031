"""T5-base on E2E NLG as sequence to sequence: full fine-tuning or LoRA on q and v.

The same task, data columns and table as configs/gpt2_e2e.py, with an encoder-decoder: the
meaning representation is the source, the human reference the target (``data.task =
"seq2seq"``, no prompt template), and the test split is decoded by beam search (10 beams,
length penalty 0.9, no_repeat_ngram_size 4, as the GPT-2 recipe) and scored by sacrebleu's
corpus BLEU, chrF and ROUGE-L against every reference of a meaning representation, so
``ftlab compare`` puts T5 and GPT-2 runs in one table. Settings: AdamW, weight decay 0.01,
batch 8, 5 epochs, 500 warm-up steps then linear decay, label smoothing 0.1 (the GPT-2
recipe's); learning rate 1e-4 for full fine-tuning (the common choice for T5 with AdamW, ours)
and 2e-4 for LoRA r=4, alpha 32, dropout 0.1 on every attention's W_q and W_v (self and cross:
what peft's ``target_modules=["q", "v"]`` adapts in T5).

Source: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (JMLR 2020) for the model (t5-base, 222.9M parameters); Novikova et al. (2017)
for E2E. No published BLEU for T5 on the original E2E test set could be found, so none is
cited: the LoRA paper's E2E table (Hu et al. 2021, Table 3: GPT-2 M LoRA 70.4) has decoders
only; Kale & Rastogi (2020, "Text-to-Text Pre-Training for Data-to-Text Tasks") report T5 on
WebNLG (T5-Base BLEU 64.7), ToTTo and MultiWOZ but not E2E
(https://paperswithcode2.com/paper/145240); GEM (Gehrmann et al. 2021,
https://arxiv.org/abs/2102.01672) fine-tunes T5 on the *cleaned* E2E, whose references and
splits differ, and its listed T5 result there is METEOR 0.369 on the validation set
(https://cs.paperswithcode.com/paper/the-gem-benchmark-natural-language-generation), not
comparable with a BLEU on the original test set. The number to compare with is gpt2_e2e's, run
on the same data.

No task prefix (``data.source_prefix = ""``): T5's pre-training mixture has no data-to-text
task whose prefix E2E could reuse, and a single-task fine-tune need not name its task; set one
with --config.data.source_prefix="..." (training, evaluation by generation and ``ftlab
predict`` all prepend it). Targets share the source's 128-token bound (``data.target_length =
0``); E2E's references are far shorter.

    ftlab train configs/t5_e2e.py:full --workdir runs/t5_e2e-full     # or :lora

needs ``t5-base`` (a local directory via --config.model.pretrained=DIR, or the hub when
online; ``google/flan-t5-base`` works the same) and E2E from the hub (``tuetschek/e2e_nlg``)
or local files (--config.data.path). ``:runlocal`` (with ``full`` or ``lora``) shrinks the
model to a randomly initialised T5 v1.1 as small as tests/fixtures/tiny_t5_v11 (gated-GELU,
untied head; 2 + 2 blocks, width 32), sized to the tiny offline tokenizer gpt2_e2e's runlocal
uses (512 tokens; the fixtures' 100-token vocabulary has no tokenizer), and trains six steps
on the 96-row sample in configs/data: a smoke test of the whole pipeline, not a result.
"""

from pathlib import Path

from ftlab.recipes import runlocal_steps
from ftlab.schema import base_config

HERE = Path(__file__).parent
ARGS = ("full", "lora", "runlocal")  # get_config(arg): comma-separated


def get_config(arg=None):
    args = set((arg or "full").split(","))
    method = "lora" if "lora" in args else "full"
    c = base_config()
    c.model.name = "hf"
    c.model.pretrained = "t5-base"

    c.data.source = "hf"
    c.data.name = "tuetschek/e2e_nlg"
    c.data.columns = "prompt=meaning_representation,response=human_reference"
    c.data.splits = "val=validation"
    c.data.task = "seq2seq"
    c.data.max_length = 128  # source and target tokens each (E2E's are far shorter)
    c.data.source_prefix = ""  # no T5 task prefix (see the docstring)
    c.data.target_length = 0  # = max_length
    c.data.clean.duplicates = False  # several references per meaning representation
    c.data.clean.leakage = ""  # the official splits are disjoint

    c.method.name = method
    c.method.lora.rank = 4
    c.method.lora.alpha = 32.0
    c.method.lora.dropout = 0.1
    c.method.lora.targets = (r"_attn/(q|v)/kernel",)  # self_attn and cross_attn

    c.optim.name = "adamw"
    c.optim.lr = 2e-4 if method == "lora" else 1e-4
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 500
    c.optim.schedule = "linear"

    c.train.loss = "seq2seq"
    c.train.label_smoothing = 0.1
    c.train.batch_size = 8
    c.train.num_epochs = 5
    c.train.eval_every = 1000
    c.train.log_every = 50
    c.train.eval_batch_size = 16
    c.checkpoint.every_steps = 1000
    c.early_stopping.metric = "val/loss"

    c.eval.generate_examples = 10_000  # every test meaning representation
    c.eval.max_new_tokens = 64
    c.eval.num_beams = 10
    c.eval.length_penalty = 0.9
    c.eval.no_repeat_ngram_size = 4

    if "runlocal" in args:
        c.model.pretrained = ""
        c.model.hf_config = {  # tests/fixtures/tiny_t5_v11's shape, the tokenizer's vocabulary
            "model_type": "t5",
            "vocab_size": 512,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 64,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 20,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
            "pad_token_id": 0,  # the tiny tokenizer's eos, which also pads
            "eos_token_id": 0,
            "decoder_start_token_id": 0,
            "initializer_factor": 0.1,  # 1.0 (HF's) starts this narrow untied head at loss ~17
        }
        c.data.name = ""
        c.data.path = str(HERE / "data" / "e2e_sample.jsonl")
        c.data.splits = ""
        c.data.tokenizer = str(HERE / "assets" / "tiny_bpe")
        c.data.max_length = 64
        runlocal_steps(c, batch_size=8, lr=1e-3)
        c.eval.generate_examples = 4
        c.eval.batch_size = 4
        c.eval.max_new_tokens = 8
        c.eval.num_beams = 2
    return c
