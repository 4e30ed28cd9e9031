"""Audio columns for speech recognition (Whisper): decoding, resampling, log-mel features,
transcripts as decoder targets, and speed / noise augmentation of training batches.

An ``audio`` column (``config.data.columns``: ``audio=file``) holds per row a file path
(relative paths are read from ``data.audio.root``, default: the directory of the table in
``data.path``), a 1-D array of samples at ``data.audio.sampling_rate``, or a Hugging Face
``Audio`` cell (``{"array", "sampling_rate"}`` or ``{"bytes", "path"}``); the ``text`` column
holds its transcript. WAV is read with scipy, FLAC / OGG with ``soundfile`` when it is installed.
Every clip is resampled to 16 kHz (``scipy.signal.resample_poly``), padded with silence or
truncated to the model's window (``2 * max_source_positions`` mel frames of 10 ms: 30 s for the
real models, fewer for a tiny one) and turned into log-mel features by transformers'
``WhisperFeatureExtractor`` (its numpy path; read from the model directory's
``preprocessor_config.json``). A file that cannot be read is a ``DataError`` naming the file,
split and row (``ftlab train`` exits 2 with that line).

Transcripts become decoder targets with the forced tokens Hugging Face's ``WhisperTokenizer``
puts first (``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` for
``data.audio.language = "en"``, ``data.audio.task = "transcribe"``) and ``<|endoftext|>``
last: ``decoder_input_ids`` are the tokens without the last, ``labels`` the tokens without the
first (HF's collator drops the leading start token and the model shifts the rest right), padded
to ``data.max_length`` (labels ``-100`` there). Each example is weighted by its target-token
count, as language-modelling examples are.

Augmentation (training batches only, a pure function of (seed, step) like the others):
``data.augment.speed = s`` resamples each clip by a factor uniform in ``[1 - s, 1 + s]`` (tempo
and pitch, Kaldi's speed perturbation); ``data.augment.noise = n`` adds Gaussian noise with a
standard deviation uniform in ``[0, n]`` times the clip's RMS. Both are off (0) by default;
when one is on, the training split also carries the padded waveforms
(``inputs/waveform``) and the features of each training batch are computed again from them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Mapping, Sequence
from math import gcd
from pathlib import Path
from typing import Any

import ml_collections as mc
import numpy as np
import pandas as pd

from ftlab.config import ConfigError
from ftlab.data import Dataset, Split
from ftlab.data.frames import DataError

log = logging.getLogger("ftlab")

RATE = 16_000  # Whisper's sampling rate
IGNORE_INDEX = -100
SPEECH_TASK = "seq2seq"  # the Dataset task of audio + transcript data
_TAG = 0xA0D10  # augmentation streams of audio, apart from the image/text ones
_SPEED, _NOISE = range(2)


# -- reading clips -------------------------------------------------------------------------


def _to_float(samples: np.ndarray) -> np.ndarray:
    """PCM or float samples as float32 in [-1, 1]; several channels are averaged."""
    x = np.asarray(samples)
    if x.dtype.kind == "i":
        x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    elif x.dtype.kind == "u":
        half = float(2 ** (8 * x.dtype.itemsize - 1))
        x = (x.astype(np.float32) - half) / half
    elif x.dtype.kind != "f":
        raise ValueError(f"samples of dtype {x.dtype} are not audio")
    x = x.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1 if x.shape[1] < x.shape[0] else 0)
    if x.ndim != 1:
        raise ValueError(f"audio of shape {x.shape}; expected mono (samples,) or (samples, ch)")
    return x


def resample(samples: np.ndarray, rate: int, target: int = RATE) -> np.ndarray:
    """``samples`` at ``rate`` Hz resampled to ``target`` Hz (polyphase, scipy)."""
    if rate == target:
        return np.asarray(samples, np.float32)
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def _read_file(source: Any, name: str) -> tuple[np.ndarray, int]:
    suffix = Path(name).suffix.lower()
    if suffix in ("", ".wav", ".wave"):
        from scipy.io import wavfile

        try:
            rate, samples = wavfile.read(source)
            return samples, int(rate)
        except Exception as e:
            if suffix:
                raise ValueError(f"not a readable WAV file ({type(e).__name__}: {e})") from e
    try:
        import soundfile
    except ImportError:
        raise ValueError(
            f"reading {suffix or 'this'} audio needs the soundfile package "
            "(pip install soundfile); scipy reads WAV only"
        ) from None
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=False)
    except Exception as e:
        raise ValueError(f"{type(e).__name__}: {e}") from e
    return samples, int(rate)


def read_audio(value: Any, root: str | Path = "", sampling_rate: int = RATE) -> np.ndarray:
    """One ``audio`` cell as float32 mono samples at 16 kHz. ``root``: the directory relative
    file paths are read from; ``sampling_rate``: the rate of cells that are bare arrays.
    Raises ``ValueError`` with the reason when the cell cannot be read."""
    if isinstance(value, Mapping):
        if value.get("array") is not None:
            rate = int(value.get("sampling_rate") or sampling_rate)
            return resample(_to_float(np.asarray(value["array"])), rate)
        if value.get("bytes"):
            samples, rate = _read_file(io.BytesIO(value["bytes"]), str(value.get("path") or ""))
            return resample(_to_float(samples), rate)
        value = value.get("path")
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_absolute() and root:
            path = Path(root) / path
        if not path.is_file():
            raise ValueError(f"no such file {str(path)!r}")
        samples, rate = _read_file(str(path), path.name)
        return resample(_to_float(samples), rate)
    if isinstance(value, (list, tuple, np.ndarray)):
        return resample(_to_float(np.asarray(value)), sampling_rate)
    raise ValueError(f"an audio cell of type {type(value).__name__} is no clip")


def audio_root(cfg: Any) -> str:
    """Where relative audio paths are read from: ``data.audio.root``, else the directory of
    the table in ``data.path`` (the path itself when it is a directory)."""
    audio = cfg.get("audio") if hasattr(cfg, "get") else None
    root = str(audio.get("root", "") if audio is not None else "")
    if root:
        return root
    path = Path(str(cfg.get("path", "") or "")).expanduser()
    if not str(path) or str(path) == ".":
        return ""
    return str(path if path.is_dir() else path.parent)


# -- features ------------------------------------------------------------------------------


def window_frames(model_dir: str | Path) -> int | None:
    """Mel frames of the model's window, ``2 * max_source_positions`` from its config.json
    (None when the directory has none)."""
    path = Path(str(model_dir)).expanduser() / "config.json"
    if not str(model_dir) or not path.is_file():
        return None
    positions = json.loads(path.read_text()).get("max_source_positions")
    return 2 * int(positions) if positions else None


def feature_extractor(model_dir: str | Path, num_mel_bins: int | None = None) -> Any:
    """The model directory's ``WhisperFeatureExtractor`` (``preprocessor_config.json``), else
    Whisper's defaults (80 mel bins, or ``num_mel_bins``)."""
    from transformers import WhisperFeatureExtractor

    path = Path(str(model_dir)).expanduser()
    if str(model_dir) and (path / "preprocessor_config.json").is_file():
        return WhisperFeatureExtractor.from_pretrained(str(path))
    return WhisperFeatureExtractor(feature_size=num_mel_bins or 80)


