"""``config.data`` switches reach the arrays the trainer sees: class balance, class weights,
augmentation of training batches only, text tokenisation, instruction masking."""

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from sklearn.utils.class_weight import compute_class_weight

from ftlab.data import augment, load_dataset
from ftlab.data.batches import eval_batches, train_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _breast_cancer(**overrides):
    return tiny_config(
        **{"data.name": "breast_cancer", "data.classes": (), "data.scale": 0.0, **overrides}
    )


def test_class_weights_weight_each_training_example_by_its_class():
    data = load_dataset(_breast_cancer(**{"data.balance.class_weights": True}).data)
    y = data.train.labels
    want = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    np.testing.assert_allclose(data.train.weights, want[y], rtol=1e-6)
    assert data.val.weights is None and data.test.weights is None  # training only
    batch = train_batch(data.train, 0, 16, seed=0)
    assert set(np.unique(batch["weights"])) <= set(want.astype(np.float32))


def test_smote_balances_the_training_split_only():
    plain = load_dataset(_breast_cancer().data)
    data = load_dataset(_breast_cancer(**{"data.balance.method": "smote"}).data)
    counts = np.bincount(data.train.labels)
    assert counts[0] == counts[1] == np.bincount(plain.train.labels).max()
    # same rows, standardised with the real training rows' statistics (sklearn's scaler here,
    # mean/std + 1e-6 without resampling: equal to ~1e-3)
    np.testing.assert_allclose(data.test.inputs, plain.test.inputs, atol=5e-3)
    np.testing.assert_array_equal(data.val.labels, plain.val.labels)


def test_augmentation_changes_training_batches_deterministically_never_eval():
    cfg = tiny_config(**{"data.augment.flip": True, "data.augment.crop_padding": 1})
    data = load_dataset(cfg.data)
    raw = train_batch(data.train, 3, 16, seed=0)
    once = augment.augment_train_batch(cfg.data, data, dict(raw), 3, 0)
    again = augment.augment_train_batch(cfg.data, data, dict(raw), 3, 0)
    later = augment.augment_train_batch(cfg.data, data, dict(raw), 4, 0)
    np.testing.assert_array_equal(once["inputs"], again["inputs"])
    assert not np.array_equal(once["inputs"], raw["inputs"])
    assert not np.array_equal(once["inputs"], later["inputs"])
    off = tiny_config()
    same = augment.augment_train_batch(off.data, data, dict(raw), 3, 0)
    np.testing.assert_array_equal(same["inputs"], raw["inputs"])
    first_eval = next(eval_batches(data.val, 8))  # evaluation reads the split as it is
    np.testing.assert_array_equal(first_eval["inputs"], data.val.inputs[:8])


def test_instruction_data_masks_the_prompt_and_keeps_texts_for_decoding():
    from ftlab.config import load_config

    cfg = load_config(f"{CONFIGS / 'alpaca_lora_llama7b.py'}:runlocal")
    data = load_dataset(cfg.data)
    tok = data.tokenizer
    row = 0
    ids, labels = data.train.inputs[row], data.train.labels[row]
    trained = labels[labels >= 0]
    # the trained targets are the response and eos, nothing of the prompt
    text = tok.decode(trained[:-1])
    assert text.strip() == data.train.text["response"][row].strip()
    assert trained[-1] == tok.eos_token_id
    assert data.train.weights[row] == len(trained)
    first = int(np.argmax(labels >= 0))  # labels[t] is the token at t + 1
    prompt = tok.decode(ids[: first + 1])
    assert prompt.startswith("Below is an instruction") and prompt.rstrip().endswith(
        "### Response:"
    )


def test_text_classification_tokenises_with_the_configured_tokenizer():
    from ftlab.config import load_config

    cfg = load_config(f"{CONFIGS / 'bert_sst2.py'}:runlocal")
    data = load_dataset(cfg.data)
    ids = data.train.inputs["input_ids"]
    mask = data.train.inputs["attention_mask"]
    assert ids.shape == mask.shape == (len(data.train), cfg.data.max_length)
    assert (ids[:, 0] == data.tokenizer.cls_token_id).all()
    assert (
        data.tokenizer.decode(ids[0][mask[0] == 1], skip_special_tokens=True)
        == str(data.train.text["text"][0]).lower()
    )


def test_group_column_gives_per_group_metrics_aligned_with_the_rows(tmp_path):
    from ftlab.train.loop import train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 3))
    y = (x[:, 0] + 0.5 * rng.normal(size=240) > 0).astype(int)
    rows = ["x1,x2,x3,label,group"]
    rows += [f"{a:.5f},{b:.5f},{c:.5f},{k},g{k}" for (a, b, c), k in zip(x, y)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(
        **{
            "data.source": "hf",
            "data.path": str(tmp_path / "data.csv"),
            "data.columns": "label=label,group=group,features=*",
            "data.classes": (),
            "data.scale": 0.0,
            "model.name": "mlp",
            "train.num_steps": 10,
            "train.eval_every": 10,
        }
    )
    test = train(cfg, tmp_path / "run")["test"]
    # group gk holds exactly the rows of class k, so its accuracy is class k's recall
    assert set(test["by_group"]) == {"g0", "g1"}
    for k in (0, 1):
        group = test["by_group"][f"g{k}"]
        assert group["accuracy"] == pytest.approx(test["recall_per_class"][k])
        assert group["n"] == int(np.sum(np.asarray(test["confusion_matrix"])[k]))
    accs = [g["accuracy"] for g in test["by_group"].values()]
    assert test["group_accuracy_gap"] == pytest.approx(max(accs) - min(accs))
