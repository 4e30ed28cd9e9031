"""Training-batch augmentation: deterministic in (seed, step), real pixel moves, soft labels."""

import json

import numpy as np
import pytest

from ftlab.config import ConfigError
from ftlab.data import augment

ALL = augment.ImageAugment(
    crop_padding=2, flip=True, rotate_degrees=10, brightness=0.2, contrast=0.2, mixup_alpha=0.4
)


def _batch(n=16, shape=(8, 8, 3), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, *shape)).astype(dtype)
    return {"inputs": x, "labels": rng.integers(0, 5, n).astype(np.int32)}


def _shifted(image, padding, dy, dx):
    """Oracle: the image moved by (padding - dy, padding - dx), zero where it left the frame."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    for i in range(h):
        for j in range(w):
            si, sj = i + dy - padding, j + dx - padding
            if 0 <= si < h and 0 <= sj < w:
                out[i, j] = image[si, sj]
    return out


def test_deterministic_per_seed_and_step_and_different_otherwise():
    batch = _batch()
    a = augment.augment_train_images(batch, step=3, seed=1, options=ALL, num_classes=5)
    b = augment.augment_train_images(batch, step=3, seed=1, options=ALL, num_classes=5)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    other_step = augment.augment_train_images(batch, step=4, seed=1, options=ALL, num_classes=5)
    other_seed = augment.augment_train_images(batch, step=3, seed=2, options=ALL, num_classes=5)
    assert not np.allclose(a["inputs"], other_step["inputs"])
    assert not np.allclose(a["inputs"], other_seed["inputs"])
    np.testing.assert_array_equal(batch["inputs"], _batch()["inputs"])  # input not modified


@pytest.mark.parametrize(
    "shape,dtype", [((8, 8, 3), np.float32), ((8, 8), np.float32), ((6, 6, 1), np.uint8)]
)
def test_shapes_and_dtypes_are_kept(shape, dtype):
    batch = _batch(shape=shape)
    batch["inputs"] = (batch["inputs"] * (255 if dtype == np.uint8 else 1)).astype(dtype)
    opts = augment.ImageAugment(
        crop_padding=1, flip=True, rotate_degrees=15, brightness=0.3, contrast=0.3
    )
    out = augment.augment_train_images(batch, step=0, seed=0, options=opts)
    assert out["inputs"].shape == batch["inputs"].shape and out["inputs"].dtype == dtype
    np.testing.assert_array_equal(out["labels"], batch["labels"])


def test_crops_are_shifts_of_the_image():
    image = (np.arange(36, dtype=np.float32) + 1).reshape(6, 6, 1)  # no zero pixels
    batch = {"inputs": np.stack([image] * 32), "labels": np.zeros(32, np.int32)}
    out = augment.augment_train_images(batch, 5, 0, augment.ImageAugment(crop_padding=2))
    candidates = {(dy, dx): _shifted(image, 2, dy, dx) for dy in range(5) for dx in range(5)}
    seen = set()
    for x in out["inputs"]:
        match = [k for k, c in candidates.items() if np.array_equal(x, c)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) > 3  # offsets really vary over the batch


def test_flips_mirror_or_keep_the_image():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    batch = {"inputs": np.stack([image] * 16), "labels": np.zeros(16, np.int32)}
    out = augment.augment_train_images(batch, 0, 0, augment.ImageAugment(flip=True))
    mirrored = image[:, [3, 2, 1, 0]]
    flipped = [np.array_equal(x, mirrored) for x in out["inputs"]]
    assert all(f or np.array_equal(x, image) for f, x in zip(flipped, out["inputs"]))
    assert 0 < sum(flipped) < 16


def test_rotation_direction_and_identity():
    image = np.arange(25, dtype=np.float32).reshape(1, 5, 5)
    np.testing.assert_allclose(augment.rotate(image, np.array([90.0]))[0], np.rot90(image[0]))
    np.testing.assert_allclose(augment.rotate(image, np.array([0.0])), image)
    small = augment.rotate(image, np.array([8.0]))
    assert not np.allclose(small, image)
    assert small[0, 2, 2] == pytest.approx(image[0, 2, 2])  # the centre stays


def test_colour_jitter_scales_brightness_and_contrast():
    batch = _batch(n=8)
    b = augment.augment_train_images(batch, 0, 0, augment.ImageAugment(brightness=0.3))
    ratio = b["inputs"] / batch["inputs"]
    per_image = ratio.reshape(8, -1)
    np.testing.assert_allclose(per_image, per_image[:, :1] * np.ones_like(per_image), rtol=1e-5)
    assert ((per_image[:, 0] >= 0.7 - 1e-6) & (per_image[:, 0] <= 1.3 + 1e-6)).all()
    assert np.unique(per_image[:, 0].round(5)).size > 1
    c = augment.augment_train_images(batch, 0, 0, augment.ImageAugment(contrast=0.3))
    x, y = batch["inputs"].reshape(8, -1), c["inputs"].reshape(8, -1)
    np.testing.assert_allclose(y.mean(1), x.mean(1), rtol=1e-5)
    scale = (y - y.mean(1, keepdims=True)) / (x - x.mean(1, keepdims=True))
    np.testing.assert_allclose(scale, scale[:, :1] * np.ones_like(scale), rtol=1e-3)


def test_mixup_mixes_images_and_labels_alike():
    k = 6
    images = np.stack([np.full((4, 4, 1), float(c), np.float32) for c in range(k)])
    batch = {"inputs": images, "labels": np.arange(k, dtype=np.int32)}
    out = augment.augment_train_images(batch, 2, 0, augment.ImageAugment(mixup_alpha=0.4), k)
    soft = out["labels"]
    assert soft.shape == (k, k) and soft.dtype == np.float32
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    assert (soft >= 0).all() and ((soft > 0).sum(1) <= 2).all()
    # image c was filled with value c: a mixed image is the label-weighted mean of classes
    np.testing.assert_allclose(out["inputs"][:, 0, 0, 0], soft @ np.arange(k), rtol=1e-5)
    assert not np.allclose(soft, np.eye(k))


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match="config.data.augment.crop_padding"):
        augment.ImageAugment(crop_padding=-1)
    with pytest.raises(ConfigError, match="config.data.augment.synonyms"):
        augment.TextAugment(synonym_prob=0.5)
    assert not augment.ImageAugment().active and ALL.active


# -- text --------------------------------------------------------------------------------------

TEXTS = [
    "the quick brown fox jumps over the lazy dog near the river bank today",
    "a quick test",
    "one",
]


def test_text_augmentation_is_deterministic_and_varies_by_step():
    opts = augment.TextAugment(swap_prob=0.2, deletion_prob=0.3)
    a = augment.augment_texts(TEXTS, 1, 0, opts)
    assert a == augment.augment_texts(TEXTS, 1, 0, opts)
    assert a != augment.augment_texts(TEXTS, 2, 0, opts)
    assert a != augment.augment_texts(TEXTS, 1, 1, opts)
    assert a[2] == "one"  # a single word is never deleted


def test_synonyms_from_table_and_file(tmp_path):
    table = {"quick": ["fast"], "Dog": ["hound", "hound"]}
    opts = augment.TextAugment(synonym_prob=1.0, synonyms=augment.load_synonyms(table))
    out = augment.augment_texts(TEXTS, 0, 0, opts)
    assert out[0] == "the fast brown fox jumps over the lazy hound near the river bank today"
    assert out[1] == "a fast test"
    file = tmp_path / "syn.json"
    file.write_text(json.dumps(table))
    assert augment.load_synonyms(str(file)) == {"quick": ("fast",), "dog": ("hound", "hound")}
    file.write_text(json.dumps({"quick": "fast"}))
    with pytest.raises(ConfigError, match="'quick' must be a non-empty list"):
        augment.load_synonyms(str(file))


def test_swap_permutes_and_deletion_keeps_order():
    words = TEXTS[0].split()
    swapped = augment.augment_texts(TEXTS, 0, 0, augment.TextAugment(swap_prob=0.3))[0].split()
    assert sorted(swapped) == sorted(words) and swapped != words
    deleted = augment.augment_texts(TEXTS, 0, 0, augment.TextAugment(deletion_prob=0.5))[0]
    kept = deleted.split()
    assert 0 < len(kept) < len(words)
    it = iter(words)
    assert all(w in it for w in kept)  # a subsequence: order kept
    batch = {"inputs": np.array(TEXTS, object), "labels": np.arange(3)}
    out = augment.augment_train_texts(batch, 0, 0, augment.TextAugment(deletion_prob=0.5))
    assert out["inputs"][0] == deleted and list(batch["inputs"]) == TEXTS
