"""ViT-B/16 on CIFAR-10: linear probe versus full fine-tuning (two variants).

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021), Table 5 / Appendix B.1.1:
ViT-B/16 pre-trained on ImageNet-21k, fine-tuned with SGD momentum 0.9, no weight decay,
gradient clipping at norm 1, batch 512, cosine decay, lr from {0.001, 0.003, 0.01, 0.03};
CIFAR-10 fine-tuned for 10k steps reaches 98.1% top-1 (at 384 px; 224 px here gives a few
tenths less). The linear probe (frozen backbone, new head) lands well below full
fine-tuning; the paper gives no single CIFAR-10 figure for it at this setup.

    ftlab train configs/vit_cifar10.py --workdir runs/vit_cifar10 \
        --config.model.pretrained=/path/to/vit-base-patch16-224-in21k

CIFAR-10 comes from TensorFlow Datasets, prepared beforehand in ``data.data_dir`` (ftlab
reads it without TensorFlow). ``:runlocal``: a 2-layer ViT (width 32, patch 4, random init)
on scikit-learn's 8x8 digits, a smoke test of the pipeline, not a result.
"""

from ftlab.recipes import cifar10_from_tfds, runlocal_digits, runlocal_steps
from ftlab.schema import base_config

ARGS = ("runlocal",)  # what get_config(arg) accepts


def get_config(arg=None):
    c = base_config()
    c.model.name = "hf"
    c.model.pretrained = "google/vit-base-patch16-224-in21k"

    cifar10_from_tfds(c, 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # ViT's preprocessor

    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.lr = 0.01
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 500
    c.optim.clip_norm = 1.0
    c.train.batch_size = 512
    c.train.num_steps = 10_000
    c.train.eval_every = 1000
    c.train.log_every = 50
    c.checkpoint.every_steps = 1000
    c.early_stopping.metric = "val/accuracy"
    c.early_stopping.mode = "max"

    c.variants = (
        ("linear_probe", {"method.name": "frozen", "method.trainable": ("classifier/",)}),
        ("full", {"method.name": "full"}),
    )

    if arg == "runlocal":
        c.model.pretrained = ""
        c.model.hf_config = {
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": 8,
            "patch_size": 4,
            "num_channels": 1,
        }
        runlocal_digits(c)
        runlocal_steps(c, batch_size=32, lr=0.03)
    return c
