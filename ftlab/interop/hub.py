"""The Hugging Face Hub and local model directories: resolve a hub id or a path, read
``config.json``, and tell fast when the Hub cannot be reached.

Used by data (datasets and tokenizers by hub name) and by the model families alike, so it
imports no model code.
"""

from __future__ import annotations

import functools
import json
import os
import re
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from ftlab.interop.errors import HFImportError, HubOfflineError

__all__ = [
    "HFImportError",
    "HubOfflineError",
    "hub_offline",
    "hub_unreachable",
    "looks_like_hub_id",
    "read_config",
    "resolve",
]

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_HUB_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json")
_PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def hub_offline(*also: str) -> bool:
    """Whether Hub access is off now: ``HF_HUB_OFFLINE`` or any of ``also``
    (``HF_DATASETS_OFFLINE``, ``TRANSFORMERS_OFFLINE``), read at call time because
    huggingface_hub reads its variable only when imported, or the Hub unreachable from this
    machine (``hub_unreachable``: a connection attempt of at most 3 s, once per process)."""
    truthy = {"1", "on", "yes", "true"}
    for var in ("HF_HUB_OFFLINE", *also):
        if os.environ.get(var, "").strip().lower() in truthy:
            return True
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - transformers depends on it
        return True
    return hub_unreachable() is not None  # no network: say so now, not after retries


_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> str | None:
    parsed = urllib.parse.urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    result: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer from {host}:{port} within {timeout:.0f} s"


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (a TCP connection to its endpoint,
    at most ``timeout`` seconds, once per process), or None when it answers or a proxy is
    configured (then the download itself finds out). Without it a download offline retries
    for half a minute before failing."""
    if any(os.environ.get(var) for var in _PROXIES):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return _probe(endpoint, timeout)


def looks_like_hub_id(name: str) -> bool:
    """``gpt2`` or ``owner/name`` (not a path such as ``./x``, ``/x``, ``~/x`` or ``a/b/c``)."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """A local model directory: ``name_or_path`` itself, or a hub snapshot downloaded now."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HFImportError(
            f"{text!r} is a file; pass the model directory that holds config.json and the weights"
        )
    if not looks_like_hub_id(text):
        raise HFImportError(f"model directory {text!r} does not exist")
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - transformers depends on it
        raise HFImportError(
            f"{text!r} is not a local directory and huggingface_hub is not installed to "
            "download it; pass the path of a local model directory"
        ) from None
    patterns = list(_HUB_PATTERNS) + (list(_PICKLE_PATTERNS) if allow_pickle else [])
    try:
        local = huggingface_hub.snapshot_download(  # unreachable: the local cache only
            text,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=hub_offline(),
        )
    except Exception as e:  # network failures come as OSError, httpx errors, hub errors...
        if type(e).__name__ in (
            "RepositoryNotFoundError",
            "GatedRepoError",
            "RevisionNotFoundError",
        ):
            raise HFImportError(
                f"{text!r} is not a local directory and the Hugging Face Hub answered "
                f"{type(e).__name__}: {e}"
            ) from e
        unreachable = hub_unreachable()
        raise HubOfflineError(
            f"{text!r} is not a local directory, so it was taken as a Hugging Face Hub id, but the "
            f"download failed ({type(e).__name__}: {e}). This machine looks offline ("
            + (f"huggingface.co unreachable: {unreachable}" if unreachable else "no route to it")
            + "). Download the model on a machine with network access, e.g. "
            f"`huggingface-cli download {text} --local-dir DIR` or "
            "`AutoModel.from_pretrained(...).save_pretrained(DIR, safe_serialization=True)`, "
            "copy DIR here, and pass its path (a directory holding config.json and "
            "model.safetensors) instead of the hub id."
        ) from e
    return Path(local)


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{str(directory)!r} has no config.json (is it a model directory?)")
    with open(path) as f:
        return json.load(f)
