"""Pieces the reference-recipe configs share, so each config file shows only what is its own.

``runlocal`` (as big_vision's) shrinks a recipe to a smoke test: a few steps on local data.
"""

from __future__ import annotations

import ml_collections as mc


def cifar10_from_tfds(
    c: mc.ConfigDict, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """CIFAR-10 from a prepared TensorFlow Datasets directory, resized and normalised as the
    pretrained model expects; 1,000 training images held out for model selection."""
    c.data.source = "tfds"
    c.data.name = "cifar10"
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.columns = "image=image,label=label"
    c.data.splits = "train=train,test=test"
    c.data.val_fraction = 0.02
    c.data.test_fraction = 0.0
    c.data.clean.image_size = (image_size, image_size)
    c.data.clean.normalise = "image"
    c.data.clean.image_mean = mean
    c.data.clean.image_std = std
    c.data.clean.duplicates = False  # CIFAR-10 has a few; keep the standard split sizes
    c.data.clean.leakage = ""


def runlocal_digits(c: mc.ConfigDict) -> None:
    """An image recipe on scikit-learn's 8x8 digits (one channel) instead of its dataset."""
    c.data.source = "sklearn"
    c.data.name = "digits"
    c.data.columns = ""
    c.data.splits = ""
    c.data.val_fraction = 0.15
    c.data.test_fraction = 0.15
    c.data.clean.image_size = ()
    c.data.clean.normalise = ""
    c.data.scale = 1.0 / 16.0


def runlocal_steps(c: mc.ConfigDict, batch_size: int, lr: float) -> None:
    """Six steps, evaluated and checkpointed every three: the whole loop, in seconds."""
    c.optim.lr = lr
    c.optim.warmup_steps = 2
    c.train.batch_size = batch_size
    c.train.num_epochs = 0
    c.train.num_steps = 6
    c.train.eval_every = 3
    c.train.log_every = 3
    c.checkpoint.every_steps = 3
