"""Shared fixtures: a tiny digits config that compiles and trains in seconds on a CPU."""

import logging

import pytest

from ftlab.schema import base_config

logging.getLogger("absl").setLevel(logging.WARNING)


def tiny_config(**overrides):
    from ftlab.config import apply_overrides

    c = base_config()
    c.data.classes = (5, 6, 7, 8, 9)
    c.data.scale = 1.0 / 16.0
    c.model.features = (4, 8)
    c.model.hidden = (16,)
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 2
    c.train.batch_size = 16
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 5
    c.checkpoint.every_steps = 5
    return apply_overrides(c, overrides)


@pytest.fixture
def tiny():
    return tiny_config
