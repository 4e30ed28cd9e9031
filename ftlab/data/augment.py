"""Training-batch augmentation on the host, a pure function of (batch, seed, step).

A resumed run must see the same augmented batches as an uninterrupted one, so randomness
comes from ``np.random.default_rng([tag, seed, step, op])`` and never from global state.
Each operation draws from its own stream, so switching one on leaves the others' draws
unchanged. Only training batches are augmented: the public functions take a train batch
and its step; evaluation batches go to the model as they are.

Mixup turns integer labels into soft labels ``[B, num_classes]`` float32 that sum to 1;
the cross-entropy loss takes them as target distributions (``softmax_cross_entropy(logits,
labels)``) instead of one-hot encoding integer labels.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ftlab.config import ConfigError

_TAG = 0xA06  # keeps augmentation streams apart from the batch-order stream [seed, epoch]
_CROP, _FLIP, _ROTATE, _BRIGHT, _CONTRAST, _MIXUP = range(6)
_SYNONYM, _SWAP, _DELETE = range(10, 13)


def _rng(seed: int, step: int, op: int) -> np.random.Generator:
    if seed < 0 or step < 0:
        raise ValueError(f"augmentation needs seed >= 0 and step >= 0, got {seed}, {step}")
    return np.random.default_rng([_TAG, int(seed), int(step), op])


def _nonnegative(owner: object, prefix: str) -> None:
    for field in dataclasses.fields(owner):
        value = getattr(owner, field.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"config.{prefix}.{field.name}: must be >= 0, got {value}")


# -- images ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageAugment:
    """Image augmentations (``config.data.augment.*``); zero / False switches one off."""

    crop_padding: int = 0  # pad with zeros by this many pixels, crop back at a random offset
    flip: bool = False  # mirror left-right with probability 1/2
    rotate_degrees: float = 0.0  # rotate by an angle uniform in [-d, d] (bilinear, zero fill)
    brightness: float = 0.0  # multiply by a factor uniform in [1-b, 1+b]
    contrast: float = 0.0  # scale around the image mean by a factor uniform in [1-c, 1+c]
    mixup_alpha: float = 0.0  # mix pairs with weight ~ Beta(a, a); labels become soft

    def __post_init__(self) -> None:
        _nonnegative(self, "data.augment")

    @property
    def active(self) -> bool:
        return bool(
            self.crop_padding
            or self.flip
            or self.rotate_degrees
            or self.brightness
            or self.contrast
            or self.mixup_alpha
        )


def _as_nhwc(images: np.ndarray) -> np.ndarray:
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4:
        return images
    raise ValueError(
        f"image augmentation needs [N, H, W] or [N, H, W, C] inputs, got shape {images.shape}"
    )


def _cast_like(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.integer):
        info = np.iinfo(like.dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    return values.astype(like.dtype).reshape(like.shape)


def crop(images: np.ndarray, offsets: np.ndarray, padding: int) -> np.ndarray:
    """Zero-pad by ``padding`` and take the original size at ``offsets[n] = (dy, dx)``.

    ``dy, dx`` in ``[0, 2*padding]``; ``(padding, padding)`` gives the image back.
    """
    x = _as_nhwc(images)
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)  # [N, H]
    cols = offsets[:, 1, None] + np.arange(w)  # [N, W]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.reshape(images.shape)


def flip(images: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Mirror left-right the images where ``which`` is set."""
    x = _as_nhwc(images)
    out = np.where(which[:, None, None, None], x[:, :, ::-1], x)
    return out.reshape(images.shape)


