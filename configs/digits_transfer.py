"""Transfer on scikit-learn's digits: pretrain on 0-4, fine-tune on 5-9 with 5 labels per class.

The default experiment (runs offline in a few minutes on 2 CPU cores):

    ftlab train configs/digits_transfer.py --workdir runs/digits_transfer

Stage ``pretrain`` trains a small CNN (two 3x3 conv blocks, 2x2 average pool, linear head)
on every training image of digits 0-4: the "pretrained model". The variants then learn
digits 5-9 from 25 labelled images (5 per class) and are compared on the held-out test
split of digits 5-9, over 5 seeds (each seed draws its own split and labelled subset):
training from scratch, full fine-tuning, a linear probe, LoRA at ranks 1/2/4 (new head
trained in each), and a control: a linear probe on the *random* initial features.
Expected (the field's finding): with few labels, starting from the pretrained model beats
training from scratch. README reports what a run gave.

``:runlocal`` shrinks everything to a few steps for smoke tests.
"""

from ftlab.schema import base_config

ARGS = ("runlocal",)  # what get_config(arg) accepts
PRETRAINED = {"init.checkpoint": "stage:pretrain", "init.reinit": ("head/",)}
PROBE = {"method.name": "frozen", "method.trainable": ("head/",), "optim.lr": 3e-2}


def get_config(arg=None):
    c = base_config()
    c.seed = 0
    c.data.source = "sklearn"
    c.data.name = "digits"
    c.data.classes = (5, 6, 7, 8, 9)
    c.data.train_per_class = 5
    c.data.val_fraction = 0.2
    c.data.test_fraction = 0.3
    c.data.scale = 1.0 / 16.0  # pixel values are 0..16

    c.model.name = "cnn"
    c.model.features = (16, 32)
    c.model.hidden = ()  # conv features straight into the head
    c.model.dropout = 0.1

    c.optim.name = "adamw"
    c.optim.lr = 3e-3
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 1e-4

    c.train.batch_size = 25  # the whole labelled subset
    c.train.num_steps = 200
    c.train.log_every = 10
    c.train.eval_every = 10
    c.early_stopping.metric = "val/loss"
    c.early_stopping.mode = "min"
    c.early_stopping.patience = 0  # train the full budget; restore the best-on-val weights
    c.checkpoint.every_steps = 100

    c.stages = (
        (
            "pretrain",
            {
                "data.classes": (0, 1, 2, 3, 4),
                "data.train_per_class": 0,
                "train.batch_size": 64,
                "train.num_steps": 200,
                "train.eval_every": 50,
                # Label smoothing and weight decay keep the features from collapsing onto
                # the five pretraining classes (a linear probe on them then transfers).
                "train.label_smoothing": 0.1,
                "optim.weight_decay": 1e-3,
                "early_stopping.metric": "val/accuracy",
                "early_stopping.mode": "max",
            },
        ),
    )
    # Learning rates were picked per method on the validation split (never on test).
    c.variants = (
        ("scratch", {}),
        ("full", PRETRAINED),
        ("linear_probe", {**PRETRAINED, **PROBE}),
        *[
            (
                f"lora_r{r}",
                {
                    **PRETRAINED,
                    "method.name": "lora",
                    "method.trainable": ("head/",),
                    "method.lora.rank": r,
                    "method.lora.alpha": 2.0 * r,
                    "method.lora.targets": (r"block_\d+/kernel",),
                },
            )
            for r in (1, 2, 4)
        ],
        ("random_features_probe", PROBE),  # control: the same probe on untrained features
    )
    c.variant_seeds = (0, 1, 2, 3, 4)
    if arg == "runlocal":
        c.train.num_steps = 6
        c.optim.warmup_steps = 2  # shorter than the run
        c.train.eval_every = 3
        c.train.log_every = 2
        c.checkpoint.every_steps = 3
        c.stages = (("pretrain", {**c.stages[0][1], "train.num_steps": 6, "train.eval_every": 3}),)
        c.variant_seeds = (0, 1)
    return c
