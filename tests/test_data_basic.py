"""Loading, splitting, normalising and batching data, checked against independent numpy computations."""

from collections import Counter

import numpy as np
import pytest
import sklearn.datasets

from ftlab.config import ConfigError
from ftlab.data import Split, load_dataset
from ftlab.data.batches import eval_batches, steps_per_epoch, train_batch
from ftlab.schema import base_config

CLASSES = (5, 6, 7, 8, 9)


def data_cfg(**kw):
    c = base_config().data
    for k, v in kw.items():
        c[k] = v
    return c


def digits_cfg(**kw):
    kw.setdefault("classes", CLASSES)
    kw.setdefault("scale", 1.0)  # inputs unchanged: rows can be matched against the raw data
    return data_cfg(**kw)


def row_keys(inputs):
    inputs = np.ascontiguousarray(np.asarray(inputs, np.float32))
    return [r.tobytes() for r in inputs.reshape(len(inputs), -1)]


@pytest.fixture(scope="module")
def raw_digits():
    d = sklearn.datasets.load_digits()
    keep = np.isin(d.target, CLASSES)
    return d.images[keep].astype(np.float32), d.target[keep]


@pytest.fixture(scope="module")
def digits(raw_digits):
    return load_dataset(digits_cfg())


# ---------------------------------------------------------------- sklearn digits, class subset


def test_digits_classes_remapped(digits, raw_digits):
    assert digits.task == "classification"
    assert digits.num_outputs == 5
    assert digits.class_names == ["5", "6", "7", "8", "9"]
    for split in (digits.train, digits.val, digits.test):
        assert split.labels.dtype.kind == "i"
        assert set(np.unique(split.labels).tolist()) == {0, 1, 2, 3, 4}
        assert split.inputs.shape[1:] == (8, 8, 1)
    # every example's remapped label matches the original label of a raw row with those inputs
    raw_inputs, raw_labels = raw_digits
    label_of = {}
    for key, lab in zip(row_keys(raw_inputs), raw_labels):
        label_of.setdefault(key, set()).add(int(lab) - 5)
    for split in (digits.train, digits.val, digits.test):
        for key, lab in zip(row_keys(split.inputs), split.labels):
            assert int(lab) in label_of[key]


def test_digits_splits_disjoint_and_cover(digits, raw_digits):
    raw_inputs, _ = raw_digits
    parts = [digits.train, digits.val, digits.test]
    assert sum(len(p) for p in parts) == len(raw_inputs)
    got = sorted(k for p in parts for k in row_keys(p.inputs))
    assert got == sorted(row_keys(raw_inputs))  # same multiset: disjoint and covering
    # rows with unique contents appear in exactly one split
    counts = Counter(row_keys(raw_inputs))
    seen = [set(row_keys(p.inputs)) for p in parts]
    for key, n in counts.items():
        if n == 1:
            assert sum(key in s for s in seen) == 1


def test_digits_stratified_proportions(digits, raw_digits):
    _, raw_labels = raw_digits
    n = len(raw_labels)
    cfg = base_config().data
    sizes = {
        "test": cfg.test_fraction,
        "val": cfg.val_fraction,
        "train": 1 - cfg.test_fraction - cfg.val_fraction,
    }
    for name, frac in sizes.items():
        split = getattr(digits, name)
        assert abs(len(split) - frac * n) <= 2
        for c in range(5):
            n_c = int((raw_labels == CLASSES[c]).sum())
            got = int((split.labels == c).sum())
            assert abs(got - frac * n_c) <= 2, (name, c, got, frac * n_c)


def test_split_seed_determinism(digits):
    same = load_dataset(digits_cfg())
    other = load_dataset(digits_cfg(split_seed=1))
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(same, name).inputs, getattr(digits, name).inputs)
        np.testing.assert_array_equal(getattr(same, name).labels, getattr(digits, name).labels)
    assert sorted(row_keys(other.test.inputs)) != sorted(row_keys(digits.test.inputs))
    assert sorted(row_keys(other.train.inputs)) != sorted(row_keys(digits.train.inputs))


def test_train_per_class(digits):
    few = load_dataset(digits_cfg(train_per_class=3))
    assert len(few.train) == 15
    np.testing.assert_array_equal(np.bincount(few.train.labels, minlength=5), [3] * 5)
    full_train = set(row_keys(digits.train.inputs))
    assert set(row_keys(few.train.inputs)) <= full_train  # a subset of the training split
    np.testing.assert_array_equal(few.val.inputs, digits.val.inputs)
    np.testing.assert_array_equal(few.test.inputs, digits.test.inputs)
    with pytest.raises(ConfigError, match="train_per_class"):
        load_dataset(digits_cfg(train_per_class=1000))


