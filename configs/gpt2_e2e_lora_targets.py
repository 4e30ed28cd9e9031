"""Which weights should LoRA adapt? GPT-2 medium on E2E NLG at a fixed parameter budget.

    ftlab train configs/gpt2_e2e_lora_targets.py --workdir runs/e2e_lora_targets
    ftlab list configs/gpt2_e2e_lora_targets.py       # the runs it declares

Source: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), Table 5 (GPT-3
175B on WikiSQL and MultiNLI, 18M trainable parameters): LoRA on W_q, W_k, W_v or W_o alone at
r = 8, on (W_q, W_k) or (W_q, W_v) at r = 4, on all four at r = 2. The budget is the same for
every row since the four projections have the same shape (here n_embd x n_embd: GPT-2's
``h_N/attn/{q,k,v}_proj`` and the output projection ``h_N/attn/c_proj``). Everything else is
configs/gpt2_e2e.py's LoRA recipe (Table 3); (W_q, W_v) at r = 4 is its baseline. Needs what
gpt2_e2e.py needs (``gpt2-medium`` and E2E, local or from the hub).

What it should show (the paper's finding, here on E2E): spreading the budget over several
weight types beats a larger rank on one; W_q or W_k alone does worst, (W_q, W_v) or all four
do best. ``:runlocal`` runs the seven points on gpt2_e2e's shrunken random model and 96-row
sample for a few steps: a smoke test of the sweep, not a result.
"""

from pathlib import Path

from ftlab.config import load_config

HERE = Path(__file__).parent
ARGS = ("runlocal",)  # what get_config(arg) accepts

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "c_proj"}  # GPT-2's names
TARGETS = ("q", "k", "v", "o", "qk", "qv", "qkvo")


def targets(weights: str) -> tuple[str, ...]:
    """``"qv"`` -> ``("attn/(q_proj|v_proj)/kernel",)`` (never the MLP's c_proj)."""
    return (rf"attn/({'|'.join(_ATTN[w] for w in weights)})/kernel",)


def get_config(arg=None):
    runlocal = arg == "runlocal"
    c = load_config(str(HERE / "gpt2_e2e.py") + (":lora,runlocal" if runlocal else ":lora"))
    c.sweep.zip = (
        (
            ("name", TARGETS),
            ("method.lora.targets", tuple(targets(w) for w in TARGETS)),
            ("method.lora.rank", tuple(8 // len(w) for w in TARGETS)),  # 8 / 4 / 2
        ),
    )
    c.baseline = "qv"
    return c
