"""A run's workdir on a remote store (``gs://bucket/run``, any ``etils.epath`` URL): staged.

The run writes its small files (config.json, log.txt, metrics.jsonl, TensorBoard, plots,
reports, summary.json, exports) with local file APIs, so a remote workdir is mirrored in a
local stage, ``$FTLAB_STAGE_DIR`` or ``$TMPDIR/ftlab-stage``, in
``<sha256 of the URL>-<process>/<the URL's last name>``.
At the start the stage is emptied and the remote's files are pulled into it (all but
``DIRECT`` and ``tb/`` of the workdir and of every run directory below it: an experiment's
runs are staged with it, see ``Workdir.child``); Orbax checkpoints and the final ``params``/``model_state`` are
written to the remote directly (``ftlab.checkpoint`` goes through ``etils.epath``); at each
checkpoint, at the end and when the run stops on an error or an interruption, the stage's
new or changed files are pushed (process 0). The remote is the run's only copy: a stage may
be deleted at any time between runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax

from ftlab.config import ConfigError

log = logging.getLogger("ftlab")

DIRECT = ("checkpoints", "params", "model_state")  # written to the remote, never staged
NOT_PULLED = (*DIRECT, "tb")  # TensorBoard event files: appended as new files, never read


def is_remote(workdir) -> bool:
    """A URL (``scheme://...``) rather than a local (or mounted) path."""
    return "://" in os.fspath(workdir)


def remote_path(url: str):
    """``url`` as an ``etils.epath.Path``; a scheme etils cannot open is a ``ConfigError``."""
    from etils import epath

    try:
        return epath.Path(url.rstrip("/"))
    except (KeyError, ValueError, ImportError) as e:
        raise ConfigError(
            f"--workdir {url}: etils.epath cannot open this kind of URL ({type(e).__name__}: "
            f"{e}); use gs://BUCKET/PATH, or a local or mounted path"
        ) from None


def as_path(location):
    """A local ``Path``, or an ``etils.epath.Path`` for a URL: what file APIs are used on."""
    return remote_path(os.fspath(location)) if is_remote(location) else Path(location)


def stage_root() -> Path:
    return Path(os.environ.get("FTLAB_STAGE_DIR") or Path(tempfile.gettempdir()) / "ftlab-stage")


@dataclasses.dataclass
class Workdir:
    """Where a run writes: ``local`` (its own files), ``store`` (checkpoints and params: the
    remote itself, or ``local`` for a local workdir), ``sync`` (push the stage; a no-op
    locally) and ``url`` (a remote workdir's URL, else None)."""

    local: Path
    store: object  # Path | epath.Path
    sync: Callable[[], None]
    url: str | None = None

    def child(self, rel: str | Path) -> Workdir:
        """The workdir ``rel`` below this one (an experiment's run), sharing its stage: the
        parent's pull brought its files, the parent's ``sync`` pushes them."""
        rel = Path(rel).as_posix()
        url = None if self.url is None else f"{self.url}/{rel}"
        return Workdir(self.local / rel, self.store / rel, self.sync, url)


class Stage:
    """The local mirror of one remote workdir (see the module's docstring)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.remote = remote_path(self.url)
        key = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        # the remote's own name last: reports and plots are titled with the workdir's name
        self.local = stage_root() / f"{key}-{jax.process_index()}" / (self.remote.name or "run")
        self._pushed: dict[str, tuple[int, int]] = {}

    def _files(self) -> dict[str, tuple[int, int]]:
        out = {}
        for p in self.local.rglob("*"):
            if p.is_file():
                st = p.stat()
                out[p.relative_to(self.local).as_posix()] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self) -> None:
        """Empty the stage and copy the remote's files into it (not ``NOT_PULLED``)."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        if self.remote.exists():
            self._pull_dir(self.remote, self.local, top=True)
        self._pushed = self._files()

    def _pull_dir(self, src, dst: Path, top: bool = False) -> None:
        run_dir = top or (src / "config.json").exists()  # an experiment's run, staged with it
        for p in src.iterdir():
            if run_dir and p.name in NOT_PULLED:
                continue
            if p.is_dir():
                (dst / p.name).mkdir(exist_ok=True)
                self._pull_dir(p, dst / p.name)
            else:
                with p.open("rb") as f, open(dst / p.name, "wb") as g:
                    shutil.copyfileobj(f, g, 1 << 24)

    def push(self) -> None:
        """Copy the stage's new and changed files to the remote (process 0, which writes them)."""
        if jax.process_index() != 0:
            return
        now = self._files()
        for rel, sig in sorted(now.items()):
            if self._pushed.get(rel) == sig:
                continue
            target = self.remote / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(self.local / rel, "rb") as f, target.open("wb") as g:
                shutil.copyfileobj(f, g, 1 << 24)
            self._pushed[rel] = sig


@contextlib.contextmanager
def opened(workdir) -> Iterator[Workdir]:
    """A ``Workdir`` for ``workdir``; a remote one is staged (pulled now, pushed on leaving,
    also on an error or an interruption; the stage is left for inspection). A ``Workdir``
    (an experiment's run, ``Workdir.child``) is used as it is: its parent stages it."""
    if isinstance(workdir, Workdir):
        yield workdir
        return
    if not is_remote(workdir):
        path = Path(workdir)
        yield Workdir(path, path, lambda: None)
        return
    stage = Stage(os.fspath(workdir))
    stage.pull()
    try:
        yield Workdir(stage.local, stage.remote, stage.push, stage.url)
    except BaseException:
        try:
            stage.push()
        except Exception as e:  # noqa: BLE001 (the run's own error is the one to report)
            log.warning("could not copy %s to %s: %s", stage.local, stage.url, e)
        raise
    stage.push()
    log.info("%s: run files copied from the stage %s", stage.url, stage.local)
