"""The training loop on a device mesh and across processes, against the single-device run.

The same command (``ftlab train configs/gpt2_e2e.py:lora,runlocal``: a 2-block GPT-2 with LoRA
on real data files) runs (a) here on one CPU device, (b) on 8 fake CPU devices with
fsdp=2 x tensor=2 x data=2, (c) as two processes of 2 devices each joined by
``jax.distributed`` (gloo collectives), with data=2 x fsdp=2 split across the processes, first
uninterrupted and then resumed from a checkpoint taken half-way. Final parameters and losses
must match the single-device run (fp32; sharded reductions change the summation order, so
1e-5 relative on losses and 1e-5 absolute on parameters).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from ftlab import checkpoint, tree
from ftlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT / 'configs' / 'gpt2_e2e.py'}:lora,runlocal"
COMMON = [
    "--config.eval.generate_examples=0",
    "--config.train.num_steps=6",
    "--config.checkpoint.every_steps=3",
    "--config.checkpoint.keep=5",
    "--config.checkpoint.async_save=False",
    "--config.method.lora.dropout=0.0",
]


def _env(devices: int, **extra: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _ftlab(workdir: Path, env: dict, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ftlab", "train", CONFIG, "--workdir", str(workdir)]
    return subprocess.Popen(
        [*cmd, *COMMON, *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(*procs: subprocess.Popen) -> list[str]:
    logs = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        logs.append(err)
    return logs


def _params(workdir: Path) -> dict:
    return {
        k: np.asarray(v)
        for k, v in tree.flatten(checkpoint.load_pytree(workdir / "params")).items()
    }


def _summary(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def _assert_same_run(got: Path, want: Path) -> None:
    a, b = _summary(got), _summary(want)
    assert a["steps"] == b["steps"] == 6
    np.testing.assert_allclose(a["val"]["loss"], b["val"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["test"]["loss"], b["test"]["loss"], rtol=1e-5)
    pa, pb = _params(got), _params(want)
    assert pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_allclose(pa[path], pb[path], atol=1e-5, rtol=0, err_msg=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_mesh_and_two_process_runs_match_the_single_device_run(tmp_path):
    single = tmp_path / "single"
    port = _free_port()
    two = tmp_path / "two_process"
    # Start the sharded and multi-process runs, then the single-device one here meanwhile.
    mesh8 = _ftlab(
        tmp_path / "mesh8",
        _env(8),
        "--config.mesh.shape.fsdp=2",
        "--config.mesh.shape.tensor=2",
        "--config.mesh.shape.data=2",
        "--config.checkpoint.every_steps=6",
    )
    peers = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}
    hosts = [
        _ftlab(two, _env(2, JAX_PROCESS_ID=str(i), **peers), "--config.mesh.shape.fsdp=2")
        for i in range(2)
    ]
    assert main(["train", CONFIG, "--workdir", str(single), *COMMON]) == 0
    logs = _finish(mesh8, *hosts)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices" in logs[0]
    assert "process 1 of 2" in logs[2] and "over 4 devices" in logs[2]
    _assert_same_run(tmp_path / "mesh8", single)
    _assert_same_run(two, single)

    # Resume: drop everything after the step-3 checkpoint and run the same command again.
    final = _params(two)
    shutil.rmtree(two / "params")
    (two / "summary.json").unlink()
    for step_dir in (two / "checkpoints" / "last").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 3:
            shutil.rmtree(step_dir)
    peers["JAX_COORDINATOR_ADDRESS"] = f"localhost:{_free_port()}"
    hosts = [
        _ftlab(two, _env(2, JAX_PROCESS_ID=str(i), **peers), "--config.mesh.shape.fsdp=2")
        for i in range(2)
    ]
    logs = _finish(*hosts)
    assert "resumed from" in logs[0] and "at step 3" in logs[0]
    resumed = _params(two)
    for path, value in final.items():
        np.testing.assert_array_equal(resumed[path], value, err_msg=path)
    _assert_same_run(two, single)
