"""Reliability (issue 12): corrupt checkpoints set aside, failed saves stop the run, SIGTERM
saves and exits, bad inputs exit 2 with one line and an untouched workdir."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ftlab.checkpoint import MANIFEST, CheckpointCorruptError, Checkpoints
from tests.conftest import tiny_config
from tests.test_checkpoint import _assert_identical, _fresh_target, _make_state

ROOT = Path(__file__).resolve().parents[1]


def _biggest_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {"truncated": _truncate, "deleted": Path.unlink, "flipped_byte": _flip_byte}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_newest_step_is_set_aside_and_the_previous_one_restored(tmp_path, how, caplog):
    states = {1: _make_state(1), 2: _make_state(2)}
    with Checkpoints(tmp_path, save_every=1) as ckpts:  # async saves, sealed when committed
        for step, state in states.items():
            ckpts.save(step, state, {"step": step})
    last = tmp_path / "last"
    assert all((last / str(s) / MANIFEST).exists() for s in states)
    CORRUPTIONS[how](_biggest_file(last / "2"))
    with caplog.at_level(logging.WARNING), Checkpoints(tmp_path, save_every=1) as ckpts:
        assert ckpts.latest_step() == 2
        restored, meta = ckpts.restore(_fresh_target())
        assert meta == {"step": 1} and ckpts.all_steps() == [1]
    _assert_identical(restored, states[1])
    aside = [p.name for p in last.iterdir() if p.name.startswith("2.corrupt-")]
    assert len(aside) == 1, list(last.iterdir())  # renamed, not deleted
    assert f"{last / '2'} is corrupt" in caplog.text and aside[0] in caplog.text


def test_no_intact_step_left_is_an_error_and_deletes_nothing(tmp_path):
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpts:
        ckpts.save(1, _make_state(1), {})
    _flip_byte(_biggest_file(tmp_path / "last" / "1"))
    no_intact = pytest.raises(CheckpointCorruptError, match="no intact checkpoint")
    with Checkpoints(tmp_path, save_every=1) as ckpts, no_intact:
        ckpts.restore(_fresh_target())
    assert [p.name.split(".")[0] for p in (tmp_path / "last").iterdir()] == ["1"]


# -- the CLI: bad inputs exit 2 with one line, the workdir untouched ---------------------------

E2E = str(ROOT / "configs" / "gpt2_e2e.py") + ":lora,runlocal"
TINY_GPT2 = {  # the runlocal model's shapes, as a Hugging Face config
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 512,
    "n_positions": 128,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
}


def _config_file(tmp_path: Path, **overrides) -> str:
    """A config file of ``tiny_config(**overrides)`` (tests/conftest.py) for the CLI."""
    path = tmp_path / "tiny_cfg.py"
    path.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n"
        "from tests.conftest import tiny_config\n\n\n"
        f"def get_config():\n    return tiny_config(**{overrides!r})\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Hugging Face GPT-2 directories of the runlocal shapes: intact, missing a tensor,
    truncated, and with only a pytorch_model.bin."""
    import jax.numpy as jnp
    from safetensors.numpy import load_file, save_file

    from ftlab.interop.family import get_family
    from ftlab.interop.pretrained import build, export_hf

    root = tmp_path_factory.mktemp("hf")
    family = get_family("gpt2")
    model = build(family, dict(TINY_GPT2), head="lm", options={"dtype": jnp.float32})
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    good = export_hf(root / "good", jax.tree.map(np.asarray, params), dict(TINY_GPT2))
    dirs = {"good": good}
    for name in ("missing", "truncated", "bin_only"):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text((good / "config.json").read_text())
        dirs[name] = d
    tensors = load_file(good / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "ln_f" not in k}, dirs["missing"] / "model.safetensors"
    )
    data = (good / "model.safetensors").read_bytes()
    (dirs["truncated"] / "model.safetensors").write_bytes(data[: len(data) * 2 // 3])
    (dirs["bin_only"] / "pytorch_model.bin").write_bytes(b"not read")
    return dirs


def _npz_all_missing(tmp_path: Path) -> str:
    inputs = np.full((60, 6), np.nan, np.float32)
    np.savez(tmp_path / "data.npz", inputs=inputs, labels=np.arange(60) % 2)
    return str(tmp_path / "data.npz")


BAD_INPUTS = {  # name: (argv after the workdir, with {hf} / {npz} / {tiny}, words the line names)
    "data rejected by cleaning": (
        ["{tiny_npz}"],
        ["removed every row", "config.data.clean"],
    ),
    "checkpoint missing a tensor": (
        [E2E, "--config.model.pretrained={missing}"],
        ["config.model.pretrained", "lacks", "ln_f"],
    ),
    "checkpoint tensor of the wrong shape": (
        [E2E, "--config.model.pretrained=" + str(ROOT / "tests" / "fixtures" / "tiny_gpt2")],
        ["config.model.pretrained", "wpe", "(16, 32)", "(128, 32)"],
    ),
    "pytorch_model.bin only": (
        [E2E, "--config.model.pretrained={bin_only}"],
        ["pytorch_model.bin", "safetensors", "config.model.pretrained"],
    ),
    "truncated safetensors": (
        [E2E, "--config.model.pretrained={truncated}"],
        ["model.safetensors", "truncated"],
    ),
    "tokenizer larger than the embedding": (
        [E2E, "--config.model.hf_config.vocab_size=300"],
        ["512 tokens", "300 rows", "config.model.hf_config.vocab_size", "config.data.tokenizer"],
    ),
    "warm-up longer than the run": (
        ["{tiny}", "--config.optim.warmup_steps=50"],
        ["config.optim.warmup_steps", "50", "20 steps"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_exit_2_with_one_line_and_an_untouched_workdir(
    case, tmp_path, hf_dirs, capsys, monkeypatch
):
    from ftlab.cli import main

    monkeypatch.chdir(tmp_path)
    argv, words = BAD_INPUTS[case]
    names = {k: str(v) for k, v in hf_dirs.items()}
    names["tiny"] = _config_file(tmp_path)
    if "{tiny_npz}" in argv:
        npz = _npz_all_missing(tmp_path)
        overrides = {
            "data.source": "npz",
            "data.path": npz,
            "data.classes": (),
            "model.name": "mlp",
        }
        names["tiny_npz"] = _config_file(tmp_path, **overrides)
    argv = [a.format(**names) for a in argv]
    workdir = tmp_path / "run"
    code = main(["train", *argv, "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) >= 1 and err[-1].startswith("ftlab: "), err
    assert "Traceback" not in "\n".join(err)
    for word in words:
        assert word in err[-1], (word, err[-1])
    assert not workdir.exists()  # nothing written


def test_a_read_only_workdir_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import time

    from ftlab import cli
    from ftlab.train import loop

    def no_build(*a, **k):
        raise AssertionError("loaded or compiled before checking the workdir")

    monkeypatch.setattr(loop, "build", no_build)
    start = time.perf_counter()
    code = cli.main(["train", _config_file(tmp_path), "--workdir", "/proc/ftlab_run"])
    assert code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ftlab: ") and "/proc/ftlab_run" in err[-1] and "writ" in err[-1]


def test_a_failed_save_stops_the_run_in_one_line_keeping_the_last_good_checkpoint(
    tmp_path, capsys, caplog, monkeypatch
):
    import errno

    from etils import epath

    from ftlab.cli import main

    gpath = type(epath.Path("/"))
    write_text = gpath.write_text

    def disk_full_from_step_10(self, *args, **kwargs):  # Orbax writes its metadata this way
        parts = Path(os.fspath(self)).parts
        if "last" in parts and parts[parts.index("last") + 1].split(".")[0] not in ("5",):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(gpath, "write_text", disk_full_from_step_10)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = main(["train", _config_file(tmp_path), "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("ftlab: checkpoint save failed: saving the checkpoint ")
    assert f"{workdir / 'checkpoints' / 'last' / '10'}" in err[-1] and "No space left" in err[-1]
    assert "kept: [5]" in err[-1]
    assert not [r for r in caplog.records if r.exc_info]  # no background tracebacks
    steps = [r["step"] for r in _read_jsonl(workdir / "metrics.jsonl") if "train/loss" in r]
    assert max(steps) <= 15  # stopped at the first check after the failed save
    assert not (workdir / "summary.json").exists()
    monkeypatch.undo()
    with Checkpoints(workdir / "checkpoints", save_every=5) as ckpts:
        assert ckpts.all_steps() == [5]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


DRIVER = """
import sys, time
from ftlab.data import pipeline
next_batch = pipeline.DataIterator.__next__
def slow(self):  # a step every ~50 ms: time to be preempted mid-run
    time.sleep(0.05)
    return next_batch(self)
pipeline.DataIterator.__next__ = slow
from ftlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_saves_exits_143_and_the_rerun_ends_bit_identical(tmp_path):
    import re
    import time

    from ftlab.train.loop import train
    from tests.test_train import final_state

    overrides = {"model.dropout": 0.2, "train.num_steps": 40, "checkpoint.every_steps": 5}
    cfg = tiny_config(**overrides)
    train(cfg, tmp_path / "straight")
    (tmp_path / "driver.py").write_text(DRIVER)
    workdir = tmp_path / "preempted"
    argv = ["train", _config_file(tmp_path, **overrides), "--workdir", str(workdir)]
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (workdir / "checkpoints" / "last" / "10").exists():  # mid-run, a save behind it
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    waited = time.time() - sent
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    saved = int(re.fullmatch(r"ftlab: SIGTERM \(checkpoint saved at step (\d+)\)", last)[1])
    assert 10 <= saved < 40 and waited < 30, (saved, waited)
    with Checkpoints(workdir / "checkpoints", save_every=5) as ckpts:
        assert ckpts.latest_step() == saved  # the save in flight and the final one committed
    assert (workdir / "checkpoints" / "last" / str(saved) / MANIFEST).exists()
    train(cfg, workdir)  # the rerun resumes from it
    a, _, _ = final_state(tmp_path / "straight", cfg)
    b, _, _ = final_state(workdir, cfg)
    assert int(a.step) == int(b.step) == 40
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    print(f"SIGTERM: saved step {saved}, exited {waited:.2f} s after the signal")


def test_an_unreachable_hub_is_found_in_seconds(monkeypatch):
    import socket
    import time

    from ftlab.interop import hub

    def hangs(*args, **kwargs):  # a network that drops packets: no answer, no error
        time.sleep(5)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    hub._probe.cache_clear()
    start = time.perf_counter()
    why = hub._probe("https://huggingface.co", 0.5)
    assert time.perf_counter() - start < 1.5 and "no answer from huggingface.co:443" in why
    hub._probe.cache_clear()
    monkeypatch.setattr(hub, "hub_unreachable", lambda: why)
    start = time.perf_counter()
    with pytest.raises(hub.HubOfflineError, match="unreachable: no answer"):
        hub.resolve("gpt2")  # the local cache only: no retries
    assert time.perf_counter() - start < 3


def test_a_url_workdir_etils_cannot_open_is_refused(tmp_path, capsys):
    """gs:// workdirs are staged (tests/test_remote_workdir.py); an unknown scheme is an error
    before anything is loaded."""
    from ftlab.cli import main

    code = main(["train", _config_file(tmp_path), "--workdir", "nosuch://bucket/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "etils.epath cannot open" in err[-1]
    assert not (tmp_path / "nosuch:").exists()


def test_several_hosts_stop_at_the_same_step(monkeypatch):
    """Only one worker got the signal: at the next shared check every process sees it."""
    from jax.experimental import multihost_utils

    from ftlab.train import loop

    gathered = []

    def allgather(flag):  # this process's flag and another's that saw SIGTERM
        gathered.append(int(flag))
        return np.array([int(flag), int(signal.SIGTERM)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    interrupt = loop._Interrupt()
    assert [interrupt.agreed(step, every=5) for step in (3, 4)] == [None, None]  # no collective
    assert interrupt.agreed(5, every=5) == signal.SIGTERM and gathered == [0]