def test_scale_multiplies(digits):
    scaled = load_dataset(digits_cfg(scale=1.0 / 16.0))
    for name in ("train", "val", "test"):
        np.testing.assert_allclose(
            getattr(scaled, name).inputs, getattr(digits, name).inputs / 16.0, rtol=1e-6
        )
        assert getattr(scaled, name).inputs.dtype == np.float32
    assert scaled.train.inputs.max() <= 1.0


def test_standardise_with_train_statistics(digits):
    std = load_dataset(digits_cfg(scale=0.0))
    raw_train = digits.train.inputs.astype(np.float64)
    mean, sd = raw_train.mean(axis=0), raw_train.std(axis=0)
    for name in ("train", "val", "test"):
        raw = getattr(digits, name).inputs.astype(np.float64)
        expected = (raw - mean) / (sd + 1e-6)
        got = getattr(std, name).inputs
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    varying = sd > 0
    t = std.train.inputs.astype(np.float64)
    np.testing.assert_allclose(t.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(t.std(axis=0)[varying], 1.0, atol=1e-3)
    v = std.val.inputs.astype(np.float64)
    assert np.abs(v.mean(axis=0)[varying]).max() > 1e-3  # val uses train's statistics, not its own


# ---------------------------------------------------------------- errors


def test_unknown_sklearn_name():
    with pytest.raises(ConfigError, match="data.name") as e:
        load_dataset(data_cfg(name="mnist_not_bundled"))
    assert "mnist_not_bundled" in str(e.value)


def test_unknown_class():
    with pytest.raises(ConfigError, match="data.classes") as e:
        load_dataset(data_cfg(classes=(3, 42)))
    assert "42" in str(e.value)


def test_missing_npz(tmp_path):
    path = tmp_path / "nothere.npz"
    with pytest.raises(ConfigError, match="data.path") as e:
        load_dataset(data_cfg(source="npz", path=str(path)))
    assert "nothere.npz" in str(e.value)


def test_npz_missing_labels(tmp_path):
    path = tmp_path / "nolabels.npz"
    np.savez(path, inputs=np.zeros((10, 3), np.float32))
    with pytest.raises(ConfigError, match="labels") as e:
        load_dataset(data_cfg(source="npz", path=str(path)))
    assert "nolabels.npz" in str(e.value)


def test_npz_length_mismatch(tmp_path):
    path = tmp_path / "mismatch.npz"
    np.savez(path, inputs=np.zeros((10, 3), np.float32), labels=np.zeros(9, np.int64))
    with pytest.raises(ConfigError, match="data.path"):
        load_dataset(data_cfg(source="npz", path=str(path)))


# ---------------------------------------------------------------- npz and regression


def test_npz_integer_labels_classification(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(90, 4)).astype(np.float64)
    labels = np.repeat(np.arange(3), 30).astype(np.int64)
    path = tmp_path / "cls.npz"
    np.savez(path, inputs=inputs, labels=labels)
    ds = load_dataset(data_cfg(source="npz", path=str(path), scale=1.0))
    assert ds.task == "classification"
    assert ds.num_outputs == 3
    assert ds.class_names == ["0", "1", "2"]
    assert ds.train.labels.ndim == 1
    assert ds.train.inputs.dtype == np.float32
    assert sum(len(s) for s in (ds.train, ds.val, ds.test)) == 90
    # labels travel with their inputs
    label_of = {k: int(lab) for k, lab in zip(row_keys(inputs), labels)}
    for s in (ds.train, ds.val, ds.test):
        assert [label_of[k] for k in row_keys(s.inputs)] == s.labels.tolist()


def test_npz_float_labels_regression(tmp_path):
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(50, 3)).astype(np.float32)
    labels = rng.normal(size=50).astype(np.float64)
    path = tmp_path / "reg.npz"
    np.savez(path, inputs=inputs, labels=labels)
    ds = load_dataset(data_cfg(source="npz", path=str(path), scale=1.0))
    assert ds.task == "regression"
    assert ds.num_outputs == 1
    assert ds.class_names == []
    for s in (ds.train, ds.val, ds.test):
        assert s.labels.ndim == 2 and s.labels.shape[1] == 1
        assert s.labels.dtype == np.float32
    label_of = {k: float(np.float32(lab)) for k, lab in zip(row_keys(inputs), labels)}
    for s in (ds.train, ds.val, ds.test):
        expected = [label_of[k] for k in row_keys(s.inputs)]
        np.testing.assert_allclose(
            ds.original_units(s.labels)[:, 0], expected, rtol=1e-5, atol=1e-5
        )
    # targets are standardised with the training split's statistics
    assert abs(ds.train.labels.mean()) < 1e-5 and abs(ds.train.labels.std() - 1) < 1e-3


