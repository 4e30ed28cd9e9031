"""Every source type read from small files written here, column mapping, and the splits made
from what the source provides (checked against the written values and independent counts)."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from ftlab.config import ConfigError
from ftlab.data.clean import reject_malformed
from ftlab.data.splitting import HeldOut, make_splits, split_report, to_dataset
from ftlab.data.tables import HubOfflineError, load_tables


def hf(tmp_path, **kw):
    return {"source": "hf", "cache_dir": str(tmp_path / "hf_cache"), **kw}


@pytest.fixture
def reviews():
    return pd.DataFrame(
        {
            "sentence": ["good film", "bad plot", "fine acting", "dull", "great"],
            "sentiment": ["pos", "neg", "pos", "neg", "pos"],
            "gender": ["f", "m", "f", "m", "f"],
            "score": [0.5, 1.5, 2.5, 3.5, 4.5],
        }
    )


# -- files through HF datasets -----------------------------------------------------------------


def test_csv_directory_gives_its_splits_and_maps_columns(tmp_path, reviews):
    folder = tmp_path / "csv"
    folder.mkdir()
    reviews.iloc[:3].to_csv(folder / "train.csv", index=False)
    reviews.iloc[3:].to_csv(folder / "test.csv", index=False)
    cols = "text=sentence,label=sentiment,group=gender"
    tables = load_tables(hf(tmp_path, path=str(folder), columns=cols))
    assert set(tables) == {"train", "test"}
    assert list(tables["train"].columns) == ["text", "label", "group"]
    assert tables["train"]["text"].tolist() == reviews["sentence"][:3].tolist()
    assert tables["test"]["label"].tolist() == reviews["sentiment"][3:].tolist()
    assert tables["test"]["group"].tolist() == ["m", "f"]


def test_jsonl_file_with_format_and_split_mapping(tmp_path, reviews):
    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in reviews.to_dict("records")) + "\n")
    spec = hf(tmp_path, format="jsonl", path=str(path), columns={"text": "sentence"})
    tables = load_tables({**spec, "splits": {"train": "train"}})
    assert list(tables) == ["train"]
    assert tables["train"]["text"].tolist() == reviews["sentence"].tolist()


def test_parquet_tabular_features_star(tmp_path, reviews):
    path = tmp_path / "r.parquet"
    reviews[["score", "sentiment"]].assign(extra=[1, 2, 3, 4, 5]).to_parquet(path)
    tables = load_tables(hf(tmp_path, path=str(path), columns="label=sentiment,features=*"))
    frame = tables["train"]
    assert list(frame.columns) == ["label", "features.score", "features.extra"]
    np.testing.assert_array_equal(frame["features.score"], reviews["score"])
    list_form = load_tables(hf(tmp_path, path=str(path), columns="label=sentiment,features=extra"))
    assert list(list_form["train"].columns) == ["label", "features"]


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_imagefolder_decodes_images_and_keeps_class_names(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for split, cls, i in [
        ("train", "cat", 0),
        ("train", "cat", 1),
        ("train", "dog", 2),
        ("test", "dog", 3),
    ]:
        folder = tmp_path / "img" / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        written[f"{i}.png"] = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
        _png(folder / f"{i}.png", written[f"{i}.png"])
    (tmp_path / "img" / "train" / "dog" / "broken.png").write_bytes(b"not a png at all")

    tables = load_tables(hf(tmp_path, format="imagefolder", path=str(tmp_path / "img")))
    train = tables["train"]
    assert len(train) == 4 and len(tables["test"]) == 1
    assert train.attrs["label_names"] == ["cat", "dog"]
    decoded = [v for v in train["image"] if isinstance(v, np.ndarray)]
    assert len(decoded) == 3  # the broken file stays encoded for cleaning to reject
    expected = sorted(a.tobytes() for k, a in written.items() if k != "3.png")
    assert sorted(a.tobytes() for a in decoded) == expected
    np.testing.assert_array_equal(tables["test"]["image"].iloc[0], written["3.png"])
    assert Counter(train["label"]) == {0: 2, 1: 2}

    splits = make_splits(tables, val_fraction=0.25, stratify=False)
    cleaned, counts = reject_malformed(splits, tmp_path / "rejects.jsonl")
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert sum(counts[s] for s in ("train", "val", "test")) == 1
    assert len(rejects) == 1 and rejects[0]["reason"].startswith("undecodable image")
    assert "broken.png" in rejects[0]["value"]
    assert sum(cleaned.sizes().values()) == 4
    assert all(isinstance(v, np.ndarray) for v in cleaned.train["image"])


def test_save_to_disk_directory(tmp_path):
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "y": datasets.ClassLabel(names=["neg", "pos"])}
    )
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence": ["a", "b", "c"], "y": [0, 1, 1]}, features=features
            ),
            "validation": datasets.Dataset.from_dict(
                {"sentence": ["d"], "y": [0]}, features=features
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    tables = load_tables(
        {"source": "hf", "path": str(tmp_path / "saved"), "columns": "text=sentence,label=y"}
    )
    assert set(tables) == {"train", "validation"}
    assert tables["train"]["label"].tolist() == [0, 1, 1]
    assert tables["train"].attrs["label_names"] == ["neg", "pos"]
    splits = make_splits(tables, test_fraction=0.0)
    assert splits.val["text"].tolist() == ["d"] and splits.origin["val"] == "source"
    assert len(splits.test) == 0


# -- TFDS, arrays, bundled ---------------------------------------------------------------------


def test_tfds_data_source_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    spec = {
        "source": "tfds",
        "name": "mnist",
        "data_dir": str(tmp_path),
        "splits": "train=train,test=test",
    }
    with tfds.testing.mock_data(num_examples=6):
        tables = load_tables(spec)
        direct = tfds.data_source("mnist", split="test", data_dir=str(tmp_path), download=False)
        direct_rows = [direct[i] for i in range(len(direct))]
    assert set(tables) == {"train", "test"}
    assert len(tables["train"]) == 6 and len(tables["test"]) == 6
    assert tables["test"].attrs["label_names"] == [str(d) for d in range(10)]
    assert tables["test"]["label"].tolist() == [int(r["label"]) for r in direct_rows]
    for got, row in zip(tables["test"]["image"], direct_rows):
        np.testing.assert_array_equal(got, row["image"])
        assert got.shape == (28, 28, 1) and got.dtype == np.uint8


def test_tfds_without_split_names_is_an_error(tmp_path):
    import tensorflow_datasets as tfds

    with (
        tfds.testing.mock_data(num_examples=2),
        pytest.raises(ConfigError, match="config.data.splits"),
    ):
        load_tables({"source": "tfds", "name": "mnist", "data_dir": str(tmp_path)})


def test_arrays_per_split_and_single(tmp_path):
    images = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    tables = load_tables(
        {"source": "arrays", "columns": {"image": "x", "label": "y"}},
        arrays={
            "train": {"x": images, "y": np.array([0, 1, 0])},
            "test": {"x": images[:1], "y": [1]},
        },
    )
    assert set(tables) == {"train", "test"}
    for got, want in zip(tables["train"]["image"], images):
        np.testing.assert_array_equal(got, want)
    single = load_tables({"source": "arrays"}, arrays={"text": ["a", "b"], "label": [1, 0]})
    assert list(single) == ["train"] and single["train"]["text"].tolist() == ["a", "b"]


def test_sklearn_and_npz_sources(tmp_path):
    import sklearn.datasets

    digits = load_tables({"source": "sklearn", "name": "digits"})["train"]
    raw = sklearn.datasets.load_digits()
    assert len(digits) == len(raw.target)
    np.testing.assert_array_equal(digits["image"].iloc[5][..., 0], raw.images[5])
    assert digits.attrs["label_names"] == [str(c) for c in range(10)]
    np.savez(tmp_path / "d.npz", inputs=np.ones((4, 3)), labels=np.array([0, 1, 1, 0]))
    npz = load_tables({"source": "npz", "path": str(tmp_path / "d.npz")})["train"]
    assert npz["label"].tolist() == [0, 1, 1, 0] and npz["features"].iloc[0].shape == (3,)


# -- errors ------------------------------------------------------------------------------------


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError) as e:
        load_tables({"source": "hf", "name": "stanfordnlp/imdb"})
    assert "offline" in str(e.value) and "config.data.path" in str(e.value)


def test_hub_connection_failure_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/imdb' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HubOfflineError, match="config.data.path"):
        load_tables({"source": "hf", "name": "stanfordnlp/imdb"})


def test_column_mapping_errors(tmp_path, reviews):
    path = tmp_path / "r.csv"
    reviews.to_csv(path, index=False)
    with pytest.raises(ConfigError) as e:
        load_tables(hf(tmp_path, path=str(path), columns="text=review,label=sentiment"))
    assert "['review']" in str(e.value)
    for col in reviews.columns:
        assert col in str(e.value)  # lists the available columns
    with pytest.raises(ConfigError, match="not ftlab column names"):
        load_tables(hf(tmp_path, path=str(path), columns={"txt": "sentence"}))
    with pytest.raises(ConfigError, match="NAME=COLUMN"):
        load_tables(hf(tmp_path, path=str(path), columns="text"))
    with pytest.raises(ConfigError, match="config.data.path"):
        load_tables(hf(tmp_path, path=str(tmp_path / "missing.csv")))
    with pytest.raises(ConfigError, match="config.data.splits"):
        load_tables(hf(tmp_path, path=str(path), splits="val=validation"))


# -- splits ------------------------------------------------------------------------------------


def _labelled(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n * 7 // 10) + [1] * (n - n * 7 // 10))
    return pd.DataFrame(
        {"features": list(rng.normal(size=(n, 3))), "label": rng.permutation(labels)}
    )


def test_carved_splits_are_disjoint_seeded_and_stratified():
    frame = _labelled(200)
    a = make_splits({"train": frame}, val_fraction=0.2, test_fraction=0.1, seed=3)
    b = make_splits({"train": frame}, val_fraction=0.2, test_fraction=0.1, seed=3)
    c = make_splits({"train": frame}, val_fraction=0.2, test_fraction=0.1, seed=4)
    test_a = a.test.for_final_evaluation()
    assert (len(a.train), len(a.val), len(test_a)) == (140, 40, 20)
    parts = [set(a.train.index), set(a.val.index), set(test_a.index)]
    assert set().union(*parts) == set(range(200)) and sum(map(len, parts)) == 200
    assert list(b.val.index) == list(a.val.index)
    assert list(c.val.index) != list(a.val.index)
    for part in (a.train, a.val, test_a):
        assert part["label"].mean() == pytest.approx(0.3, abs=0.02)  # 70/30 kept in each split
    assert "carved" in a.origin["test"] and "stratified" in a.origin["val"]


def test_test_split_is_sealed_and_report_counts():
    frame = _labelled(100)
    splits = make_splits({"train": frame, "validation": frame.iloc[:10], "test": frame.iloc[10:30]})
    assert isinstance(splits.test, HeldOut)
    assert not hasattr(splits.test, "iloc") and not hasattr(splits.test, "loc")
    assert len(splits.train) == 100 and len(splits.val) == 10 and len(splits.test) == 20
    report = split_report(splits)
    want = Counter(frame["label"].iloc[10:30].tolist())
    assert report["test"]["labels"] == dict(sorted(want.items()))
    assert report["test"]["imbalance_ratio"] == pytest.approx(
        max(want.values()) / min(want.values())
    )
    assert report["train"]["size"] == 100 and report["val"]["origin"] == "source"
    data = to_dataset(splits)
    assert data.train.inputs.shape == (100, 3) and data.test.labels.shape == (20,)
    np.testing.assert_array_equal(
        data.test.inputs[0], frame["features"].iloc[10].astype(np.float32)
    )


def test_no_training_split_is_an_error():
    frame = _labelled(10)
    with pytest.raises(ConfigError, match="no training split"):
        make_splits({"a": frame, "b": frame})
    with pytest.raises(ConfigError, match="two source splits"):
        make_splits({"train": frame, "val": frame, "validation": frame})


@pytest.mark.parametrize("name", ["wine", "diabetes"])
def test_bundled_sets_reproduce_load_dataset(name):
    """Through tables -> make_splits -> to_dataset, a bundled set gets the very partition,
    arrays and target scaling that ftlab.data.load_dataset gives (a switch changes no result)."""
    from ftlab.data import load_dataset
    from ftlab.schema import base_config

    cfg = base_config().data
    cfg.source, cfg.name, cfg.scale, cfg.split_seed = "sklearn", name, 1.0, 7
    old = load_dataset(cfg)
    splits = make_splits(
        load_tables(cfg), val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=7
    )
    new = to_dataset(splits)
    assert (new.task, new.num_outputs, new.class_names) == (
        old.task,
        old.num_outputs,
        old.class_names,
    )
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(new, split).inputs, getattr(old, split).inputs)
        np.testing.assert_allclose(
            getattr(new, split).labels, getattr(old, split).labels, rtol=1e-6
        )


def test_configdict_spec():
    import ml_collections as mc

    cfg = mc.ConfigDict({"source": "arrays", "columns": {"text": "s", "label": "y"}, "splits": ""})
    tables = load_tables(cfg, arrays={"s": ["a", "b", "c"], "y": [0, 1, 0], "other": [1, 2, 3]})
    assert list(tables["train"].columns) == ["text", "label"]
