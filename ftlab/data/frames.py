"""What the columns of a data frame mean to ftlab, shared by loading, cleaning and balancing.

Every source ends as pandas frames whose columns carry canonical names, so the later steps
know which column holds the inputs without being told again:

- ``text``, ``prompt``, ``response``: strings; ``context``: an instruction's optional input
  (Alpaca's ``input``, may be empty);
- ``image``: one array (H, W) or (H, W, C) per row;
- ``audio``: a clip per row: a file path, an array of samples or an HF ``Audio`` cell
  (``ftlab.data.audio``; with ``text`` as its transcript: speech recognition);
- ``features``: one numeric vector per row, or tabular data as scalar columns named
  ``features.<source name>`` (so cleaning can impute and clip each of them);
- ``label``: class (int or string) or regression target; ``group``: a subgroup tag for
  per-group reports.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftlab.config import ConfigError

CANONICAL = (
    "text",
    "label",
    "image",
    "prompt",
    "context",
    "response",
    "group",
    "features",
    "audio",
)
TEXT_COLUMNS = ("text", "prompt", "response")
INPUT_COLUMNS = ("text", "image", "prompt", "context", "response", "features", "audio")
FEATURE_PREFIX = "features."


class DataError(ValueError):
    """Data that cannot be used as it is; the message names the split, row, column or value."""


def spec_get(spec: Any, key: str, default: Any = None) -> Any:
    """``spec[key]`` for a dict or an ml_collections ConfigDict, ``default`` when absent/empty."""
    if spec is None:
        return default
    value = spec.get(key, default) if hasattr(spec, "get") else getattr(spec, key, default)
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return default if value is None else value


def feature_columns(frame: pd.DataFrame) -> list[str]:
    """The feature columns: a ``features`` vector column and/or ``features.*`` scalars."""
    return [c for c in frame.columns if c == "features" or str(c).startswith(FEATURE_PREFIX)]


def scalar_feature_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if str(c).startswith(FEATURE_PREFIX)]


def input_columns(frame: pd.DataFrame) -> list[str]:
    """Columns that make up a model input (what a leaked example shares across splits)."""
    cols = [c for c in frame.columns if c in INPUT_COLUMNS or str(c).startswith(FEATURE_PREFIX)]
    return cols or [c for c in frame.columns if c not in ("label", "group")]


def decode_image(value: Any) -> np.ndarray:
    """An image cell as an array: arrays pass, PIL images, encoded bytes, HF ``{bytes, path}``
    dicts and file paths are decoded. Raises ValueError (with PIL's reason) when it cannot,
    TypeError for a cell that is no image at all."""
    from PIL import Image

    if isinstance(value, np.ndarray) and value.dtype != object:
        if value.ndim not in (2, 3):
            raise ValueError(f"image array has shape {value.shape}; expected (H, W) or (H, W, C)")
        return value
    if isinstance(value, Image.Image):
        return np.asarray(value)
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        source: Any = io.BytesIO(value)
    elif isinstance(value, (str, Path)):
        source = str(value)
    else:
        raise TypeError(f"an image cell of type {type(value).__name__} cannot be decoded")
    try:
        with Image.open(source) as img:
            img.load()
            return np.asarray(img)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"{type(e).__name__}: {e}") from e


def _cell_bytes(value: Any) -> bytes:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()
    if isinstance(value, (bytes, bytearray)):
        return b"b" + bytes(value)
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return b"nan"
    if isinstance(value, (np.generic,)):
        value = value.item()
    return repr(value).encode()


def fingerprints(frame: pd.DataFrame, columns: Iterable[str]) -> np.ndarray:
    """One digest per row over ``columns``; equal rows (arrays included) have equal digests.

    pandas' own hashing cannot see inside array cells, hence this."""
    columns = list(columns)
    out = np.empty(len(frame), dtype=object)
    values = [frame[c].to_numpy() for c in columns]
    for i in range(len(frame)):
        h = hashlib.blake2b(digest_size=16)
        for col in values:
            cell = _cell_bytes(col[i])
            h.update(len(cell).to_bytes(8, "little"))
            h.update(cell)
        out[i] = h.digest()
    return out


def feature_matrix(frame: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Numeric feature columns as an (N, D) float matrix and a name per matrix column."""
    parts, names = [], []
    for c in columns:
        if c == "features":
            m = (
                np.stack([np.asarray(v, np.float64).reshape(-1) for v in frame[c]])
                if len(frame)
                else np.zeros((0, 0))
            )
            parts.append(m)
            names += [f"features[{i}]" for i in range(m.shape[1])]
        else:
            parts.append(pd.to_numeric(frame[c]).to_numpy(np.float64)[:, None])
            names.append(c)
    return (np.concatenate(parts, axis=1) if parts else np.zeros((len(frame), 0))), names


def set_feature_matrix(frame: pd.DataFrame, columns: list[str], matrix: np.ndarray) -> pd.DataFrame:
    frame = frame.copy()
    start = 0
    for c in columns:
        if c == "features":
            width = len(np.asarray(frame[c].iloc[0]).reshape(-1)) if len(frame) else 0
            block = matrix[:, start : start + width].astype(np.float32)
            frame[c] = pd.Series(list(block), index=frame.index, dtype=object)
            start += width
        else:
            frame[c] = matrix[:, start]
            start += 1
    return frame


def stack_inputs(frame: pd.DataFrame) -> np.ndarray:
    """The model inputs of a frame as one array: features (N, D) float32, images
    (N, H, W, C) float32, or text as an object array of strings."""
    features = feature_columns(frame)
    if features:
        parts = []
        for c in features:
            col = frame[c].to_numpy()
            if c == "features":
                parts.append(np.stack([np.asarray(v, np.float32).reshape(-1) for v in col]))
            else:
                parts.append(col.astype(np.float32)[:, None])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(frame), 0), np.float32)
    if "image" in frame.columns:
        if len(frame) == 0:
            return np.zeros((0, 0, 0, 1), np.float32)
        images = [np.asarray(v, np.float32) for v in frame["image"]]
        images = [im[..., None] if im.ndim == 2 else im for im in images]
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise DataError(
                f"images have different shapes {sorted(shapes)[:4]}; set "
                "config.data.clean.image_size to resize them to one size"
            )
        return np.stack(images)
    for c in TEXT_COLUMNS:
        if c in frame.columns:
            return frame[c].to_numpy(dtype=object)
    raise ConfigError(
        f"config.data.columns: no input column among {list(frame.columns)}; map one of "
        f"{', '.join(INPUT_COLUMNS)} (e.g. columns='text=sentence,label=sentiment')"
    )
