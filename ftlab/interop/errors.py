"""The interop errors; the CLI maps each to exit code 2 with its one-line message."""

from __future__ import annotations


class HFImportError(ValueError):
    """A checkpoint that cannot be imported; the message names the file or tensor."""


class HubOfflineError(HFImportError):
    """A hub id was given but the Hugging Face Hub cannot be reached from this machine."""


class HFExportError(ValueError):
    """Parameters or a target directory that cannot be exported; the message names the cause."""


class PeftAdapterError(ValueError):
    """An adapter that cannot be written or read; the message names the key, tensor or path."""