def log_mel(
    extractor: Any, clips: Sequence[np.ndarray], num_frames: int | None = None
) -> np.ndarray:
    """(n, mels, frames) float32 log-mel features of 16 kHz ``clips``, each padded with silence
    or truncated to ``num_frames`` frames (default: the extractor's 30 s window), exactly as
    ``extractor(clips, sampling_rate=16000, max_length=...)`` computes them."""
    frames = num_frames or extractor.nb_max_frames
    if not len(clips):
        return np.zeros((0, extractor.feature_size, frames), np.float32)
    out = extractor(
        [np.asarray(c, np.float32) for c in clips],
        sampling_rate=RATE,
        max_length=frames * extractor.hop_length,
        padding="max_length",
        truncation=True,
        return_tensors="np",
    )
    return np.asarray(out["input_features"], np.float32)


def pad_clips(clips: Sequence[np.ndarray], samples: int) -> np.ndarray:
    """(n, samples) float32: each clip truncated or zero-padded (silence) to ``samples``."""
    out = np.zeros((len(clips), samples), np.float32)
    for i, c in enumerate(clips):
        c = np.asarray(c, np.float32)[:samples]
        out[i, : len(c)] = c
    return out


# -- transcripts -----------------------------------------------------------------------------


def whisper_tokenizer(tokenizer: Any, language: str = "", task: str = "") -> Any:
    """``tokenizer`` with Whisper's forced prefix set (``set_prefix_tokens``); a tokenizer
    that is not Whisper's (no ``<|startoftranscript|>``) is a ``ConfigError``."""
    if not hasattr(tokenizer, "set_prefix_tokens") or tokenizer.convert_tokens_to_ids(
        "<|startoftranscript|>"
    ) in (None, tokenizer.unk_token_id):
        raise ConfigError(
            "config.data.tokenizer: speech data needs a Whisper tokenizer (with "
            f"<|startoftranscript|>, <|en|>, <|transcribe|>, <|notimestamps|>); got "
            f"{type(tokenizer).__name__}"
        )
    try:
        tokenizer.set_prefix_tokens(
            language=language or None, task=task or None, predict_timestamps=False
        )
    except (ValueError, KeyError) as e:
        raise ConfigError(f"config.data.audio: {e}") from None
    return tokenizer


