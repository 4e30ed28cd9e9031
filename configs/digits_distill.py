"""Knowledge distillation on scikit-learn's digits: a larger CNN teacher to a small student.

    ftlab train configs/digits_distill.py --workdir runs/digits_distill

Stage ``teacher`` trains a larger CNN (conv 32 -> 64, a 128-unit dense block) on the training
split of all ten digits. The variants, on the same split (test rows never seen by the teacher),
compare:

- ``scratch``: the small student (conv 4 -> 8 straight into the head) trained on the labels;
- ``distilled``: the same student, same steps and learning rate, trained on
  ``0.5 * CE(labels) + 0.5 * T^2 * KL(teacher_T || student_T)`` at T = 4 with the teacher
  (``distill.teacher = "stage:teacher"``) running forward only;
- ``teacher``: the teacher's own architecture trained the same way as a variant, for the
  comparison row (the stage itself is not a compared variant).

The student sees only ``data.train_per_class`` = 10 labelled images per class (a small
transfer set); the teacher was trained on the whole training split (which holds those
images). The variant ``teacher`` has the stage's name and config, so it is the stage's run
(its summary is read, not retrained). Every run keeps its best-on-validation weights; the
table is on the test split (540 images, never seen by the teacher).

What it reached on our CPU run (2 cores, ~25 s for the whole experiment), test accuracy, for
``--config.seed=0 / 1 / 2`` (init and batch order; the split and labelled subset stay fixed,
as the teacher must not have seen the test rows): scratch 0.887 / 0.885 / 0.885, distilled
0.950 / 0.944 / 0.954, teacher 0.980 / 0.980 / 0.981. Distillation closes about two thirds
of the gap between the 1,626-parameter student and the 151,306-parameter teacher.
(``variant_seeds`` is not used: it redraws the split per seed, and the one teacher stage would
then have trained on other seeds' test rows.)

``:runlocal`` shrinks every run to six steps: a smoke test of the three variants and the
table (``results.md``), not a result.
"""

from ftlab.schema import base_config

ARGS = ("runlocal",)  # what get_config(arg) accepts
STUDENT = {"model.features": (4, 8), "model.hidden": ()}
TEACHER = {"model.features": (32, 64), "model.hidden": (128,)}
LABELS_PER_CLASS = 10


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.data.source = "sklearn"
    c.data.name = "digits"
    c.data.val_fraction = 0.2
    c.data.test_fraction = 0.3
    c.data.scale = 1.0 / 16.0  # pixel values are 0..16
    c.data.train_per_class = LABELS_PER_CLASS

    c.model.name = "cnn"
    c.model.features = STUDENT["model.features"]
    c.model.hidden = STUDENT["model.hidden"]
    c.model.dropout = 0.0

    c.optim.name = "adamw"
    c.optim.lr = 1e-2
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 1e-4

    c.train.batch_size = 50
    c.train.num_steps = 300
    c.train.log_every = 25
    c.train.eval_every = 25
    c.early_stopping.metric = "val/accuracy"
    c.early_stopping.mode = "max"
    c.checkpoint.every_steps = 100

    c.distill.alpha = 0.5
    c.distill.temperature = 4.0

    teacher = {
        **TEACHER,
        "data.train_per_class": 0,  # every training image
        "train.batch_size": 64,
        "optim.lr": 3e-3,
        "model.dropout": 0.1,
    }
    c.stages = (("teacher", teacher),)
    c.variants = (
        ("scratch", {}),
        ("distilled", {"distill.teacher": "stage:teacher"}),
        ("teacher", teacher),
    )
    if arg == "runlocal":
        c.train.num_steps = 6
        c.optim.warmup_steps = 2  # shorter than the run
        c.train.eval_every = 3
        c.train.log_every = 3
        c.checkpoint.every_steps = 3
        c.train.batch_size = 20
        c.eval.before_training = False
        small = {"model.features": (4, 8), "model.hidden": (8,), "train.batch_size": 20}
        c.stages = (("teacher", {**teacher, **small}),)
        c.variants = (
            ("scratch", {}),
            ("distilled", {"distill.teacher": "stage:teacher"}),
            ("teacher", {**teacher, **small}),
        )
    return c
