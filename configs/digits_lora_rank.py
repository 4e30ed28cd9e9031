"""LoRA rank ablation on the digits transfer setup: does a very low rank suffice?

    ftlab train configs/digits_lora_rank.py --workdir runs/digits_lora_rank
    ftlab list configs/digits_lora_rank.py            # the runs it declares

The shape of Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), Table 6
(validation accuracy for r = 1, 2, 4, 8, 64 on GPT-3) and Appendix H.2 (GPT-2 M on E2E), here on
configs/digits_transfer.py: its ``pretrain`` stage (digits 0-4), then LoRA fine-tuning on digits
5-9 from 5 labels per class, new head trained, over 5 seeds, for r = 1, 2, 4, 8, 16, 32, 64.
LoRA adapts the second conv block: its kernel (3x3x16 -> 64 channels here, widened from 32 so
that r = 64 fits: the rank is at most min(fan-in, fan-out); the first block's fan-in is 9).
``alpha`` moves with the rank (alpha = 2r, the scale alpha/r stays 2, as in digits_transfer),
a zipped pair of keys. Baseline: r = 4.

What it should show: test accuracy roughly flat in r (within the seeds' spread) while the
trainable parameters grow linearly with r: a low rank already captures the update, the paper's
finding. ``:runlocal`` shrinks it to a few steps, 2 seeds and ranks 1, 2, 4 (a smoke test).
"""

from pathlib import Path

from ftlab.config import load_config

HERE = Path(__file__).parent
ARGS = ("runlocal",)  # what get_config(arg) accepts
RANKS = (1, 2, 4, 8, 16, 32, 64)


def get_config(arg=None):
    runlocal = arg == "runlocal"
    c = load_config(str(HERE / "digits_transfer.py") + (":runlocal" if runlocal else ""))
    c.model.features = (16, 64)  # block_1: fan-in 144, fan-out 64, so rank 64 fits
    ranks = (1, 2, 4) if runlocal else RANKS
    c.variants = (
        (
            "lora",
            {
                "init.checkpoint": "stage:pretrain",
                "init.reinit": ("head/",),
                "method.name": "lora",
                "method.trainable": ("head/",),
                "method.lora.targets": (r"block_1/kernel",),
            },
        ),
    )
    c.sweep.zip = (
        (
            ("method.lora.rank", ranks),
            ("method.lora.alpha", tuple(2.0 * r for r in ranks)),
        ),
    )
    c.baseline = "lora_r4"
    return c
