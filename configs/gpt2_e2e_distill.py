"""Knowledge distillation on E2E NLG: a fine-tuned GPT-2 medium teacher to GPT-2 small.

    ftlab train configs/gpt2_e2e_distill.py --workdir runs/e2e_distill
    ftlab list configs/gpt2_e2e_distill.py            # the runs it declares

Stage ``teacher`` is configs/gpt2_e2e.py's full fine-tuning recipe (``gpt2-medium``, 354.8M
parameters, AdamW 5e-5, batch 8, 5 epochs, label smoothing 0.1, beam 10). The variants compare
GPT-2 small (``gpt2``, 124.4M; the same tokenizer and vocabulary, 50,257 tokens) fully
fine-tuned with the same recipe:

- ``student``: on the references alone;
- ``distilled``: on ``0.5 * CE + 0.5 * T^2 * KL(teacher_T || student_T)`` at T = 2, per
  target token (the prompt and padding are excluded, as from the CE), the teacher running
  forward only (``distill.teacher = "stage:teacher"``);
- ``teacher``: the stage itself (same name and config: its summary is read, not retrained).

Needs ``gpt2`` and ``gpt2-medium`` (local directories via ``--config.model.pretrained`` and
the stage's override, or the hub when online) and E2E, as configs/gpt2_e2e.py. What it should
show: the distilled student between the student and the teacher in validation loss and test
BLEU (the teacher's target is gpt2_e2e.py:full's, BLEU 68.2 in the LoRA paper); not run here
(no weights, no network), so no number of ours.

``:runlocal`` uses gpt2_e2e.py's 96-row sample and tiny tokenizer (vocabulary 512): the
teacher is its shrunken random GPT-2 (2 blocks, width 32), the student 1 block of width 16,
six steps each: a smoke test of the pipeline, not a result.
"""

from pathlib import Path

from ftlab.config import load_config

HERE = Path(__file__).parent
ARGS = ("runlocal",)  # what get_config(arg) accepts


def get_config(arg=None):
    runlocal = arg == "runlocal"
    c = load_config(str(HERE / "gpt2_e2e.py") + (":full,runlocal" if runlocal else ":full"))
    teacher = {"model.pretrained": c.model.pretrained}  # gpt2-medium (runlocal: "")
    if runlocal:  # gpt2_e2e's tiny shapes for the teacher, half of them for the student
        teacher = {"model.hf_config.n_embd": 32, "model.hf_config.n_layer": 2}
        c.model.hf_config.n_embd = 16
        c.model.hf_config.n_layer = 1
        c.eval.before_training = False
    else:
        c.model.pretrained = "gpt2"
    c.distill.alpha = 0.5
    c.distill.temperature = 2.0
    c.stages = (("teacher", teacher),)
    c.variants = (
        ("student", {}),
        ("distilled", {"distill.teacher": "stage:teacher"}),
        ("teacher", teacher),
    )
    return c
