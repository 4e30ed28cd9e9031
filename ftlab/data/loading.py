"""``config.data`` -> a ``Dataset`` of arrays: source, splits, cleaning, balance, tokenisation.

One path for every source (scikit-learn's bundled sets, npz, Hugging Face ``datasets`` files or
hub names, TensorFlow Datasets, in-memory arrays): frames with canonical columns
(``ftlab.data.frames``) -> train/val/test (the source's, or carved with ``split_seed``) ->
cleaning steps, each logged with counts -> class balance on the training split only ->
arrays for the task: images / feature vectors, tokenised text for classification, or
causal-LM tokens (plain text, or instructions with the prompt masked out of the loss).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ml_collections as mc
import numpy as np
import pandas as pd

from ftlab.config import ConfigError
from ftlab.data import Dataset, Split, balance, clean, splitting, tables

log = logging.getLogger("ftlab")

TASKS = ("auto", "classification", "regression", "causal_lm", "seq2seq")


def infer_task(frame: pd.DataFrame, task: str) -> str:
    """``auto``: a causal LM for prompt/response or unlabelled text, regression for float
    labels, classification otherwise."""
    if task != "auto":
        return task
    columns = set(frame.columns)
    if "audio" in columns:  # clips and transcripts: speech recognition (ftlab.data.audio)
        from ftlab.data.audio import SPEECH_TASK

        return SPEECH_TASK
    if "response" in columns or ("text" in columns and "label" not in columns):
        return "causal_lm"
    if "label" in columns and pd.api.types.is_float_dtype(frame["label"]):
        return "regression"
    return "classification"


def _keep_classes(frames: dict[str, pd.DataFrame], classes: tuple) -> tuple[dict, str]:
    """Only rows whose label is in ``classes``; the label map sends them to 0..k-1 in order."""
    present = set().union(*(set(f["label"].tolist()) for f in frames.values()))
    unknown = [c for c in classes if c not in present]
    if unknown:
        raise ConfigError(f"config.data.classes: labels {unknown} do not occur in the data")
    out = {}
    for name, frame in frames.items():
        kept = frame[frame["label"].isin(classes)]
        names = frame.attrs.get("label_names")
        kept.attrs["label_names"] = [names[c] for c in classes] if names else None
        out[name] = kept
    return out, ",".join(f"{c}={i}" for i, c in enumerate(classes))


def _few_per_class(split: Split, n: int, num_classes: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(split.labels == c)
        if len(idx) < n:
            raise ConfigError(
                f"config.data.train_per_class: {n} asked for, class {c} has {len(idx)} "
                "training examples"
            )
        chosen.append(rng.permutation(idx)[:n])
    return split.take(np.sort(np.concatenate(chosen)))


def _scale_inputs(data: Dataset, scale: float) -> None:
    """Multiply by ``scale``, or standardise every feature with the training split's stats."""
    splits = (data.train, data.val, data.test)
    if scale > 0:
        for s in splits:
            s.inputs = (s.inputs * np.float32(scale)).astype(np.float32)
        return
    mean = data.train.inputs.mean(axis=0)
    std = data.train.inputs.std(axis=0) + 1e-6
    for s in splits:
        s.inputs = ((s.inputs - mean) / std).astype(np.float32)


def _frames(splits: splitting.Splits) -> dict[str, pd.DataFrame]:
    return {"train": splits.train, "val": splits.val, "test": splits.test.for_final_evaluation()}


