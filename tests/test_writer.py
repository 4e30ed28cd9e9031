"""Tests for ftlab.train.writer (JSONL + TensorBoard metric logging)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from ftlab.train.writer import MetricWriter, read_metrics


def _tb_scalars(tb_dir) -> list[tuple[int, str, float]]:
    """Parse TFRecord-framed event files: (step, tag, value) for every scalar."""
    out = []
    for path in sorted(tb_dir.glob("events.out.tfevents*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value))
    return out


def test_writer_roundtrip_and_tensorboard(tmp_path):
    workdir = tmp_path / "run"
    writer = MetricWriter(workdir)
    writer.write(10, {"train/loss": np.float32(0.5), "train/lr": 1e-3})
    # JSONL is flushed on every write, so it is readable before close().
    assert read_metrics(workdir / "metrics.jsonl") == [
        {"step": 10, "train/loss": 0.5, "train/lr": 1e-3}
    ]
    writer.write(np.int64(20), {"val/loss": 0.25, "val/accuracy": np.float64(0.875)})
    writer.close()
    writer.close()  # idempotent

    expected = [
        {"step": 10, "train/loss": 0.5, "train/lr": 1e-3},
        {"step": 20, "val/loss": 0.25, "val/accuracy": 0.875},
    ]
    records = read_metrics(workdir / "metrics.jsonl")
    assert records == expected
    assert all(type(r["step"]) is int for r in records)

    event_files = list((workdir / "tb").glob("events.out.tfevents*"))
    assert event_files and all(f.stat().st_size > 0 for f in event_files)
    got = _tb_scalars(workdir / "tb")
    assert sorted(got) == sorted(
        [
            (10, "train/loss", pytest.approx(0.5)),
            (10, "train/lr", pytest.approx(1e-3)),
            (20, "val/loss", pytest.approx(0.25)),
            (20, "val/accuracy", pytest.approx(0.875)),
        ],
        key=lambda t: (t[0], t[1]),
    )


def test_writer_appends_on_reopen(tmp_path):
    with MetricWriter(tmp_path) as w:
        w.write(1, {"train/loss": 1.0})
    with MetricWriter(tmp_path) as w:
        w.write(2, {"train/loss": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 1, "train/loss": 1.0},
        {"step": 2, "train/loss": 0.5},
    ]


def test_writer_recovers_from_truncated_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')
    with MetricWriter(tmp_path) as w:
        w.write(3, {"train/loss": 0.25})
    with pytest.warns(UserWarning, match="malformed"):
        records = read_metrics(path)
    assert records == [{"step": 1, "train/loss": 1.0}, {"step": 3, "train/loss": 0.25}]


def test_writer_rejects_step_key_and_write_after_close(tmp_path):
    w = MetricWriter(tmp_path)
    with pytest.raises(ValueError, match="step"):
        w.write(1, {"step": 5.0})
    w.close()
    with pytest.raises(RuntimeError, match="close"):
        w.write(2, {"train/loss": 1.0})


def test_disabled_writer_creates_nothing(tmp_path):
    workdir = tmp_path / "run"
    w = MetricWriter(workdir, enabled=False)
    w.write(1, {"train/loss": 1.0})
    w.flush()
    w.close()
    assert not workdir.exists()
    # An existing workdir stays untouched too.
    with MetricWriter(tmp_path, enabled=False) as w:
        w.write(1, {"train/loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_resuming_drops_records_past_the_checkpoint(tmp_path):
    with MetricWriter(tmp_path) as w:
        for step in range(1, 11):
            w.write(step, {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # the previous run died mid-line
    with MetricWriter(tmp_path, resume_from=7) as w:  # its last checkpoint was step 7
        w.write(8, {"train/loss": 80.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert records[-1]["train/loss"] == 80.0
