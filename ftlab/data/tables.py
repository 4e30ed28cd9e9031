"""Load any supported source into pandas frames with ftlab's canonical column names.

``load_tables(spec)`` returns ``{split name: DataFrame}``; the split names are the source's own
(``train``, ``validation``, ``test`` ...) unless ``spec.splits`` maps ftlab names to them. Each
frame's index is the row number inside its source split, so a rejected or leaked row can be
found in the original file. Class names known to the source (HF ``ClassLabel``, TFDS
``ClassLabel``, scikit-learn's ``target_names``) travel in ``frame.attrs["label_names"]``.

``spec`` is ``config.data`` (a ConfigDict) or a plain dict with the keys:

- ``source``: ``hf`` | ``tfds`` | ``arrays`` | ``sklearn`` | ``npz``
- ``format`` (hf): ``csv`` | ``json`` | ``jsonl`` | ``parquet`` | ``imagefolder`` | ``disk``
  (a ``save_to_disk`` directory); empty: inferred from ``path``, or a hub name in ``name``
- ``path``: local file, glob or directory; ``files``: ``{split: file}`` instead of ``path``
- ``name``: hub dataset, TFDS dataset (``"mnist"``, ``"glue/sst2:2.0.0"``) or sklearn set;
  ``subset``: the hub dataset's configuration
- ``data_dir`` (tfds): where the prepared dataset lives; ``cache_dir`` (hf): arrow cache
- ``columns``: ``{canonical: source column}`` or ``"text=sentence,label=sentiment"``;
  ``features`` may name several columns (a list, or ``a+b`` in the string form) or ``"*"``
  (every column not mapped otherwise); when given, only the mapped columns are kept, in the
  order of ``frames.CANONICAL``
- ``splits``: ``{ftlab split: source split}`` or ``"train=train,val=validation"``
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ftlab.config import ConfigError
from ftlab.data.frames import CANONICAL, FEATURE_PREFIX, decode_image, spec_get
from ftlab.interop.hub import hub_offline

SOURCES = ("hf", "tfds", "arrays", "sklearn", "npz")
HF_FORMATS = ("csv", "json", "parquet", "imagefolder", "disk")
SPLIT_NAMES = ("train", "val", "test")
_EXTENSIONS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".png": "imagefolder",
    ".jpg": "imagefolder",
    ".jpeg": "imagefolder",
    ".bmp": "imagefolder",
    ".gif": "imagefolder",
    ".webp": "imagefolder",
}


class HubOfflineError(ConfigError):
    """A hub dataset name was given but the Hugging Face Hub cannot be reached."""


# -- mappings from the config ------------------------------------------------------------------


def parse_mapping(value: Any, key: str) -> dict[str, Any]:
    """A ``{name: column}`` mapping from a dict/ConfigDict or ``"a=x,b=y+z"`` (``+`` = list)."""
    if not value:
        return {}
    if isinstance(value, str):
        out: dict[str, Any] = {}
        for part in value.split(","):
            if not part.strip():
                continue
            name, sep, column = part.partition("=")
            if not sep or not name.strip() or not column.strip():
                raise ConfigError(f"config.data.{key}: {part.strip()!r} is not NAME=COLUMN")
            column = column.strip()
            out[name.strip()] = column.split("+") if "+" in column else column
        return out
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise ConfigError(f"config.data.{key}: expected a mapping or 'a=x,b=y', got {value!r}")
    return {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()}


def apply_columns(frame: pd.DataFrame, columns: Mapping[str, Any], where: str) -> pd.DataFrame:
    """Rename source columns to canonical names; a mapped column that is absent is an error
    listing what ``where`` (a split, a file) does have."""
    label_names = dict(frame.attrs.get("class_names_by_column", {}))
    if not columns:
        out = frame
        if "label" in label_names:
            out.attrs["label_names"] = label_names["label"]
        return out
    unknown = [k for k in columns if k not in CANONICAL]
    if unknown:
        raise ConfigError(
            f"config.data.columns: {unknown} are not ftlab column names; use {', '.join(CANONICAL)}"
        )
    available = [str(c) for c in frame.columns]
    singles = {k: v for k, v in columns.items() if isinstance(v, str) and v != "*"}
    wanted: dict[str, str] = {}
    for name, source in columns.items():
        if name == "features" and (source == "*" or isinstance(source, list)):
            chosen = (
                [c for c in available if c not in singles.values()] if source == "*" else source
            )
            wanted.update({f"{FEATURE_PREFIX}{c}": c for c in chosen})
        elif isinstance(source, str):
            wanted[name] = source
        else:
            raise ConfigError(f"config.data.columns.{name}: expected a column name, got {source!r}")
    missing = sorted({s for s in wanted.values() if s not in available})
    if missing:
        raise ConfigError(
            f"config.data.columns: column(s) {missing} not found in {where}; "
            f"available columns: {available}"
        )
    rank = {name: CANONICAL.index(name.split(".")[0]) for name in wanted}
    ordered = sorted(wanted, key=rank.__getitem__)  # one column order whatever the mapping's
    out = pd.DataFrame({name: frame[wanted[name]] for name in ordered}, index=frame.index)
    if "label" in wanted and wanted["label"] in label_names:
        out.attrs["label_names"] = label_names[wanted["label"]]
    return out


def _select_splits(tables: dict[str, Any], splits: Mapping[str, str], where: str) -> dict[str, Any]:
    """Keep and rename the source splits named in ``config.data.splits``."""
    if not splits:
        return tables
    bad = [k for k in splits if k not in SPLIT_NAMES]
    if bad:
        raise ConfigError(f"config.data.splits: {bad} are not split names; use train, val, test")
    missing = [s for s in splits.values() if s not in tables]
    if missing:
        raise ConfigError(
            f"config.data.splits: split(s) {missing} not found in {where}; it has {list(tables)}"
        )
    return {name: tables[source] for name, source in splits.items()}


# -- Hugging Face datasets ---------------------------------------------------------------------


def _offline_message(name: str, why: str) -> str:
    return (
        f"config.data.name: {name!r} is a Hugging Face Hub dataset, but {why}. Load it on a "
        f"machine with network access (`datasets.load_dataset({name!r}).save_to_disk(DIR)`, or "
        "download its csv/json/parquet files), copy DIR here and set config.data.path=DIR "
        "with config.data.format='disk' (or the file format) instead of config.data.name."
    )


def _infer_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "disk"
        found = {
            _EXTENSIONS[p.suffix.lower()]
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in _EXTENSIONS
        }
        if len(found) == 1:
            return found.pop()
        raise ConfigError(
            f"config.data.format: cannot tell the format of directory {str(path)!r} "
            f"(found {sorted(found) or 'no known files'}); set one of {', '.join(HF_FORMATS)}"
        )
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None or fmt == "imagefolder":
        raise ConfigError(
            f"config.data.format: cannot tell the format of {str(path)!r} from its extension; "
            f"set one of {', '.join(HF_FORMATS)}"
        )
    return fmt


def _hf_frame(ds: Any) -> pd.DataFrame:
    """An HF ``Dataset`` as a frame; images decoded to arrays (left encoded if undecodable,
    for the cleaning step to reject with its reason)."""
    import datasets

    image_cols = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    names = {k: list(f.names) for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    for c in image_cols:
        ds = ds.cast_column(c, datasets.Image(decode=False))
    frame = ds.to_pandas()
    for c in image_cols:
        frame[c] = pd.Series([_try_decode(v) for v in frame[c]], index=frame.index, dtype=object)
    frame.attrs["class_names_by_column"] = names
    return frame


def _try_decode(value: Any) -> Any:
    try:
        return decode_image(value)
    except (ValueError, TypeError):
        return value


def _hf_tables(spec: Any) -> dict[str, pd.DataFrame]:
    import datasets

    fmt = str(spec_get(spec, "format", "")).lower()
    fmt = "json" if fmt == "jsonl" else fmt
    path = str(spec_get(spec, "path", ""))
    name = str(spec_get(spec, "name", ""))
    files = parse_mapping(spec_get(spec, "files", {}), "files")
    cache_dir = str(spec_get(spec, "cache_dir", "")) or None
    if fmt and fmt not in HF_FORMATS:
        raise ConfigError(f"config.data.format: {fmt!r} is not one of {', '.join(HF_FORMATS)}")

    if not path and not files:
        if not name:
            raise ConfigError("config.data.path: source 'hf' needs a local path or a hub name")
        return _hub_tables(name, str(spec_get(spec, "subset", "")) or None, cache_dir)

    for f in list(files.values()) or [path]:
        if not any(ch in str(f) for ch in "*?[") and not Path(f).exists():
            key = "files" if files else "path"
            raise ConfigError(f"config.data.{key}: no such file or directory {str(f)!r}")
    where = path or str(files)
    if not fmt:
        fmt = _infer_format(Path(path or next(iter(files.values()))))
    if fmt == "disk":
        loaded = datasets.load_from_disk(path)
        tables = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    else:
        kwargs: dict[str, Any] = {"cache_dir": cache_dir}
        if files:
            kwargs["data_files"] = files
        elif Path(path).is_dir():
            kwargs["data_dir"] = path
        else:
            kwargs["data_files"] = path
        try:
            tables = dict(datasets.load_dataset(fmt, **kwargs))
        except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as e:
            raise ConfigError(f"config.data.path: cannot read {where!r} as {fmt}: {e}") from e
    return {split: _hf_frame(ds) for split, ds in tables.items()}


def _hub_tables(name: str, subset: str | None, cache_dir: str | None) -> dict[str, pd.DataFrame]:
    import datasets

    if hub_offline("HF_DATASETS_OFFLINE"):
        raise HubOfflineError(
            _offline_message(
                name, "this machine is offline (HF_HUB_OFFLINE set, or the Hub unreachable)"
            )
        )
    try:
        loaded = datasets.load_dataset(name, subset, cache_dir=cache_dir)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise ConfigError(f"config.data.name: the Hub has no dataset {name!r}: {e}") from e
    except (OSError, ConnectionError) as e:  # requests/httpx/hub network errors are OSErrors
        why = f"the Hub could not be reached ({type(e).__name__}: {e}); this machine looks offline"
        raise HubOfflineError(_offline_message(name, why)) from e
    tables = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return {split: _hf_frame(ds) for split, ds in tables.items()}


# -- TensorFlow Datasets (random-access data sources: no TensorFlow needed) ---------------------


def _tfds_tables(spec: Any, splits: Mapping[str, str]) -> dict[str, pd.DataFrame]:
    import tensorflow_datasets as tfds

    name = str(spec_get(spec, "name", ""))
    data_dir = str(spec_get(spec, "data_dir", "")) or None
    if not name:
        raise ConfigError("config.data.name: source 'tfds' needs a dataset name, e.g. 'mnist'")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        raise ConfigError(f"config.data.name: TFDS has no dataset {name!r}: {e}") from e
    source_splits = list(splits.values()) or list(builder.info.splits)
    if not source_splits:
        raise ConfigError(
            f"config.data.splits: TFDS dataset {name!r} lists no splits in {data_dir!r}; "
            "name them, e.g. splits='train=train,test=test'"
        )
    try:
        sources = tfds.data_source(name, split=source_splits, data_dir=data_dir, download=False)
    except Exception as e:
        raise ConfigError(
            f"config.data.data_dir: cannot open TFDS dataset {name!r} in {data_dir!r} "
            f"({type(e).__name__}: {e}). Prepare it with file_format='array_record' "
            "(tfds build --file_format=array_record) and point config.data.data_dir at it"
        ) from e
    label_names = {
        k: list(f.names)
        for k, f in builder.info.features.items()
        if isinstance(f, tfds.features.ClassLabel)
    }
    tables = {}
    for split, source in zip(source_splits, sources):
        rows = [source[i] for i in range(len(source))]  # per index: __getitems__ is not universal
        frame = pd.DataFrame(
            {k: [_tfds_cell(r[k]) for r in rows] for k in (rows[0] if rows else {})}
        )
        frame.attrs["class_names_by_column"] = label_names
        tables[split] = frame
    return tables


def _tfds_cell(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


# -- in-memory arrays and the bundled sources --------------------------------------------------


def _column(values: Any) -> Any:
    """A column for pandas: arrays with more than one axis become one array per row."""
    arr = np.asarray(values) if not isinstance(values, (list, pd.Series)) else values
    if isinstance(arr, np.ndarray) and arr.ndim > 1:
        return pd.Series(list(arr), dtype=object)
    return arr


def _frame(table: Any) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table.copy()
    if isinstance(table, Mapping):
        lengths = {k: len(v) for k, v in table.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"arrays: columns have different lengths {lengths}")
        return pd.DataFrame({k: _column(v) for k, v in table.items()})
    raise ConfigError(f"arrays: expected a DataFrame or a dict of columns, got {type(table)}")


def arrays_tables(arrays: Any) -> dict[str, pd.DataFrame]:
    """``{split: {column: array}}``, ``{split: DataFrame}``, or one ``{column: array}`` /
    DataFrame (taken as the ``train`` split)."""
    if isinstance(arrays, pd.DataFrame):
        return {"train": _frame(arrays)}
    if not isinstance(arrays, Mapping) or not arrays:
        raise ConfigError("arrays: source 'arrays' needs a non-empty dict passed as `arrays=`")
    per_split = all(isinstance(v, (Mapping, pd.DataFrame)) for v in arrays.values())
    if per_split:
        return {str(k): _frame(v) for k, v in arrays.items()}
    return {"train": _frame(arrays)}


def _bundled_tables(spec: Any, source: str) -> dict[str, pd.DataFrame]:
    from ftlab.data.sources import from_npz, from_sklearn

    raw = (
        from_sklearn(spec_get(spec, "name", ""))
        if source == "sklearn"
        else from_npz(spec_get(spec, "path", ""))
    )
    column = "image" if raw.inputs.ndim > 2 else "features"
    labels = raw.labels[:, 0] if raw.labels.ndim == 2 and raw.labels.shape[1] == 1 else raw.labels
    frame = pd.DataFrame({column: _column(raw.inputs), "label": _column(labels)})
    if raw.class_names:
        frame.attrs["class_names_by_column"] = {"label": list(raw.class_names)}
    return {"train": frame}


# -- entry point -------------------------------------------------------------------------------


def load_tables(spec: Any, arrays: Any = None) -> dict[str, pd.DataFrame]:
    """Every split of the source as a frame with canonical column names (see module doc)."""
    source = str(spec_get(spec, "source", "hf"))
    if source not in SOURCES:
        raise ConfigError(f"config.data.source: {source!r} is not one of {', '.join(SOURCES)}")
    splits = parse_mapping(spec_get(spec, "splits", {}), "splits")
    columns = parse_mapping(spec_get(spec, "columns", {}), "columns")
    if source == "hf":
        tables = _hf_tables(spec)
    elif source == "tfds":
        tables = _tfds_tables(spec, splits)
    elif source == "arrays":
        tables = arrays_tables(arrays)
    else:
        tables = _bundled_tables(spec, source)
    where = str(spec_get(spec, "path", "") or spec_get(spec, "name", "") or source)
    tables = _select_splits(tables, splits, where)
    return {
        split: apply_columns(frame, columns, f"split {split!r} of {where!r}")
        for split, frame in tables.items()
    }
