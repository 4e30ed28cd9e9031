"""Metric logging to a JSON-lines file (for plots/reports) and TensorBoard.

The JSONL file is opened in append mode so a resumed run continues the same
history (records past the checkpoint it resumes from are dropped first); only process 0 of a multi-host run should write, so a disabled writer
is a complete no-op that creates nothing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # typing.Self is 3.11+; only needed by type checkers
    from typing import Self

__all__ = ["MetricWriter", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricWriter:
    """Writes ``{"step": step, **metrics}`` lines to workdir/metrics.jsonl and TensorBoard."""

    def __init__(
        self, workdir: str | Path, enabled: bool = True, resume_from: int | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.path = self.workdir / METRICS_FILE
        self._file: Any = None
        self._tb: Any = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # lazy: disabled writers need nothing

        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and self.path.exists():
            self._drop_after(resume_from)
        # If a previous run died mid-line, start on a fresh line so the
        # truncated record doesn't corrupt the first new one.
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, 2)
                needs_newline = f.read(1) != b"\n"
        # Long-lived handle owned by the writer; closed in close().
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        if needs_newline:
            self._file.write("\n")
            self._file.flush()
        self._tb = SummaryWriter(str(self.workdir / TB_DIR))

    def _drop_after(self, step: int) -> None:
        """Forget records past ``step``: a resumed run repeats those steps from its checkpoint,
        and the history should hold each step once."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short when the previous run died
        self.path.write_text("".join(kept), encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSONL record (flushed immediately) and one TB scalar per key."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricWriter.write called after close()")
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key")
        step = int(step)
        values = {str(k): float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Push pending TensorBoard events to disk (JSONL is flushed on every write)."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Close both sinks; safe to call more than once."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl file back as a list of records, in file order.

    Blank lines are ignored; a malformed line (e.g. truncated by a crash) is
    skipped with a warning rather than making the whole history unreadable.
    """
    records: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: skipping malformed metrics line", stacklevel=2)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
