"""ResNet-50 (ImageNet) on CIFAR-10: linear probe versus full fine-tuning (two variants).

Source: Kornblith, Shlens and Le, "Do Better ImageNet Models Transfer Better?" (CVPR 2019),
Tables A1-A2 (with their Figure 2): an ImageNet ResNet-50 fine-tuned on CIFAR-10 reaches
about 97% top-1 (SGD with Nesterov momentum, batch 256, 224 px); logistic regression on its
frozen penultimate features about 90%. Here: SGD momentum 0.9, cosine decay, 10k steps.

    ftlab train configs/resnet50_cifar10.py --workdir runs/resnet50_cifar10 \
        --config.model.pretrained=/path/to/resnet-50

(Hugging Face's ``microsoft/resnet-50`` layout.) CIFAR-10 from TensorFlow Datasets as in
configs/vit_cifar10.py. ``:runlocal``: a two-stage basic-block ResNet (width 8-16, random
init) on scikit-learn's 8x8 digits, a smoke test of the pipeline, not a result. In the
linear probe BatchNorm statistics still update in training mode (the weights stay frozen).
"""

from ftlab.recipes import cifar10_from_tfds, runlocal_digits, runlocal_steps
from ftlab.schema import base_config

ARGS = ("runlocal",)  # what get_config(arg) accepts


def get_config(arg=None):
    c = base_config()
    c.model.name = "hf"
    c.model.pretrained = "microsoft/resnet-50"

    # ImageNet statistics
    cifar10_from_tfds(c, 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    c.data.augment.crop_padding = 16
    c.data.augment.flip = True

    c.optim.name = "sgd"
    c.optim.momentum = 0.9
    c.optim.lr = 0.01
    c.optim.weight_decay = 1e-4
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 500
    c.train.batch_size = 256
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
            "model_type": "resnet",
            "embedding_size": 8,
            "hidden_sizes": [8, 16],
            "depths": [1, 1],
            "layer_type": "basic",
            "num_channels": 1,
        }
        runlocal_digits(c)
        c.data.augment.crop_padding = 1
        runlocal_steps(c, batch_size=32, lr=0.03)
    return c