def rotate(images: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Rotate each image counter-clockwise by ``degrees[n]`` about its centre (zero fill)."""
    x = _as_nhwc(images).astype(np.float32)
    out = np.stack(
        [
            ndimage.rotate(img, float(a), axes=(1, 0), reshape=False, order=1, mode="constant")
            for img, a in zip(x, degrees)
        ]
    )
    return _cast_like(out, images)


def brightness(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Scale every value of image ``n`` by ``factors[n]``."""
    x = _as_nhwc(images).astype(np.float32) * factors[:, None, None, None]
    return _cast_like(x, images)


def contrast(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Scale image ``n`` around its mean (over pixels and channels) by ``factors[n]``."""
    x = _as_nhwc(images).astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _cast_like((x - mean) * factors[:, None, None, None] + mean, images)


def mixup(
    images: np.ndarray, labels: np.ndarray, lam: float, perm: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``lam * x + (1 - lam) * x[perm]`` and the same mix of one-hot (or soft) labels."""
    if labels.ndim == 1:
        if num_classes <= 0:
            raise ValueError("mixup of integer labels needs num_classes > 0")
        labels = np.eye(num_classes, dtype=np.float32)[labels]
    soft = lam * labels.astype(np.float32) + (1.0 - lam) * labels[perm].astype(np.float32)
    x = lam * images.astype(np.float32) + (1.0 - lam) * images[perm].astype(np.float32)
    return _cast_like(x, images), soft.astype(np.float32)


def augment_train_images(
    batch: Mapping[str, np.ndarray],
    step: int,
    seed: int,
    options: ImageAugment,
    num_classes: int = 0,
) -> dict[str, np.ndarray]:
    """An augmented copy of the training batch at ``step`` (``inputs`` images, ``labels``).

    Order: crop, flip, rotate, brightness, contrast, mixup. Shapes and the image dtype are
    kept; with mixup, ``labels`` become float32 ``[B, num_classes]`` soft labels.
    """
    out = dict(batch)
    x = np.asarray(batch["inputs"])
    _as_nhwc(x)  # shape check
    n = len(x)
    if options.crop_padding:
        p = int(options.crop_padding)
        x = crop(x, _rng(seed, step, _CROP).integers(0, 2 * p + 1, size=(n, 2)), p)
    if options.flip:
        x = flip(x, _rng(seed, step, _FLIP).random(n) < 0.5)
    if options.rotate_degrees:
        d = float(options.rotate_degrees)
        x = rotate(x, _rng(seed, step, _ROTATE).uniform(-d, d, n))
    if options.brightness:
        b = float(options.brightness)
        x = brightness(x, _rng(seed, step, _BRIGHT).uniform(max(0.0, 1 - b), 1 + b, n))
    if options.contrast:
        c = float(options.contrast)
        x = contrast(x, _rng(seed, step, _CONTRAST).uniform(max(0.0, 1 - c), 1 + c, n))
    if options.mixup_alpha:
        rng = _rng(seed, step, _MIXUP)
        lam = float(rng.beta(options.mixup_alpha, options.mixup_alpha))
        x, out["labels"] = mixup(
            x, np.asarray(batch["labels"]), lam, rng.permutation(n), num_classes
        )
    out["inputs"] = x
    return out


# -- text -----------------------------------------------------------------------------------------


def load_synonyms(source: str | Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """A synonym table ``{word: [synonym, ...]}`` from a dict or a JSON file of that shape.

    Words are matched lower-cased; a word's own entry is the only one used (no symmetry is
    implied, so list both directions if both should be replaced).
    """
    key = "config.data.augment.synonyms"
    if isinstance(source, Mapping):
        raw, where = source, "synonym table"
    else:
        file = Path(source).expanduser()
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{key}: cannot read synonym file {str(file)!r}: {e}") from None
        where = str(file)
        if not isinstance(raw, dict):
            raise ConfigError(f"{key}: {where}: expected a JSON object {{word: [synonyms]}}")
    table = {}
    for word, syns in raw.items():
        if isinstance(syns, str) or not all(isinstance(s, str) for s in syns) or not syns:
            raise ConfigError(f"{key}: {where}: entry {word!r} must be a non-empty list of strings")
        table[str(word).lower()] = tuple(syns)
    return table


@dataclasses.dataclass(frozen=True)
class TextAugment:
    """EDA-style word operations on whitespace-split text (``config.data.augment.*``)."""

    synonym_prob: float = 0.0  # replace each word found in the table with this probability
    swap_prob: float = 0.0  # swap max(1, int(p * words)) random word pairs
    deletion_prob: float = 0.0  # drop each word with this probability (one word always kept)
    synonyms: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _nonnegative(self, "data.augment")
        for name in ("synonym_prob", "swap_prob", "deletion_prob"):
            if getattr(self, name) > 1:
                raise ConfigError(f"config.data.augment.{name}: must be <= 1")
        if self.synonym_prob and not self.synonyms:
            raise ConfigError(
                "config.data.augment.synonyms: synonym_prob > 0 needs a synonym table "
                "(a JSON file {word: [synonyms]})"
            )

    @property
    def active(self) -> bool:
        return bool(self.synonym_prob or self.swap_prob or self.deletion_prob)


def _replace_synonyms(words: list[str], table, prob: float, rng) -> list[str]:
    out = []
    for w in words:
        choices = table.get(w.lower())
        if choices and rng.random() < prob:
            w = choices[rng.integers(len(choices))]
        out.append(w)
    return out


def _swap(words: list[str], prob: float, rng) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(max(1, int(prob * len(words)))):
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    return words


def _delete(words: list[str], prob: float, rng) -> list[str]:
    if len(words) < 2:
        return words
    kept = [w for w, r in zip(words, rng.random(len(words))) if r >= prob]
    return kept or [words[rng.integers(len(words))]]


def augment_texts(texts: Sequence[str], step: int, seed: int, options: TextAugment) -> list[str]:
    """Synonym replacement, then swaps, then deletions; each text re-joined with spaces."""
    syn, swap, dele = (_rng(seed, step, op) for op in (_SYNONYM, _SWAP, _DELETE))
    out = []
    for text in texts:
        words = str(text).split()
        if options.synonym_prob:
            words = _replace_synonyms(words, options.synonyms, options.synonym_prob, syn)
        if options.swap_prob:
            words = _swap(words, options.swap_prob, swap)
        if options.deletion_prob:
            words = _delete(words, options.deletion_prob, dele)
        out.append(" ".join(words))
    return out


def augment_train_texts(
    batch: Mapping[str, np.ndarray], step: int, seed: int, options: TextAugment
) -> dict[str, np.ndarray]:
    """An augmented copy of a training batch whose ``inputs`` are raw strings (tokenise after)."""
    out = dict(batch)
    out["inputs"] = np.asarray(augment_texts(list(batch["inputs"]), step, seed, options), object)
    return out


# -- from the config ------------------------------------------------------------------------


def image_options(cfg: Any) -> ImageAugment:
    a = cfg.augment
    return ImageAugment(
        a.crop_padding, a.flip, a.rotate_degrees, a.brightness, a.contrast, a.mixup_alpha
    )


def text_options(cfg: Any) -> TextAugment:
    a = cfg.augment
    table = load_synonyms(a.synonyms) if a.synonyms else {}
    return TextAugment(a.synonym_prob, a.swap_prob, a.deletion_prob, table)


def augment_train_batch(cfg: Any, data: Any, batch: dict, step: int, seed: int) -> dict:
    """``config.data.augment`` applied to the training batch at ``step`` (a no-op when off).

    Text is augmented as words and tokenised again, so it needs the split's raw text
    (``batch["text"]["text"]``, present when text augmentation is on) and ``data.tokenizer``.
    Audio (``speed``, ``noise``) is augmented as waveforms whose log-mel features are computed
    again (``ftlab.data.audio``: the training split then carries ``inputs/waveform``).
    """
    raw = batch.pop("text", None)
    if isinstance(batch.get("inputs"), dict) and "waveform" in batch["inputs"]:
        from ftlab.data.audio import audio_options, augment_train_audio

        extractor = data.feature_extractor
        batch = augment_train_audio(batch, step, seed, audio_options(cfg), extractor)
    images = image_options(cfg)
    if images.active:
        batch = augment_train_images(batch, step, seed, images, data.num_outputs)
    words = text_options(cfg)
    if words.active:
        from ftlab.data.text import encode_classification

        texts = augment_texts([str(t) for t in raw["text"]], step, seed, words)
        encoded = encode_classification(data.tokenizer, texts, cfg.max_length)
        batch["inputs"] = {**batch["inputs"], **encoded}
    return batch