def _texts(frame: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {c: frame[c].astype(str).to_numpy(object) for c in columns if c in frame.columns}


def _records(frame: pd.DataFrame) -> list[dict[str, str]]:
    context = frame["context"] if "context" in frame.columns else [""] * len(frame)
    return [
        {"instruction": str(p), "input": "" if pd.isna(c) else str(c), "output": str(r)}
        for p, c, r in zip(frame["prompt"], context, frame["response"])
    ]


def _lm_dataset(cfg: mc.ConfigDict, splits: splitting.Splits, tokenizer: Any) -> Dataset:
    from ftlab.data.text import lm_arrays

    if not cfg.template and "text" not in splits.train.columns:
        raise ConfigError(
            "config.data.template: prompt/response columns need a template (alpaca, chat or a "
            "JSON file); plain language modelling needs a 'text' column"
        )
    out = {}
    for name, frame in _frames(splits).items():
        data = _records(frame) if cfg.template else frame["text"].astype(str).tolist()
        if not len(frame):
            ids = np.zeros((0, cfg.max_length), np.int32)
            out[name] = Split(ids, ids.copy(), np.zeros(0, np.float32))
            continue
        arrays = lm_arrays(
            tokenizer, data, cfg.max_length, cfg.template, cfg.pack, cfg.train_on_inputs
        )
        labels = arrays["labels"]
        kept = {} if cfg.pack else _texts(frame, ("prompt", "context", "response", "text"))
        split = Split(arrays["inputs"], labels, (labels >= 0).sum(-1).astype(np.float32), kept)
        empty = split.weights == 0  # the prompt alone filled max_length: nothing to learn
        if empty.any():
            log.warning(
                "data %s: %d of %d examples have no response token within data.max_length=%d; "
                "skipped",
                name,
                int(empty.sum()),
                len(split),
                cfg.max_length,
            )
            if empty.all():
                raise ConfigError(
                    f"config.data.max_length: {cfg.max_length} tokens leave no response token "
                    f"in any {name} example; raise it"
                )
            split = split.take(np.flatnonzero(~empty))
        out[name] = split
    return Dataset(**out, task="causal_lm", num_outputs=0, class_names=[])


def _text_classification(
    cfg: mc.ConfigDict, splits: splitting.Splits, tokenizer: Any, names: list[str]
) -> Dataset:
    from ftlab.data.text import encode_classification

    out = {}
    for name, frame in _frames(splits).items():
        texts = frame["text"].astype(str).tolist()
        inputs = encode_classification(tokenizer, texts, cfg.max_length)
        out[name] = Split(inputs, frame["label"].to_numpy(np.int32), None, _texts(frame, ("text",)))
    num = max(len(names), int(out["train"].labels.max()) + 1)
    names = names or [str(i) for i in range(num)]
    return Dataset(**out, task="classification", num_outputs=num, class_names=list(names))


def source_splits(cfg: mc.ConfigDict, arrays: Any = None) -> tuple[Any, str, str]:
    """The source's tables split into train/val/test before any cleaning: ``(splits, task,
    label_map)``, where ``data.classes`` (kept and remapped) makes the label map."""
    frames = tables.load_tables(cfg, arrays=arrays)
    task = infer_task(
        frames["train"] if "train" in frames else next(iter(frames.values())), cfg.task
    )
    label_map = cfg.clean.label_map
    if cfg.classes:
        if task != "classification":
            raise ConfigError("config.data.classes: only classification data has classes")
        frames, label_map = _keep_classes(frames, tuple(cfg.classes))
    splits = splitting.make_splits(
        frames,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.split_seed,
        stratify=cfg.stratify and task == "classification",
    )
    return splits, task, label_map


def load_dataset(
    cfg: mc.ConfigDict,
    *,
    workdir: str | Path | None = None,
    tokenizer: str = "",
    arrays: Any = None,
) -> Dataset:
    """The train/val/test arrays ``cfg`` (``config.data``) describes.

    ``workdir``: where the rejected rows are written (``clean.rejects_file``; the loop passes
    none and writes ``data.rejected`` once the config has proved usable); ``tokenizer``:
    the tokenizer to use when ``data.tokenizer`` is empty (the pretrained model's directory).
    """
    splits, task, label_map = source_splits(cfg, arrays=arrays)
    if task != "seq2seq":  # data.task "auto" never infers text to text
        for key in ("source_prefix", "target_length"):
            if cfg.get(key):
                raise ConfigError(
                    f"config.data.{key}: only for text-to-text data (data.task 'seq2seq'); "
                    f"this data is {task!r}"
                )
    c = cfg.clean
    clean_cfg = {**c.to_dict(), "label_map": label_map}
    standardise_early = bool(cfg.balance.method) and not c.normalise and cfg.scale <= 0
    if standardise_early:  # statistics of the real training rows, not the resampled ones
        clean_cfg["normalise"] = "standardise"
    splits, clean_log = clean.clean(splits, clean_cfg, task=task)
    rejected = clean_log.get("malformed", {}).pop("rejected", [])
    for step, counts in clean_log.items():
        log.info("data clean %s: %s", step, counts)
    report: dict = {"cleaning": clean_log, "rejected_rows": len(rejected)}
    if cfg.balance.method:
        if task != "classification":
            raise ConfigError("config.data.balance.method: only classification data has classes")
        splits, resampled = balance.resample(
            splits,
            cfg.balance.method,
            cfg.balance.ratio,
            seed=cfg.split_seed,
            k_neighbors=cfg.balance.k_neighbors,
        )
        log.info("data balance: %s", resampled)
        report["balance"] = {"method": cfg.balance.method, **resampled}
    report["splits"] = splitting.split_report(splits)
    log.info("data splits:\n%s", splitting.format_report(report["splits"], splits.label_names))
    text_input = "text" in splits.train.columns
    tok = None
    if task in ("causal_lm", "seq2seq") or text_input:  # seq2seq: prompt -> response text
        from ftlab.data.text import load_tokenizer, with_pad_token

        tok = with_pad_token(load_tokenizer(cfg.tokenizer or tokenizer))
    if "audio" in splits.train.columns:  # speech recognition: log-mel features + transcripts
        from ftlab.data.audio import speech_dataset

        data = speech_dataset(cfg, _frames(splits), tok, cfg.tokenizer or tokenizer)
    elif task == "causal_lm":
        data = _lm_dataset(cfg, splits, tok)
    elif task == "seq2seq":  # text to text (T5): prompt (+ context) -> response
        from ftlab.data.text import text_to_text_dataset

        data = text_to_text_dataset(
            _frames(splits),
            tok,
            cfg.max_length,
            target_length=cfg.target_length,
            prefix=cfg.source_prefix,
        )
    elif text_input:
        data = _text_classification(cfg, splits, tok, list(splits.label_names or []))
    else:
        data = splitting.to_dataset(splits, task)
    if "group" in splits.train.columns and task != "causal_lm":  # for per-group metrics
        for name, frame in _frames(splits).items():
            getattr(data, name).text["group"] = frame["group"].astype(str).to_numpy(object)
    if cfg.train_per_class > 0:
        if task != "classification":
            raise ConfigError("config.data.train_per_class: only for classification data")
        before = len(data.train)
        data.train = _few_per_class(
            data.train, cfg.train_per_class, data.num_outputs, cfg.split_seed
        )
        report["train_per_class"] = {
            "per_class": cfg.train_per_class,
            "kept": len(data.train),
            "of": before,
        }
    scaled = c.normalise or standardise_early
    if task in ("classification", "regression") and not text_input and not scaled:
        _scale_inputs(data, cfg.scale)  # statistics from the (final) training split
    if task == "classification" and cfg.balance.class_weights:
        weights = balance.class_weights(splits, data.num_outputs)  # 'balanced', from train
        data.train.weights = weights[data.train.labels]
        log.info("data class weights: %s", np.round(weights, 4).tolist())
        report["class_weights"] = np.round(weights, 6).tolist()
    data.tokenizer = tok
    data.clean_log = clean_log
    data.report_log = report
    data.rejected = rejected
    if workdir is not None and rejected:
        write_rejects(Path(workdir) / c.rejects_file, rejected)
    return data


def write_rejects(path: Path, rows: list[dict]) -> None:
    """The rows cleaning skipped (split, row, column, reason, value), one JSON per line."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
