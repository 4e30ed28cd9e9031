import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab.checkpoint import Checkpoints, load_pytree, save_pytree


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    trainable: dict
    frozen: dict
    opt_state: optax.OptState
    rng: jax.Array


def _tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "encoder": {"dense": {"kernel": jax.random.normal(k1, (4, 8)), "bias": jnp.zeros(8)}},
        "head": {
            "kernel": jax.random.normal(k2, (8, 3)),
            "bias": jax.random.normal(k3, (3,)),
        },
    }


def _make_state(n_updates: int = 3, seed: int = 0) -> TrainState:
    tx = _tx()
    params = _params(seed)
    opt_state = tx.init(params)
    rng = jax.random.PRNGKey(seed + 100)
    for _ in range(n_updates):
        rng, sub = jax.random.split(rng)
        grads = jax.tree.map(lambda p, k=sub: jax.random.normal(k, p.shape) + p, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return TrainState(
        step=jnp.asarray(n_updates, jnp.int32),
        trainable=params,
        frozen={"embed": {"table": jnp.arange(12, dtype=jnp.float32).reshape(3, 4)}},
        opt_state=opt_state,
        rng=jax.random.key_data(rng),
    )


def _fresh_target() -> TrainState:
    # Same structure/dtypes, different values, so a no-op restore would fail.
    return jax.tree.map(jnp.zeros_like, _make_state(n_updates=0, seed=7))


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        assert x.shape == y.shape
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_state_has_optax_namedtuples_and_empty_state():
    # Guard: the fixture really exercises the tricky optax containers.
    state = _make_state()
    inner = state.opt_state
    assert isinstance(inner[0], optax.EmptyState)  # clip_by_global_norm
    assert isinstance(inner[1][0], optax.ScaleByAdamState)
    assert int(inner[1][0].count) == 3
    assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)


def test_save_every_keep_last_and_latest_step(tmp_path):
    state = _make_state()
    ckpt = Checkpoints(tmp_path, save_every=2, keep=2, async_save=False)
    assert ckpt.latest_step() is None
    started = {s: ckpt.save(s, state, {"step": s}) for s in range(1, 9)}
    assert [s for s, ok in started.items() if ok] == [2, 4, 6, 8]
    assert ckpt.latest_step() == 8
    assert ckpt.all_steps() == [6, 8]
    on_disk = sorted(int(p.name) for p in (tmp_path / "last").iterdir() if p.name.isdigit())
    assert on_disk == [6, 8]
    # Re-saving an existing step is skipped, and forcing it raises: never overwritten.
    assert ckpt.save(8, state, {"step": 8}) is False
    with pytest.raises(Exception, match="already exists"):
        ckpt.save(8, state, {"step": 8}, force=True)
    # force saves an off-interval step.
    assert ckpt.save(9, state, {"step": 9}, force=True) is True
    assert ckpt.latest_step() == 9
    assert ckpt.all_steps() == [8, 9]
    ckpt.close()
    # A new manager on the same directory sees the same steps.
    reopened = Checkpoints(tmp_path, save_every=2, keep=2, async_save=False)
    assert reopened.latest_step() == 9
    _, meta = reopened.restore(_fresh_target(), step=8)
    assert meta == {"step": 8}
    reopened.close()


def test_restore_bit_identical_into_fresh_target(tmp_path):
    state = _make_state(n_updates=3)
    later = _make_state(n_updates=5)
    meta = {
        "step": 3,
        "config": {"lr": 0.01, "name": "lora"},
        "tags": ["a", "b"],
        "none": None,
    }
    with Checkpoints(tmp_path, save_every=1, keep=3, async_save=False) as ckpt:
        assert ckpt.save(3, state, meta)
        assert ckpt.save(5, later, {"step": 5})
        # latest by default
        restored, rmeta = ckpt.restore(_fresh_target())
        _assert_identical(restored, later)
        assert rmeta == {"step": 5}
        # explicit older step, into a concrete target
        restored, rmeta = ckpt.restore(_fresh_target(), step=3)
        _assert_identical(restored, state)
        assert rmeta == json.loads(json.dumps(meta))
        assert isinstance(restored, TrainState)
        assert isinstance(restored.opt_state[0], optax.EmptyState)
        assert isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
        # abstract (ShapeDtypeStruct) target
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        restored, _ = ckpt.restore(abstract, step=3)
        _assert_identical(restored, state)
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored))
        with pytest.raises(FileNotFoundError, match="step 4"):
            ckpt.restore(_fresh_target(), step=4)