def transcript_targets(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict:
    """``decoder_input_ids``, ``decoder_attention_mask`` and ``labels`` (n, max_length) for
    transcripts, with the tokenizer's forced prefix and EOS (see the module docstring);
    sequences longer than ``max_length + 1`` tokens are truncated (their EOS with them)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(texts)
    ids = np.full((n, max_length), pad, np.int32)
    mask = np.zeros((n, max_length), np.int32)
    labels = np.full((n, max_length), IGNORE_INDEX, np.int32)
    for i, text in enumerate(texts):
        tokens = tokenizer(str(text)).input_ids[: max_length + 1]
        width = len(tokens) - 1
        ids[i, :width] = tokens[:-1]
        mask[i, :width] = 1
        labels[i, :width] = tokens[1:]
    return {"decoder_input_ids": ids, "decoder_attention_mask": mask, "labels": labels}


# -- augmentation ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioAugment:
    speed: float = 0.0  # resample by a factor uniform in [1 - speed, 1 + speed]
    noise: float = 0.0  # Gaussian noise, std uniform in [0, noise] x the clip's RMS

    def __post_init__(self) -> None:
        if not 0 <= self.speed < 1:
            raise ConfigError(f"config.data.augment.speed: must be in [0, 1), got {self.speed}")
        if self.noise < 0:
            raise ConfigError(f"config.data.augment.noise: must be >= 0, got {self.noise}")

    @property
    def active(self) -> bool:
        return bool(self.speed or self.noise)


def audio_options(cfg: Any) -> AudioAugment:
    a = cfg.augment
    return AudioAugment(float(a.get("speed", 0.0)), float(a.get("noise", 0.0)))


def augment_waveforms(
    waves: np.ndarray, lengths: np.ndarray, step: int, seed: int, options: AudioAugment
) -> list[np.ndarray]:
    """Speed, then noise, on each clip's first ``lengths`` samples; clips of new lengths."""
    speed = np.random.default_rng([_TAG, int(seed), int(step), _SPEED])
    noise = np.random.default_rng([_TAG, int(seed), int(step), _NOISE])
    out = []
    for wave, n in zip(waves, lengths):
        x = np.asarray(wave[: int(n)], np.float32)
        if options.speed:
            factor = speed.uniform(1 - options.speed, 1 + options.speed)
            # played ``factor`` times faster: 16 kHz resampled as if it were 16 kHz * factor
            x = resample(x, round(RATE * factor / 100) * 100, RATE)
        if options.noise:
            rms = float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
            std = noise.uniform(0, options.noise) * rms
            x = x + noise.normal(0.0, 1.0, x.shape).astype(np.float32) * np.float32(std)
        out.append(x.astype(np.float32))
    return out


def augment_train_audio(
    batch: dict, step: int, seed: int, options: AudioAugment, extractor: Any
) -> dict:
    """A training batch whose ``inputs/waveform`` (and ``inputs/num_samples``) are augmented
    and turned into ``input_features`` again; the waveforms do not go on to the model."""
    inputs = dict(batch["inputs"])
    waves, lengths = inputs.pop("waveform"), inputs.pop("num_samples")
    if options.active:
        frames = inputs["input_features"].shape[-1]
        clips = augment_waveforms(waves, lengths, step, seed, options)
        inputs["input_features"] = log_mel(extractor, clips, frames)
    return {**batch, "inputs": inputs}


# -- the dataset ------------------------------------------------------------------------------


def _clip_name(value: Any, index: Any) -> str:
    """A clip's file name for reports (its path), or ``row <index>`` for in-memory audio."""
    if isinstance(value, Mapping):
        value = value.get("path") or None
    return str(value) if isinstance(value, (str, Path)) else f"row {index}"


def _clips(frame: pd.DataFrame, split: str, root: str, rate: int) -> list[np.ndarray]:
    clips = []
    for index, value in zip(frame.index, frame["audio"]):
        try:
            clips.append(read_audio(value, root, rate))
        except (ValueError, OSError) as e:
            what = f"audio file {str(value)!r}" if isinstance(value, (str, Path)) else "audio"
            raise DataError(f"{what} in split {split!r}, row {index}: {e}") from None
    return clips


def speech_dataset(
    cfg: mc.ConfigDict, frames: Mapping[str, pd.DataFrame], tokenizer: Any, model_dir: str
) -> Dataset:
    """Train / val / test of log-mel features and transcript targets (see the module doc).

    ``frames``: the cleaned splits (``audio`` and ``text`` columns); ``tokenizer``: a Whisper
    tokenizer; ``model_dir``: the model's directory (its ``preprocessor_config.json`` and the
    window from ``config.json``)."""
    if "text" not in frames["train"].columns:
        raise ConfigError("config.data.columns: audio data needs a 'text' column (transcripts)")
    audio = cfg.get("audio", mc.ConfigDict())
    tokenizer = whisper_tokenizer(tokenizer, audio.get("language", ""), audio.get("task", ""))
    extractor = feature_extractor(model_dir)
    frames_n = int(audio.get("num_frames", 0) or 0) or window_frames(model_dir)
    frames_n = frames_n or extractor.nb_max_frames
    samples = frames_n * extractor.hop_length
    root, rate = audio_root(cfg), int(audio.get("sampling_rate", RATE) or RATE)
    augment = audio_options(cfg).active
    out = {}
    for name, frame in frames.items():
        clips = _clips(frame, name, root, rate)
        longer = sum(len(c) > samples for c in clips)
        if longer:
            log.warning(
                "data %s: %d of %d clips are longer than the model's %.1f s window; truncated",
                name,
                longer,
                len(clips),
                samples / RATE,
            )
        texts = frame["text"].astype(str).tolist()
        targets = transcript_targets(tokenizer, texts, int(cfg.max_length))
        labels = targets.pop("labels")
        inputs = {"input_features": log_mel(extractor, clips, frames_n), **targets}
        if augment and name == "train":
            inputs["waveform"] = pad_clips(clips, samples)
            inputs["num_samples"] = np.array([min(len(c), samples) for c in clips], np.int32)
        weights = (labels >= 0).sum(-1).astype(np.float32)
        kept = {
            "text": np.asarray(texts, object),
            "audio": np.asarray(
                [_clip_name(v, i) for i, v in zip(frame.index, frame["audio"])], object
            ),
        }
        out[name] = Split(inputs, labels, weights, kept)
    data = Dataset(**out, task=SPEECH_TASK, num_outputs=0, class_names=[])
    data.tokenizer = tokenizer
    data.feature_extractor = extractor
    return data
