"""A finished run loaded back from its directory: ``ftlab eval``, ``predict`` and ``export``.

``load_config(run_dir)`` restores the run's config from its ``config.json`` (over the
schema's defaults: ``ftlab.config.from_dict``); ``choose_checkpoint`` picks the weights
(``best``, ``last`` or a step; by default what the run's final evaluation used: the best
checkpoint when ``early_stopping.restore_best`` and there is one, else the last);
``restore`` rebuilds the run (``ftlab.train.loop.build``) and restores them.

Rows from a file (``eval --split FILE``, ``predict --input FILE``) go through the run's own
data pipeline: the run's source is loaded and split as in training, and the file's rows take
the test split's place (``rows_dataset``), so every statistic (imputation, scaling,
normalisation, target standardisation, the label map, the tokenizer) is the one fitted on the
run's training split, and the training and validation splits come out exactly as the run's.
(One exception: the rows the run's leakage check removed, and their duplicates, are taken out
before cleaning here, as the file's rows must not remove any; so ``data.clean.missing``
imputation statistics differ when such rows had values missing.)

Every check on the command's input (the directory, its config, its checkpoints, the split,
the file and its columns) comes before anything is built; nothing in the run directory is
written except new files under ``eval/``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections as mc
import numpy as np
import pandas as pd

from ftlab import workdir as workdir_lib
from ftlab.config import ConfigError, apply_overrides, from_dict

log = logging.getLogger("ftlab")

SPLITS = ("val", "test")


class InputError(ConfigError):
    """A command-line input (directory, checkpoint, split, file, column) that cannot be used."""


# -- the run directory -------------------------------------------------------------------------


def run_directory(path: str | Path) -> Path:
    """``path`` checked to be a directory (a URL, ``gs://bucket/run``: an ``epath.Path``)."""
    run_dir = workdir_lib.as_path(path)
    if not run_dir.exists():
        raise InputError(f"run directory '{run_dir}' does not exist")
    if not run_dir.is_dir():
        raise InputError(f"'{run_dir}' is not a run directory (not a directory)")
    return run_dir


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[workdir_lib.Workdir]:
    """The run directory ``path`` as a ``Workdir``: a URL is staged (its files pulled, what a
    command writes under ``eval/`` pushed back), its checkpoints read from the bucket."""
    run_directory(path)
    with workdir_lib.opened(path) as wd:
        yield wd


def load_config(run_dir: str | Path) -> mc.ConfigDict:
    """The run's config from ``run_dir/config.json``, locked."""
    from ftlab.schema import base_config

    run_dir = run_directory(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        hint = ""
        if any((p / "config.json").is_file() for p in run_dir.iterdir() if p.is_dir()):
            hint = " (it holds runs: give one of its subdirectories)"
        raise InputError(f"'{run_dir}' has no config.json: not a run directory{hint}")
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read '{path}': {e}") from None
    if not isinstance(saved, dict):
        raise InputError(f"'{path}' does not hold a config (a JSON object)")
    return from_dict(saved, base_config(), where=str(path))


def _steps(directory: Path) -> list[int]:
    """Checkpoint steps saved under ``directory`` (finished ones: their folder is a number)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    kind: str  # "best" or "last"
    step: int
    name: str  # "best", "last" or the step: names the eval file

    def __str__(self) -> str:
        return f"{self.kind} checkpoint (step {self.step})"


def choose_checkpoint(run_dir: Path, cfg: mc.ConfigDict, which: str | None = None) -> Checkpoint:
    """``best``, ``last`` (the latest), a step, or None: what the run's final evaluation used."""
    ckpt_dir = run_dir / "checkpoints"
    last, best = _steps(ckpt_dir / "last"), _steps(ckpt_dir / "best")
    if not last and not best:
        raise InputError(f"'{run_dir}' has no checkpoints (nothing in {ckpt_dir})")
    if which is None:
        if cfg.early_stopping.restore_best and best:
            return Checkpoint("best", best[-1], "best")
        which = "last"
    if which == "best":
        if not best:
            raise InputError(f"'{run_dir}' has no best checkpoint; saved steps: {last}")
        return Checkpoint("best", best[-1], "best")
    if which == "last":
        if not last:
            raise InputError(f"'{run_dir}' has no last checkpoint; best is step {best[-1]}")
        return Checkpoint("last", last[-1], "last")
    try:
        step = int(which)
    except ValueError:
        raise InputError(f"--checkpoint: {which!r} is not best, last or a step number") from None
    if step in last:
        return Checkpoint("last", step, str(step))
    if step in best:
        return Checkpoint("best", step, str(step))
    available = sorted(set(last) | set(best))
    raise InputError(
        f"--checkpoint: '{run_dir}' has no checkpoint at step {step}; saved steps: {available}"
    )


@dataclasses.dataclass
class Restored:
    """A run rebuilt from its config with a checkpoint's state."""

    directory: Path
    cfg: mc.ConfigDict
    run: Any  # ftlab.train.loop.Run
    state: Any  # its TrainState, restored
    checkpoint: Checkpoint


def restore(run_dir: Path, cfg: mc.ConfigDict, which: Checkpoint, data: Any = None) -> Restored:
    """Build the run (data, model, method, sharded state) and restore the checkpoint into it
    (from ``run_dir/checkpoints``: a bucket's for a remote run, ``Workdir.store``)."""
    from ftlab import checkpoint
    from ftlab.train.loop import build

    ckpt_dir = run_dir / "checkpoints"
    # a distilled run is evaluated as its student: the teacher is never read
    proj = _distill_projection(ckpt_dir / which.kind / str(which.step), cfg)
    run = build(cfg, data, teacher=False, distill_proj=proj)
    # Orbax creates the folders it manages: only name the best one when it exists.
    ckpts = checkpoint.Checkpoints(
        ckpt_dir,
        save_every=cfg.checkpoint.every_steps,
        keep=cfg.checkpoint.keep,
        async_save=False,
        best_metric=cfg.early_stopping.metric if (ckpt_dir / "best").is_dir() else None,
        best_mode=cfg.early_stopping.mode,
    )
    try:
        if which.kind == "best":  # the one kept there
            state, _, step = ckpts.restore_best(run.state)
            if step != which.step:
                raise InputError(f"--checkpoint: the best checkpoint is step {step}")
        else:
            state, _ = ckpts.restore(run.state, which.step)
    finally:
        ckpts.close()
    log.info("restored the %s from %s", which, ckpt_dir)
    return Restored(run_dir, cfg, run, state, which)


def _distill_projection(step_dir: Path, cfg: mc.ConfigDict) -> tuple[int, int] | None:
    """The shape of the hidden-state projection a distilled run's checkpoint holds (read from
    its metadata: the teacher's width is not needed), or None."""
    if not (cfg.distill.teacher and cfg.distill.hidden_weight):
        return None
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        meta = checkpointer.metadata(step_dir / "state").item_metadata.tree
    finally:
        checkpointer.close()
    kernel = meta.get("trainable", {}).get("distill", {}).get("proj", {}).get("kernel")
    return None if kernel is None else tuple(int(n) for n in kernel.shape)


def new_file(directory: Path, stem: str, suffix: str = ".json") -> Path:
    """``directory/stem.json``, or ``stem-2.json``, ... : a name no file has yet."""
    path = directory / f"{stem}{suffix}"
    n = 2
    while path.exists():
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


# -- rows from a file through the run's data pipeline --------------------------------------------


@dataclasses.dataclass
class SourceSplits:
    """The run's source split as in training, and what its pipeline needs to be replayed."""

    splits: Any  # ftlab.data.splitting.Splits, leaked rows taken out
    task: str
    label_map: Any  # the label map cleaning used (config.data.classes makes one)


def source_splits(cfg: mc.ConfigDict) -> SourceSplits:
    """The run's source tables split as ``load_dataset`` splits them, without the training and
    validation rows that its leakage check removed."""
    from ftlab.data import loading

    d = cfg.data
    splits, task, label_map = loading.source_splits(d)
    if d.clean.leakage:
        splits = _without_leaked(splits, d.clean, label_map, task)
    return SourceSplits(splits, task, label_map)


def generates(source: SourceSplits) -> bool:
    """Whether predicting means writing text: a causal LM continues prompts, a text-to-text
    model (T5: ``seq2seq`` with a ``prompt`` column) answers sources, a speech model
    (Whisper: an ``audio`` column) transcribes clips."""
    text_to_text = source.task == "seq2seq" and "prompt" in source.splits.train.columns
    return source.task == "causal_lm" or text_to_text or transcribes(source)


def transcribes(source: SourceSplits) -> bool:
    """Whether the run is speech recognition (its data has an ``audio`` column)."""
    return "audio" in source.splits.train.columns


AUDIO_SUFFIXES = (".wav", ".wave", ".flac", ".ogg", ".mp3")


def _audio_listing(path: Path) -> pd.DataFrame | None:
    """One ``audio`` row per clip when ``path`` is an audio file or a folder of them (sorted,
    subfolders included); None for anything else (a table)."""

    def is_audio(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES

    if is_audio(path):
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if is_audio(p))
    else:
        return None
    return pd.DataFrame({"audio": [str(f) for f in files]}) if files else None


def _without_leaked(splits: Any, clean_cfg: mc.ConfigDict, label_map: Any, task: str) -> Any:
    """``splits`` less the training and validation rows that the run's leakage check removed,
    with their duplicates (which the duplicate step had removed first)."""
    from ftlab.data import clean
    from ftlab.data.frames import fingerprints

    # the steps before the duplicate and leakage checks, as the run ran them, then those two
    before = {
        **clean_cfg.to_dict(),
        "label_map": label_map,
        "duplicates": False,
        "leakage": "",
        "outliers": "",
        "normalise": "",
        "image_size": (),
    }
    cleaned, _ = clean.clean(splits, before, task=task)
    deduped = clean.drop_duplicates(cleaned)[0] if clean_cfg.duplicates else cleaned
    kept, _ = clean.check_leakage(deduped, clean_cfg.leakage)

    def without(raw: pd.DataFrame, rows: pd.DataFrame, before_check, after_check):
        gone = before_check.index.difference(after_check.index)
        digests = fingerprints(rows, rows.columns)
        leaked = set(digests[rows.index.isin(gone)])
        drop = rows.index[[digest in leaked for digest in digests]]
        return raw[~raw.index.isin(drop)]

    return splits.replace(
        train=without(splits.train, cleaned.train, deduped.train, kept.train),
        val=without(splits.val, cleaned.val, deduped.val, kept.val),
    )


def read_table(path: str | Path, what: str, cache_dir: str = "") -> pd.DataFrame:
    """A csv / json(l) / parquet file or a folder of images as one frame (Hugging Face
    ``datasets`` reads it, as for ``data.source='hf'``)."""
    from ftlab.data import tables

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what}: no such file or directory '{path}'")
    try:
        loaded = tables.load_tables({"source": "hf", "path": str(path), "cache_dir": cache_dir})
    except ConfigError as e:
        raise InputError(f"{what}: cannot read '{path}': {e}") from None
    frame = pd.concat(list(loaded.values()), ignore_index=True)  # an image folder's splits
    if not len(frame):
        raise InputError(f"{what}: '{path}' has no rows")
    return frame


def _source_names(cfg: mc.ConfigDict, column: str) -> list[str]:
    """The names a canonical column may have in a file: the run's source name, then its own."""
    from ftlab.data.frames import FEATURE_PREFIX
    from ftlab.data.tables import parse_mapping

    mapping = parse_mapping(cfg.data.columns, "columns")
    if column.startswith(FEATURE_PREFIX):
        names = [column[len(FEATURE_PREFIX) :]]
    else:
        source = mapping.get(column, column)
        names = [source] if isinstance(source, str) else []
    return list(dict.fromkeys([*names, column]))


OPTIONAL = {"group": "", "context": ""}  # filled when a file lacks them


def canonical_rows(
    cfg: mc.ConfigDict, frame: pd.DataFrame, columns: list[str], path: Path, what: str
) -> pd.DataFrame:
    """``frame``'s columns renamed to the run's canonical ``columns`` (in that order); a missing
    one is an error naming it (``group`` and ``context`` are filled with "" instead)."""
    found: dict[str, str] = {}
    missing = []
    for column in columns:
        name = next((n for n in _source_names(cfg, column) if n in frame.columns), None)
        if name is not None:
            found[column] = name
        elif column not in OPTIONAL:
            missing.append((column, _source_names(cfg, column)[0]))
    if missing:
        shown = ", ".join(
            f"'{source}'" + (f" (the run's {c!r})" if source != c else "") for c, source in missing
        )
        raise InputError(
            f"{what}: '{path}' lacks the column(s) the run needs: {shown}; "
            f"it has: {', '.join(map(str, frame.columns))}"
        )
    return pd.DataFrame(
        {c: frame[found[c]] if c in found else OPTIONAL[c] for c in columns}, index=frame.index
    )


@dataclasses.dataclass
class FileRows:
    """A file's rows in the run's canonical columns, ready to take the test split's place."""

    frame: pd.DataFrame
    source: SourceSplits
    labelled: bool  # False: predict (a placeholder label)
    files: list[str] | None = None  # an image folder's file per row

    def named(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` (each with its ``row``) with the image file of the row, if any."""
        if self.files is None:
            return records
        return [{"row": r["row"], "file": self.files[r["row"]], **r} for r in records]


def file_rows(cfg: mc.ConfigDict, path: str | Path, *, labelled: bool, what: str) -> FileRows:
    """Read ``path`` and check it has the run's input columns (and labels when ``labelled``).

    Unlabelled rows of a causal LM need only the prompt (``prompt``, optional ``context``;
    ``text`` without a template), those of a text-to-text model the source (``prompt``,
    optional ``context``): they are decoded, not scored."""
    path = Path(path)
    listing = _audio_listing(path)  # an audio file or folder (speech runs)
    if listing is None:
        frame = read_table(path, what, cfg.data.cache_dir)  # before the source: fails fast
    else:
        frame = listing
    source = source_splits(cfg)
    train = source.splits.train
    columns = [str(c) for c in train.columns]
    if listing is not None and (labelled or not transcribes(source)):
        need = "a table with the audio and text columns" if labelled else "a table of inputs"
        raise InputError(f"{what}: '{path}' holds audio files; this run needs {need}")
    if not labelled and generates(source):
        columns = ["prompt"] + (["context"] if "context" in columns else [])
        if not cfg.data.template and source.task == "causal_lm":
            columns = ["text"]
        if transcribes(source):  # speech: the clips only
            columns = ["audio"]
    elif not labelled:
        columns = [c for c in columns if c != "label"]
    rows = canonical_rows(cfg, frame, columns, path, what)
    if transcribes(source):  # relative clip paths are read from the input file's folder
        base = path if path.is_dir() else path.parent
        rows["audio"] = [
            str(base / v) if isinstance(v, str) and not Path(v).expanduser().is_absolute() else v
            for v in rows["audio"]
        ]
    if not labelled and generates(source):
        empty = rows[columns[0]].isna().to_numpy()
        if empty.any():
            raise InputError(
                f"{what}: '{path}' row {int(np.flatnonzero(empty)[0])} has no {columns[0]!r} "
                "to continue"
            )
    if not labelled and source.task in ("classification", "regression"):
        # a placeholder the pipeline maps like any training label; never scored
        rows["label"] = train["label"].iloc[0] if source.task == "classification" else 0.0
        rows = rows[[c for c in train.columns if c in rows.columns]]
    if labelled and cfg.data.classes and "label" in rows.columns:
        keep = rows["label"].isin(tuple(cfg.data.classes))
        if not keep.all():
            log.info(
                "%s: %d rows with labels outside config.data.classes skipped",
                path,
                int((~keep).sum()),
            )
        rows = rows[keep]
    files = None if listing is not None else _image_files(path, cfg.data.cache_dir)
    return FileRows(rows, source, labelled, files)


def _image_files(path: Path, cache_dir: str) -> list[str] | None:
    """The file of each row of an image folder, in the order ``read_table`` gave the rows."""
    if not path.is_dir():
        return None
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir or None)
    files = []
    for split in loaded.values():
        split = split.cast_column("image", datasets.Image(decode=False))
        files += [_relative(Path(v["path"]), path.resolve()) for v in split["image"]]
    return files


def _relative(file: Path, folder: Path) -> str:
    try:
        return str(file.relative_to(folder))
    except ValueError:
        return str(file)


def rows_dataset(cfg: mc.ConfigDict, rows: FileRows) -> tuple[Any, np.ndarray | None]:
    """The run's Dataset with ``rows`` as its test split, through the run's pipeline.

    Labelled rows are cleaned as test rows are (duplicates dropped too); unlabelled ones
    (predict) are never dropped as duplicates, and the file row number of each test example
    is returned with them (rows that cleaning rejects, malformed or missing a value, are left
    out and logged)."""
    from ftlab.data import load_dataset
    from ftlab.data.clean import _is_missing

    frame = rows.frame
    if not rows.labelled:
        frame = frame.assign(_row=np.arange(len(frame)))  # so that no two rows are duplicates
    splits = rows.source.splits
    data_cfg = copy.deepcopy(cfg.data)
    apply_overrides(
        data_cfg,
        {
            "source": "arrays",
            "columns": "",
            "splits": "",
            "classes": (),
            "clean.leakage": "",  # applied already (source_splits): these rows remove nothing
            "clean.label_map": rows.source.label_map or "",
        },
    )
    arrays = {"train": splits.train, "val": splits.val, "test": frame}
    data = load_dataset(data_cfg, tokenizer=cfg.model.pretrained, arrays=arrays)
    if rows.labelled:
        return data, None
    kept = np.ones(len(frame), bool)
    for r in data.rejected:
        if r.get("split") == "test":
            kept[int(r["row"])] = False
            log.warning("row %s not scored: %s (%s)", r["row"], r["reason"], r["column"])
    if data_cfg.clean.missing:  # what handle_missing drops: a value left missing after filling
        fill = data.clean_log.get("missing", {}).get("fill", {})
        unfilled = frame.drop(columns=[c for c in fill if c in frame.columns])
        missing = unfilled.map(_is_missing).any(axis=1).to_numpy() & kept
        for i in np.flatnonzero(missing):
            log.warning("row %d not scored: a missing value", i)
        kept &= ~missing
    if int(kept.sum()) != len(data.test):
        raise RuntimeError(
            f"{int(kept.sum())} rows expected through the data pipeline, {len(data.test)} came"
        )
    return data, np.flatnonzero(kept)


def run_config_arg(cfg: mc.ConfigDict, overrides: list[tuple[str, str]]) -> mc.ConfigDict:
    """The run's config with command-line overrides (a moved data file, say)."""
    if overrides:
        cfg = copy.deepcopy(cfg)
        apply_overrides(cfg, overrides)
        cfg.lock()
    return cfg


# -- predictions ---------------------------------------------------------------------------------


def prediction_rows(restored: Restored, rows: np.ndarray) -> list[dict[str, Any]]:
    """Per test example of the restored run's data: its file row, and the predicted class with
    every class's probability, or the value(s) in the target's original units."""
    run = restored.run
    data = run.data
    outputs = np.asarray(run.evaluate(restored.state, data.test, keep_outputs=True)["outputs"])
    if data.task == "classification":
        z = outputs.astype(np.float64) - outputs.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        names = list(data.class_names)
        return [
            {
                "row": int(row),
                "label": names[int(p.argmax())],
                **{f"prob_{name}": float(v) for name, v in zip(names, p)},
            }
            for row, p in zip(rows, probs)
        ]
    values = np.asarray(data.original_units(outputs), np.float64).reshape(len(rows), -1)
    if values.shape[1] == 1:
        return [{"row": int(r), "prediction": float(v[0])} for r, v in zip(rows, values)]
    return [
        {"row": int(r), **{f"prediction_{i}": float(x) for i, x in enumerate(v)}}
        for r, v in zip(rows, values)
    ]


def generate_rows(restored: Restored, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The restored causal LM's continuation of each row's prompt (formatted by the run's
    template and tokenised as in training), decoded with the run's ``config.eval`` settings."""
    from ftlab.data import text as text_lib
    from ftlab.eval.generation_eval import prompt_ids

    cfg, run = restored.cfg, restored.run
    tokenizer = run.data.tokenizer
    if "audio" in frame.columns:  # speech (Whisper): transcripts of the clips
        return _transcribe_rows(restored, frame)
    if run.data.task == "seq2seq":  # text to text (T5): the source encoded as in training
        return _answer_rows(restored, frame)
    if cfg.data.template:
        template = text_lib.load_template(cfg.data.template)
        context = frame["context"] if "context" in frame.columns else [""] * len(frame)
        shown = [str(p) for p in frame["prompt"]]
        ids = [
            prompt_ids(
                tokenizer,
                template,
                {"instruction": p, "input": "" if pd.isna(c) else str(c), "output": ""},
            )
            for p, c in zip(shown, context)
        ]
    else:
        shown = [str(t) for t in frame["text"]]
        ids = text_lib.encode_formatted(tokenizer, shown, "")
    texts = decode(restored, ids)
    return [
        {"row": int(i), "prompt": p, "output": t}
        for i, p, t in zip(range(len(shown)), shown, texts)
    ]


def _answer_rows(restored: Restored, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The restored text-to-text model's output for each row's source (``data.source_prefix``,
    ``prompt``, then ``context`` after a space), encoded as ``seq2seq_arrays`` encodes training
    sources."""
    from ftlab.eval.generate import decode_sources
    from ftlab.eval.generation_eval import encode_sources, source_text

    cfg, run = restored.cfg, restored.run
    context = frame["context"] if "context" in frame.columns else [""] * len(frame)
    shown = [str(p) for p in frame["prompt"]]
    prefix = cfg.data.get("source_prefix", "")  # as training: the config's task prefix
    sources = [
        prefix + source_text(p, "" if pd.isna(c) else str(c)) for p, c in zip(shown, context)
    ]
    ids = encode_sources(run.data.tokenizer, sources, cfg.data.max_length)
    state = restored.state
    texts = decode_sources(
        run.model, run.method, state.trainable, state.frozen, ids, run.data.tokenizer, cfg.eval
    )
    return [
        {"row": int(i), "prompt": p, "output": t}
        for i, p, t in zip(range(len(shown)), shown, texts)
    ]


def _transcribe_rows(restored: Restored, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The restored speech model's transcript of each row's clip: read, resampled and turned
    into log-mel features as training did (the run's feature extractor, the model's window),
    decoded with the run's ``config.eval`` settings (``num_beams``, ``max_new_tokens``, ...).
    A clip that cannot be read is logged and left out."""
    from ftlab.data import audio as audio_lib
    from ftlab.eval.generation_eval import transcribe

    cfg, run, state = restored.cfg, restored.run, restored.state
    extractor = getattr(run.data, "feature_extractor", None) or audio_lib.feature_extractor(
        cfg.data.tokenizer or cfg.model.pretrained
    )
    rate = int(cfg.data.audio.get("sampling_rate", audio_lib.RATE) or audio_lib.RATE)
    rows, clips = [], []
    for i, value in enumerate(frame["audio"]):
        try:
            clips.append(audio_lib.read_audio(value, "", rate))
            rows.append(i)
        except (ValueError, OSError) as e:
            log.warning("row %d not transcribed: audio %r: %s", i, str(value), e)
    if not clips:
        return []
    features = audio_lib.log_mel(extractor, clips, run.model.config.num_frames)
    e = cfg.eval
    texts = transcribe(
        run.model,
        run.method.merged_params(state.trainable, state.frozen),
        features,
        run.data.tokenizer,
        e.batch_size,
        e.max_new_tokens,
        num_beams=e.num_beams,
        length_penalty=e.length_penalty,
        no_repeat_ngram_size=e.no_repeat_ngram_size,
    )
    audio = frame["audio"].tolist()
    return [{"row": i, "audio": str(audio[i]), "output": t} for i, t in zip(rows, texts)]


def decode(restored: Restored, ids: list[list[int]]) -> list[str]:
    """Generated text after each prompt (token ids), batched as evaluation decodes."""
    from ftlab.eval.generation_eval import decode_prompts

    run = restored.run
    return decode_prompts(
        run.model,
        run.method,
        restored.state.trainable,
        restored.state.frozen,
        ids,
        run.data.tokenizer,
        restored.cfg.eval,
    )


def write_records(records: list[dict[str, Any]], output: Path | None) -> None:
    """jsonl to stdout or ``output`` (csv when it ends in .csv)."""
    import sys

    if output is not None and output.suffix.lower() == ".csv":
        pd.DataFrame.from_records(records).to_csv(output, index=False)
        return
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if output is None:
        sys.stdout.write(lines)
        sys.stdout.flush()
    else:
        output.write_text(lines)
