"""Per-host, per-epoch, resumable training batches (ftlab.data.pipeline)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ftlab.config import ConfigError
from ftlab.data import Split
from ftlab.data.batches import train_batch
from ftlab.data.pipeline import DataIterator, Sampler

N, B = 103, 16  # 103 % 16 = 7 examples in the last partial batch
ROOT = Path(__file__).resolve().parents[1]


def arrays(n=N):
    """Values encode the example index, so a batch says which examples it holds."""
    return {"id": np.arange(n), "x": np.arange(n * 2, dtype=np.float32).reshape(n, 2)}


def take(it, k):
    return [next(it) for _ in range(k)]


def host_batches(policy, process_index, steps, **kw):
    with DataIterator(
        arrays(),
        global_batch_size=B,
        seed=5,
        last_batch=policy,
        process_index=process_index,
        process_count=2,
        **kw,
    ) as it:
        return take(it, steps), it.steps_per_epoch


@pytest.mark.parametrize("policy", ["drop", "pad", "wrap"])
def test_two_hosts_cover_each_epoch_as_the_policy_says(policy):
    steps = {"drop": N // B, "pad": -(-N // B), "wrap": -(-N // B)}[policy]
    h0, per_epoch = host_batches(policy, 0, 3 * steps)
    h1, _ = host_batches(policy, 1, 3 * steps)
    assert per_epoch == steps
    epochs = []
    for e in range(3):
        ids, weights = [], []
        for a, b in zip(h0[e * steps : (e + 1) * steps], h1[e * steps : (e + 1) * steps]):
            assert len(a["id"]) == len(b["id"]) == B // 2
            assert np.array_equal(a["x"][:, 0], 2 * a["id"])  # rows stay aligned across keys
            ids.append(np.concatenate([a["id"], b["id"]]))
            weights.append(
                np.concatenate([a.get("weights", np.ones(8)), b.get("weights", np.ones(8))])
            )
        ids, weights = np.concatenate(ids), np.concatenate(weights)
        epochs.append(ids)
        if policy == "drop":
            assert "weights" not in h0[0]
            assert len(ids) == len(set(ids.tolist())) == N - N % B  # no repeats
        elif policy == "pad":
            counted = Counter(ids[weights > 0].tolist())
            assert sorted(counted) == list(range(N)) and set(counted.values()) == {1}
            assert weights.sum() == N and set(weights.tolist()) == {0.0, 1.0}
        else:
            assert "weights" not in h0[0]
            assert set(ids.tolist()) == set(range(N))
            extra = Counter(ids.tolist()) - Counter(range(N))
            assert sum(extra.values()) == steps * B - N  # only the filler repeats
            assert set(extra) == set(ids[: steps * B - N].tolist())  # the epoch's first examples
    # a fresh shuffle every epoch
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_hosts_are_slices_of_the_global_batch_whatever_the_host_count():
    one = Sampler(N, B, seed=2, last_batch="pad")
    for epoch, step in [(0, 0), (1, 3), (2, 6)]:
        full, w = one.global_indices(epoch, step)
        for count in (2, 4, 8):
            parts = [
                Sampler(N, B, 2, "pad", True, p, count).indices(epoch, step) for p in range(count)
            ]
            assert np.array_equal(np.concatenate([i for i, _ in parts]), full)
            assert np.array_equal(np.concatenate([x for _, x in parts]), w)


def test_drop_policy_matches_the_existing_train_batch_and_seeds_are_reproducible():
    split = Split(np.arange(N * 2, dtype=np.float32).reshape(N, 2), np.arange(N))
    with DataIterator(
        {"inputs": split.inputs, "labels": split.labels}, global_batch_size=B, seed=9
    ) as it:
        for step, batch in enumerate(take(it, 20)):  # crosses three epoch boundaries
            ref = train_batch(split, step, B, 9)
            assert np.array_equal(batch["inputs"], ref["inputs"])
            assert np.array_equal(batch["labels"], ref["labels"])
    runs = []
    for seed in (9, 9, 10):
        with DataIterator(arrays(), global_batch_size=B, seed=seed, process_count=1) as it:
            runs.append(np.concatenate([b["id"] for b in take(it, 8)]))
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    with DataIterator(arrays(), global_batch_size=B, seed=0, shuffle=False) as it:
        assert np.array_equal(next(it)["id"], np.arange(B))


@pytest.mark.parametrize("policy", ["drop", "pad"])
def test_resume_from_saved_state_continues_with_the_next_batch(policy):
    kw = {
        "global_batch_size": B,
        "seed": 3,
        "last_batch": policy,
        "process_index": 1,
        "process_count": 2,
    }
    with DataIterator(arrays(), prefetch=3, **kw) as it:
        straight = take(it, 25)
    for cut in (4, 6, 7, 13):  # mid-epoch, last batch of an epoch, epoch boundary
        with DataIterator(arrays(), prefetch=3, **kw) as first:
            take(first, cut)
            saved = json.loads(json.dumps(first.state()))  # what the checkpoint meta holds
            assert first.step == cut
        with DataIterator.from_state(arrays(), saved, process_index=1, process_count=2) as resumed:
            assert resumed.step == cut
            for want, got in zip(straight[cut:], take(resumed, 25 - cut)):
                assert want.keys() == got.keys()
                assert all(np.array_equal(want[k], got[k]) for k in want)
    # restore() on a running iterator rewinds it too
    with DataIterator(arrays(), **kw) as it:
        take(it, 3)
        state = it.state()
        after = take(it, 5)
        it.restore(state)
        assert all(np.array_equal(a["id"], b["id"]) for a, b in zip(after, take(it, 5)))


def test_prefetch_and_transform_yield_the_same_sequence_and_close_cleanly():
    kw = {"global_batch_size": B, "seed": 1, "last_batch": "pad"}
    with DataIterator(arrays(), prefetch=0, **kw) as it:
        plain = take(it, 30)
    before = {t.ident for t in threading.enumerate()}
    it = DataIterator(
        arrays(),
        prefetch=4,
        num_threads=3,
        transform=lambda b: {k: v * 10 for k, v in b.items()},
        transform_prefetch=2,
        **kw,
    )
    got = take(it, 30)
    assert any(t.ident not in before for t in threading.enumerate())  # really read ahead
    assert it.state()["epoch"] == 30 // it.steps_per_epoch
    it.close()
    it.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        next(it)
    for a, b in zip(plain, got):
        assert all(np.array_equal(a[k] * 10, b[k]) for k in a)
    deadline = time.monotonic() + 10  # threads finish their current item, then exit
    while any(t.ident not in before for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.ident not in before]


def test_own_weights_are_kept_and_zeroed_on_padding():
    data = {**arrays(), "weights": np.linspace(0.5, 1.5, N).astype(np.float32)}
    with DataIterator(data, global_batch_size=B, seed=0, last_batch="pad", shuffle=False) as it:
        last = take(it, 7)[-1]
    real = N - 6 * B
    assert np.array_equal(last["weights"][:real], data["weights"][6 * B :])
    assert not last["weights"][real:].any()


def test_changed_setup_is_refused_on_restore():
    with DataIterator(arrays(), global_batch_size=B, seed=3) as it:
        take(it, 3)
        state = it.state()
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size: 16 in the checkpoint, 32"):
        DataIterator.from_state(arrays(), state, global_batch_size=32)
    with pytest.raises(ConfigError, match=r"training split's size.*103 in the checkpoint, 90 now"):
        DataIterator.from_state(arrays(90), state)
    with pytest.raises(ConfigError, match=r"config\.data\.last_batch"):
        DataIterator.from_state(arrays(), state, last_batch="pad")
    with pytest.raises(ConfigError, match="version"):
        DataIterator.from_state(arrays(), {**state, "version": 0})
    with pytest.raises(ConfigError, match="position 99"):
        DataIterator.from_state(arrays(), {**state, "position": 99})
    with pytest.raises(ConfigError, match=r"config\.data\.last_batch: 'tail'"):
        Sampler(N, B, 0, "tail")
    with pytest.raises(ConfigError, match="does not split evenly over 3 hosts"):
        Sampler(N, B, 0, process_count=3)
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size: 200 is larger"):
        Sampler(N, 200, 0)
    with pytest.raises(ValueError, match="first dimension"):
        DataIterator({"a": np.zeros(4), "b": np.zeros(5)}, global_batch_size=2, seed=0)


def _python(script, env_extra, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


FAKE_DEVICES = """
    import functools, jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ftlab.data.pipeline import DataIterator, batch_sharding, global_batch
    assert jax.device_count() == 4, jax.devices()
    data = {"id": np.arange(50), "x": np.arange(150, dtype=np.float32).reshape(50, 3)}
    for shape, names in [((4,), ("data",)), ((2, 2), ("data", "model"))]:
        sharding = batch_sharding(jax.make_mesh(shape, names))
        kw = dict(global_batch_size=8, seed=4, last_batch="pad")
        with DataIterator(data, **kw) as host, DataIterator(
            data, transform=functools.partial(global_batch, sharding=sharding), **kw
        ) as dev:
            for _ in range(9):
                want, got = next(host), next(dev)
                for k in want:
                    assert isinstance(got[k], jax.Array) and got[k].sharding == sharding
                    assert np.array_equal(np.asarray(got[k]), want[k]), k
                    per = 8 // shape[0]
                    for shard in got[k].addressable_shards:
                        rows = shard.index[0]
                        assert rows.stop - rows.start == per, rows
                        assert np.array_equal(np.asarray(shard.data), want[k][rows])
    print("ok")