def test_diabetes_is_regression():
    ds = load_dataset(data_cfg(name="diabetes"))
    d = sklearn.datasets.load_diabetes()
    assert ds.task == "regression"
    assert ds.num_outputs == 1
    assert ds.train.labels.shape == (len(ds.train), 1)
    assert sum(len(s) for s in (ds.train, ds.val, ds.test)) == len(d.target)
    all_labels = np.concatenate([ds.train.labels, ds.val.labels, ds.test.labels])
    np.testing.assert_allclose(
        np.sort(ds.original_units(all_labels)[:, 0]),
        np.sort(d.target.astype(np.float32)),
        rtol=1e-5,
    )


# ---------------------------------------------------------------- batching


def index_split(n, feat=2):
    """A split whose first input column is the example's index."""
    inputs = np.zeros((n, feat), np.float32)
    inputs[:, 0] = np.arange(n)
    return Split(inputs, np.arange(n, dtype=np.int32) % 3)


def batch_indices(batch):
    return batch["inputs"][:, 0].astype(int)


def test_train_batch_deterministic():
    split = index_split(50)
    for step in (0, 3, 17):
        a = train_batch(split, step, 8, seed=123)
        b = train_batch(split, step, 8, seed=123)
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    c = train_batch(split, 0, 8, seed=124)
    assert not np.array_equal(batch_indices(c), batch_indices(train_batch(split, 0, 8, seed=123)))


def test_train_batch_epoch_coverage():
    n, bs = 50, 8
    split = index_split(n)
    spe = steps_per_epoch(n, bs)
    assert spe == n // bs
    epoch1 = [batch_indices(train_batch(split, s, bs, seed=7)) for s in range(spe)]
    for b in epoch1:
        assert b.shape == (bs,)
    flat = np.concatenate(epoch1)
    assert len(np.unique(flat)) == len(flat) == spe * bs
    assert flat.min() >= 0 and flat.max() < n
    # labels travel with their inputs
    batch = train_batch(split, 2, bs, seed=7)
    np.testing.assert_array_equal(batch["labels"], batch_indices(batch) % 3)
    epoch2 = np.concatenate(
        [batch_indices(train_batch(split, spe + s, bs, seed=7)) for s in range(spe)]
    )
    assert len(np.unique(epoch2)) == len(epoch2)
    assert not np.array_equal(flat, epoch2)


def test_train_batch_sequential_without_shuffle():
    n, bs = 20, 6
    split = index_split(n)
    spe = n // bs
    for step in range(2 * spe + 1):
        i = step % spe
        expected = np.arange(i * bs, (i + 1) * bs)
        np.testing.assert_array_equal(
            batch_indices(train_batch(split, step, bs, seed=0, shuffle=False)), expected
        )


def test_train_batch_too_large_raises():
    with pytest.raises(ConfigError, match="train.batch_size"):
        train_batch(index_split(5), 0, 6, seed=0)
    with pytest.raises(ConfigError, match="train.batch_size"):
        steps_per_epoch(5, 6)


@pytest.mark.parametrize("n,bs", [(23, 8), (24, 8), (5, 8), (1, 4)])
def test_eval_batches_cover_split(n, bs):
    split = index_split(n, feat=3)
    batches = list(eval_batches(split, bs))
    shapes = {b["inputs"].shape for b in batches}
    assert len(shapes) == 1
    assert len({b["labels"].shape for b in batches}) == 1
    assert len({b["weights"].shape for b in batches}) == 1
    assert sum(float(b["weights"].sum()) for b in batches) == n
    for b in batches:
        assert set(np.unique(b["weights"]).tolist()) <= {0.0, 1.0}
    real_inputs = np.concatenate([b["inputs"][b["weights"] > 0] for b in batches])
    real_labels = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
    np.testing.assert_array_equal(real_inputs, split.inputs)
    np.testing.assert_array_equal(real_labels, split.labels)
