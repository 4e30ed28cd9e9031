"""BERT-base fine-tuned on SST-2 (GLUE sentiment), full fine-tuning.

Source: Devlin et al., "BERT" (2019), section 4.1 and Table 1: BERT-base, batch 32, 3 epochs,
lr chosen among {5e-5, 4e-5, 3e-5, 2e-5} on the dev set, max length 128; SST-2 accuracy
93.5 (test, GLUE server). On the dev set (used as test here, since SST-2's test labels are
hidden) fine-tuned BERT-base reaches about 92-93% accuracy.

    ftlab train configs/bert_sst2.py --workdir runs/bert_sst2

needs ``bert-base-uncased`` (local directory or hub) and SST-2 (``stanfordnlp/sst2`` on the
hub, or local files). ``:runlocal``: a 2-layer BERT (width 32, random init), the 84-sentence
sample in configs/data and a tiny WordPiece tokenizer: a smoke test, not a result.
"""

from pathlib import Path

from ftlab.recipes import runlocal_steps
from ftlab.schema import base_config

HERE = Path(__file__).parent
ARGS = ("runlocal",)  # what get_config(arg) accepts


def get_config(arg=None):
    c = base_config()
    c.model.name = "hf"
    c.model.pretrained = "bert-base-uncased"

    c.data.source = "hf"
    c.data.name = "stanfordnlp/sst2"
    c.data.columns = "text=sentence,label=label"
    c.data.splits = "train=train,test=validation"  # the test split has no labels
    c.data.val_fraction = 872 / 67349  # a dev-sized slice of train for model selection
    c.data.task = "classification"
    c.data.max_length = 128

    c.method.name = "full"
    c.optim.name = "adamw"
    c.optim.lr = 2e-5
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 600  # ~10% of 3 epochs at batch 32
    c.optim.schedule = "linear"

    c.train.batch_size = 32
    c.train.num_epochs = 3
    c.train.eval_every = 500
    c.train.log_every = 50
    c.train.eval_batch_size = 128
    c.checkpoint.every_steps = 500
    c.early_stopping.metric = "val/accuracy"
    c.early_stopping.mode = "max"

    if arg == "runlocal":
        c.model.pretrained = ""
        c.model.hf_config = {
            "model_type": "bert",
            "vocab_size": 400,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
            "type_vocab_size": 2,
        }
        c.data.name = ""
        c.data.path = str(HERE / "data" / "sst2_sample.jsonl")
        c.data.splits = ""
        c.data.val_fraction = 0.2
        c.data.test_fraction = 0.2
        c.data.tokenizer = str(HERE / "assets" / "tiny_wordpiece")
        c.data.max_length = 16
        runlocal_steps(c, batch_size=8, lr=1e-3)
    return c