"""


def test_global_batch_on_a_mesh_of_four_fake_cpu_devices():
    proc = _python(FAKE_DEVICES, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0 and out.strip().endswith("ok"), err[-3000:]


TWO_HOSTS = """
    import json, os, sys, functools
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
    import jax.numpy as jnp, numpy as np
    from ftlab.data.pipeline import DataIterator, batch_sharding, global_batch
    sharding = batch_sharding(jax.make_mesh((4,), ("data",)))
    x = np.arange(50, dtype=np.float32)
    total = jax.jit(lambda a, w: jnp.sum(a * w))
    out = []
    with DataIterator({"x": x}, global_batch_size=8, seed=1, last_batch="pad",
                      transform=functools.partial(global_batch, sharding=sharding)) as it:
        for _ in range(8):
            b = next(it)
            out.append({
                "local": [int(jax.process_index()), int(jax.process_count())],
                "shards": [[s.index[0].start, np.asarray(s.data).tolist()] for s in b["x"].addressable_shards],
                "sum": float(total(b["x"], b["weights"])),
            })
    print(json.dumps(out))
"""


def test_two_real_processes_assemble_one_global_batch():
    """Two jax processes (2 CPU devices each): each reads only its half of every global batch,
    and a jitted sum over the global array sees both halves."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [_python(TWO_HOSTS, env, str(i), port) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    x, steps = np.arange(50, dtype=np.float32), 7  # ceil(50 / 8) batches per epoch
    for step in range(8):
        epoch, i = divmod(step, steps)
        order = np.random.default_rng([1, epoch]).permutation(50)
        index = np.concatenate([order, order])[i * 8 : (i + 1) * 8]
        weights = (np.arange(i * 8, (i + 1) * 8) < 50).astype(np.float32)
        rows = {}
        for host, r in enumerate(results):
            assert r[step]["local"] == [host, 2]
            for start, values in r[step]["shards"]:
                assert 4 * host <= start < 4 * host + 4  # host h holds rows 4h..4h+3
                rows[start] = values
            assert r[step]["sum"] == pytest.approx(float((x[index] * weights).sum()))
        assert np.array_equal(np.concatenate([rows[k] for k in sorted(rows)]), x[index])
