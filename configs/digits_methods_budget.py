"""Fine-tuning methods across label budgets on the digits transfer setup.

    ftlab train configs/digits_methods_budget.py --workdir runs/digits_methods_budget
    ftlab list configs/digits_methods_budget.py       # the runs it declares

The shape of the method comparisons in Hu et al., "LoRA: Low-Rank Adaptation of Large
Language Models" (2021), Tables 2-3 (full fine-tuning, BitFit, the top layers only (FT^Top2),
LoRA, at very different trainable-parameter counts) and of its low-data study (Table 16: LoRA
against full fine-tuning on subsets of MNLI, from 100 examples to all of them), on
configs/digits_transfer.py: its ``pretrain`` stage (digits 0-4), then digits 5-9 learnt from 2,
5, 10, 25 or 50 labels per class by

- ``full``: every weight (new head),
- ``top1``: the last conv block and the head (``partial``, ``last_k = 1``),
- ``lora``: rank 4 on both conv kernels, plus the head,
- ``bitfit``: the biases, plus the head,
- ``linear_probe``: the head alone,

over 3 seeds. The sweep is a product of two zipped groups: the label budget moves with the
batch size (whole subsets up to 25 examples), the method with its own keys and learning rate
(picked on digits_transfer's validation split). Baseline: full fine-tuning at 2 labels per class.

What it should show: with the fewest labels the frugal methods (linear probe, BitFit, LoRA)
match or beat full fine-tuning, and full fine-tuning catches up or pulls ahead as labels grow,
while trainable parameters differ by orders of magnitude (the table's "trainable %").
``:runlocal`` shrinks it to a few steps, one seed and budgets 2 and 5 (a smoke test).
"""

from pathlib import Path

from ftlab.config import load_config

HERE = Path(__file__).parent
ARGS = ("runlocal",)  # what get_config(arg) accepts
HEAD = ("head/",)

METHODS = (
    ("name", ("full", "top1", "lora", "bitfit", "linear_probe")),
    ("method.name", ("full", "partial", "lora", "bitfit", "frozen")),
    ("method.partial.last_k", (0, 1, 0, 0, 0)),
    ("method.trainable", ((), HEAD, HEAD, HEAD, HEAD)),
    ("optim.lr", (3e-3, 3e-3, 3e-3, 1e-2, 3e-2)),
)


def get_config(arg=None):
    runlocal = arg == "runlocal"
    c = load_config(str(HERE / "digits_transfer.py") + (":runlocal" if runlocal else ""))
    # every method starts from the pretrained CNN with a new head; the stage itself from scratch
    c.init.checkpoint = "stage:pretrain"
    c.init.reinit = HEAD
    (stage, overrides), *_ = c.stages
    c.stages = ((stage, {**overrides, "init.checkpoint": "", "init.reinit": ()}),)
    c.method.lora.rank = 4
    c.method.lora.alpha = 8.0
    c.method.lora.targets = (r"block_\d+/kernel",)
    c.variants = ()
    per_class = (2, 5) if runlocal else (2, 5, 10, 25, 50)
    c.sweep.zip = (
        (
            ("data.train_per_class", per_class),
            ("train.batch_size", tuple(min(25, 5 * n) for n in per_class)),
        ),
        METHODS,
    )
    c.variant_seeds = (0,) if runlocal else (0, 1, 2)
    c.baseline = "n2_full"
    return c
