"""Shared fixtures: a tiny digits config that compiles and trains in seconds on a CPU.

The suite compiles the same small steps many times (and in subprocesses); a persistent
compilation cache for the session (environment variables, so subprocesses share it) keeps
it within its time budget. Cached executables are the ones XLA would build again.
"""

import logging
import os
import tempfile

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
# CPU only: the test extras install libtpu (for ahead-of-time TPU plans), which would make every
# jax process here probe for a TPU first; TPU plans compile for a topology, not a device
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="ftlab_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# a pytest plugin may have imported jax before the variables were set: set them here too
import jax

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

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


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
