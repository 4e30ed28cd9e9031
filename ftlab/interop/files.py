"""Checkpoint files: the safetensors of a model directory (single or sharded), read one tensor
at a time, and written back; a pickled ``pytorch_model.bin`` is refused unless asked for (and
then needs torch), because unpickling can run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ftlab.interop.errors import HFImportError


def _shards(directory: Path, index_name: str, single: str) -> list[Path] | None:
    index = directory / index_name
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise HFImportError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
        return [directory / name for name in files]
    if (directory / single).is_file():
        return [directory / single]
    return None


def weight_files(directory: str | os.PathLike, *, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a model directory (or, with ``allow_pickle``, the .bin files)."""
    directory = Path(directory)
    files = _shards(directory, "model.safetensors.index.json", "model.safetensors")
    if files:
        return files
    pickled = _shards(directory, "pytorch_model.bin.index.json", "pytorch_model.bin")
    if pickled:
        if not allow_pickle:
            raise HFImportError(
                f"{str(directory)!r} has only pytorch_model.bin (a pickle, which can run code when "
                "loaded) and no model.safetensors. Convert it to safetensors where torch is "
                "installed (`from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)`), "
                "and set config.model.pretrained to that directory (ftlab's training never unpickles "
                "weights; from Python, load_pretrained(..., allow_pickle=True) reads a file you trust)."
            )
        return pickled
    raise HFImportError(
        f"{str(directory)!r} has no weights: expected model.safetensors, "
        "model.safetensors.index.json (sharded) or pytorch_model.bin"
    )


def iter_tensors(
    directory: str | os.PathLike, *, allow_pickle: bool = False
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) for every tensor of a model directory, one at a time."""
    return read_files(weight_files(directory, allow_pickle=allow_pickle))


def read_files(files: Sequence[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(file), framework="numpy") as f:
                    names = f.keys()  # a safe_open handle is not iterable
                    for name in names:
                        yield name, f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 (safetensors' SafetensorError, OSError)
                raise HFImportError(
                    f"{str(file)!r} cannot be read as safetensors ({type(e).__name__}: {e}); "
                    "the file is truncated or damaged: download or export it again"
                ) from None
        else:
            yield from _torch_tensors(file)


def _torch_tensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise HFImportError(
            f"{str(file)!r} is a PyTorch pickle; reading it needs torch, which is not installed "
            "(install torch, or convert the checkpoint to safetensors elsewhere)"
        ) from None
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    for name, value in state.items():
        value = value.detach()
        if value.dtype == torch.bfloat16:
            value = value.float()
        yield name, value.numpy()


def tensor_names(files: Sequence[Path]) -> list[str]:
    """The tensor names of safetensors ``files`` without reading any tensor (a family can tell
    from them how the model is configured, e.g. whether BERT has its pooler)."""
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        if file.suffix != ".safetensors":
            return []  # a pickle: nothing to read cheaply
        try:
            with safe_open(str(file), framework="numpy") as f:
                names.extend(f.keys())
        except Exception as e:  # noqa: BLE001 (safetensors' SafetensorError, OSError)
            raise HFImportError(
                f"{str(file)!r} cannot be read as safetensors ({type(e).__name__}: {e}); "
                "the file is truncated or damaged: download or export it again"
            ) from None
    return names


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], **metadata: str) -> None:
    """One safetensors file with ``{"format": "pt"}`` metadata, as transformers and peft expect."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path), metadata={"format": "pt", **metadata})