def test_restore_empty_directory_raises(tmp_path):
    with (
        Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt,
        pytest.raises(FileNotFoundError, match="no checkpoint"),
    ):
        ckpt.restore(_fresh_target())


@pytest.mark.parametrize(
    "mode, values, expected_started, best_idx",
    [
        ("max", [0.5, 0.7, 0.6, 0.7], [True, True, False, False], 1),
        ("min", [0.5, 0.3, 0.4, 0.2], [True, True, False, True], 3),
    ],
)
def test_save_best_keeps_better(tmp_path, mode, values, expected_started, best_idx):
    ckpt = Checkpoints(tmp_path, save_every=100, best_metric="score", best_mode=mode)
    states = [_make_state(n_updates=i + 1) for i in range(len(values))]
    steps = [10 * (i + 1) for i in range(len(values))]
    started = [
        ckpt.save_best(s, st, {"step": s}, {"score": v, "loss": 1.0})
        for s, st, v in zip(steps, states, values)
    ]
    assert started == expected_started
    ckpt.wait()
    assert ckpt.best_step() == steps[best_idx]
    best_dirs = [p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()]
    assert best_dirs == [str(steps[best_idx])]
    # "last" is untouched by save_best.
    assert ckpt.latest_step() is None
    restored, meta, step = ckpt.restore_best(_fresh_target())
    assert step == steps[best_idx]
    assert meta == {"step": steps[best_idx]}
    _assert_identical(restored, states[best_idx])
    ckpt.close()

    # The stored best survives reopening: a worse value is rejected, a better one accepted.
    reopened = Checkpoints(tmp_path, save_every=100, best_metric="score", best_mode=mode)
    assert reopened.best_step() == steps[best_idx]
    worse = 0.0 if mode == "max" else 1.0
    better = 0.9 if mode == "max" else 0.1
    assert reopened.save_best(100, states[0], {}, {"score": worse}) is False
    assert reopened.save_best(110, states[0], {}, {"score": better}) is True
    reopened.wait()
    assert reopened.best_step() == 110
    assert reopened.best_value() == better
    reopened.close()


def test_save_best_missing_metric_key(tmp_path):
    with Checkpoints(tmp_path, save_every=1, best_metric="accuracy") as ckpt:
        with pytest.raises(ValueError, match="accuracy") as err:
            ckpt.save_best(1, _make_state(), {}, {"loss": 0.3, "f1": 0.8})
        assert "f1" in str(err.value) and "loss" in str(err.value)
        assert ckpt.best_step() is None


def test_save_best_without_best_metric_configured(tmp_path):
    with (
        Checkpoints(tmp_path, save_every=1) as ckpt,
        pytest.raises(ValueError, match="best_metric"),
    ):
        ckpt.save_best(1, _make_state(), {}, {"loss": 0.3})


def test_async_save_wait_restore(tmp_path):
    state = _make_state(n_updates=4)
    ckpt = Checkpoints(tmp_path, save_every=5, keep=2, async_save=True)
    assert ckpt.save(5, state, {"epoch": 1}) is True
    assert ckpt.save(10, _make_state(n_updates=2), {"epoch": 2}) is True
    ckpt.wait()
    assert (tmp_path / "last" / "5" / "state").is_dir()
    assert ckpt.all_steps() == [5, 10]
    restored, meta = ckpt.restore(_fresh_target(), step=5)
    _assert_identical(restored, state)
    assert meta == {"epoch": 1}
    ckpt.close()


def test_meta_must_be_json(tmp_path):
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(1, _make_state(), {"bad": object()})
        assert ckpt.latest_step() is None


def test_save_load_pytree_roundtrip_and_errors(tmp_path):
    params = _make_state().trainable
    path = tmp_path / "workdir" / "params"
    save_pytree(path, params)
    loaded = load_pytree(path, jax.tree.map(jnp.zeros_like, params))
    _assert_identical(loaded, params)
    with pytest.raises(ValueError, match="already exists"):
        save_pytree(path, params)
    missing = tmp_path / "nope" / "params"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_pytree(missing, params)
