"""LoRA rank ablation for GPT-2 medium on E2E NLG: r = 1 ... 64 on W_q and W_v.

    ftlab train configs/gpt2_e2e_lora_rank.py --workdir runs/e2e_lora_rank
    ftlab list configs/gpt2_e2e_lora_rank.py          # the runs it declares

Source: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), Table 6 (GPT-3:
r = 1, 2, 4, 8, 64 on W_q / W_v) and Appendix H.2 (the same for GPT-2 medium on E2E NLG). Every
other setting is configs/gpt2_e2e.py's LoRA recipe (Table 3: alpha 32 fixed as the rank
changes, as in the paper, lr 2e-4, 5 epochs, beam 10); r = 4 is its baseline. Needs what
gpt2_e2e.py needs (``gpt2-medium`` and E2E, local or from the hub).

What it should show: test BLEU (and validation loss) roughly flat from r = 1 to r = 64 while
the trainable parameters grow linearly with r, i.e. the update has a very low intrinsic rank
and a larger r does not help. ``:runlocal`` runs r = 1, 2, 4, 8 on gpt2_e2e's shrunken random
model and 96-row sample for a few steps: a smoke test of the sweep, not a result.
"""

from pathlib import Path

from ftlab.config import load_config

HERE = Path(__file__).parent
ARGS = ("runlocal",)  # what get_config(arg) accepts
RANKS = (1, 2, 4, 8, 16, 32, 64)


def get_config(arg=None):
    runlocal = arg == "runlocal"
    c = load_config(str(HERE / "gpt2_e2e.py") + (":lora,runlocal" if runlocal else ":lora"))
    c.method.lora.targets = (r"attn/(q|v)_proj/kernel",)  # W_q and W_v (h_N/attn/*_proj)
    ranks = (1, 2, 4, 8) if runlocal else RANKS  # the tiny model's width is 32
    c.sweep.grid = (("method.lora.rank", ranks),)
    c.baseline = "r4"
    return c
