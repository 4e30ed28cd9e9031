"""The reference-recipe configs run end to end, shrunk by their ``runlocal`` argument, and the
full-size ones fail offline with a message that names the key and the local alternative."""

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from ftlab import checkpoint, tree
from ftlab.cli import main
from ftlab.config import load_config
from ftlab.interop.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _run(tmp_path, config: str, *overrides: str) -> Path:
    workdir = tmp_path / "run"
    assert main(["train", str(CONFIGS / config), "--workdir", str(workdir), *overrides]) == 0
    return workdir


def test_gpt2_e2e_lora_runlocal_trains_scores_decodes_and_exports(tmp_path):
    workdir = _run(
        tmp_path,
        "gpt2_e2e.py:lora,runlocal",
        "--config.export.hf=True",
        "--config.export.peft=True",
    )
    summary = json.loads((workdir / "summary.json").read_text())
    cfg = load_config(f"{CONFIGS / 'gpt2_e2e.py'}:lora,runlocal")
    width, layers, r = (
        cfg.model.hf_config.n_embd,
        cfg.model.hf_config.n_layer,
        cfg.method.lora.rank,
    )
    # q and v of every block: a (width, r) and b (r, width)
    assert summary["trainable_params"] == layers * 2 * r * (width + width)
    test = summary["test"]
    assert np.isfinite(test["perplexity"]) and test["perplexity"] > 1
    assert 0 <= test["bleu"] <= 100 and 0 <= test["rougeL"] <= 100
    rows = [json.loads(line) for line in (workdir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == test["generated_examples"] == cfg.eval.generate_examples
    assert all(r["references"] and r["prompt"].startswith("name[") for r in rows)

    # the Hugging Face export re-imports to the run's merged parameters, bit for bit
    saved = tree.flatten(checkpoint.load_pytree(workdir / "params"))
    imported = tree.flatten(load_pretrained(workdir / "hf").params)
    assert saved.keys() == imported.keys()
    for path, value in saved.items():
        np.testing.assert_array_equal(np.asarray(imported[path]), np.asarray(value), err_msg=path)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "hf")
    assert tokenizer("name[The Eagle]").input_ids  # the tokenizer travelled with the model
    adapter = json.loads((workdir / "peft_adapter" / "adapter_config.json").read_text())
    # q and v fuse into Hugging Face's c_attn as one rank-2r adapter with the same scaling
    assert adapter["target_modules"] == ["c_attn"] and adapter["r"] == 2 * r
    assert adapter["lora_alpha"] / adapter["r"] == cfg.method.lora.alpha / r


def test_gpt2_e2e_top_blocks_runlocal_trains_only_the_last_block(tmp_path):
    workdir = _run(tmp_path, "gpt2_e2e.py:top2,runlocal", "--config.eval.generate_examples=0")
    summary = json.loads((workdir / "summary.json").read_text())
    trained = summary["method_summary"].split("trained:")[-1]
    assert "h_1/" in trained and "h_0/" not in trained  # runlocal: 2 blocks, the last trains
    assert summary["trainable_params"] < summary["total_params"]


def test_t5_e2e_lora_runlocal_trains_decodes_scores_bleu_and_exports(tmp_path):
    """T5 as sequence to sequence on the E2E sample: LoRA on every attention's q and v,
    test meaning representations decoded by beam search and scored as GPT-2's are."""
    workdir = _run(
        tmp_path,
        "t5_e2e.py:lora,runlocal",
        "--config.train.num_steps=4",
        "--config.train.eval_every=2",
        "--config.checkpoint.every_steps=2",
        "--config.export.hf=True",
        "--config.export.peft=True",
    )
    summary = json.loads((workdir / "summary.json").read_text())
    cfg = load_config(f"{CONFIGS / 't5_e2e.py'}:lora,runlocal")
    hf, r = cfg.model.hf_config, cfg.method.lora.rank
    # q and v of the encoder's self attention and the decoder's self and cross attention
    kernels = 2 * hf.num_layers + 4 * hf.num_decoder_layers
    assert summary["task"] == "seq2seq"
    assert summary["trainable_params"] == kernels * r * (hf.d_model + hf.d_model)
    test = summary["test"]
    assert np.isfinite(test["perplexity"]) and 0 <= test["token_accuracy"] <= 1
    assert 0 <= test["bleu"] <= 100 and 0 <= test["chrf"] <= 100 and 0 <= test["rougeL"] <= 100
    rows = [json.loads(line) for line in (workdir / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == test["generated_examples"] == cfg.eval.generate_examples
    assert all(r["references"] and r["prompt"].startswith("name[") for r in rows)
    assert all(isinstance(r["output"], str) for r in rows)

    # the Hugging Face export re-imports to the run's merged parameters, bit for bit
    saved = tree.flatten(checkpoint.load_pytree(workdir / "params"))
    imported = tree.flatten(load_pretrained(workdir / "hf").params)
    assert saved.keys() == imported.keys()
    for path, value in saved.items():
        np.testing.assert_array_equal(np.asarray(imported[path]), np.asarray(value), err_msg=path)
    adapter = json.loads((workdir / "peft_adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q", "v"] and adapter["r"] == r


def test_alpaca_lora_runlocal_masks_the_prompt_and_accumulates(tmp_path):
    workdir = _run(tmp_path, "alpaca_lora_llama7b.py:runlocal")
    summary = json.loads((workdir / "summary.json").read_text())
    assert "lora r=8 alpha=16" in summary["method_summary"]
    assert "self_attn/q_proj" in summary["method_summary"]
    assert np.isfinite(summary["val"]["perplexity"])


def test_bert_sst2_runlocal_full_fine_tuning(tmp_path):
    workdir = _run(tmp_path, "bert_sst2.py:runlocal")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["trainable_params"] == summary["total_params"]
    assert set(summary["test"]) >= {"accuracy", "f1_macro", "confusion_matrix"}
    assert np.sum(summary["test"]["confusion_matrix"]) > 0


@pytest.mark.parametrize(
    "config",
    ["vit_cifar10.py:runlocal", "resnet50_cifar10.py:runlocal", "efficientnet_cifar10.py:runlocal"],
)
def test_image_recipes_compare_linear_probe_and_full(tmp_path, config):
    workdir = _run(tmp_path, config)
    results = json.loads((workdir / "results.json").read_text())
    text = json.dumps(results)
    assert "linear_probe" in text and "full" in text
    probe = json.loads((workdir / "linear_probe" / "summary.json").read_text())
    full = json.loads((workdir / "full" / "summary.json").read_text())
    assert "classifier/kernel" in probe["method_summary"]
    assert probe["trainable_params"] < full["trainable_params"] == full["total_params"]


@pytest.mark.parametrize(
    "config",
    ["gpt2_e2e.py", "t5_e2e.py", "alpaca_lora_llama7b.py", "bert_sst2.py"],
)
def test_full_size_recipes_fail_offline_naming_the_key(tmp_path, monkeypatch, capsys, config):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["train", str(CONFIGS / config), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    # the first thing it would fetch is named: the dataset (hub) or the model
    assert "offline" in err.lower()
    assert "config.data.name" in err or "config.model.pretrained" in err
    assert not (tmp_path / "run").exists()  # nothing written before the config is usable


def test_model_hub_id_offline_names_the_model_key(tmp_path, monkeypatch, capsys):
    """Data present locally, the model on the hub: the model key and the local way are named."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        [
            "train",
            str(CONFIGS / "bert_sst2.py") + ":runlocal",
            "--workdir",
            str(tmp_path / "run"),
            "--config.model.pretrained=bert-base-uncased",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "config.model.pretrained" in err and "offline" in err.lower()
    assert not (tmp_path / "run").exists()


def test_recipe_docstrings_name_source_and_target():
    for name in (
        "gpt2_e2e",
        "t5_e2e",
        "alpaca_lora_llama7b",
        "bert_sst2",
        "vit_cifar10",
        "resnet50_cifar10",
        "efficientnet_cifar10",
    ):
        doc = (CONFIGS / f"{name}.py").read_text().split('"""')[1]
        assert "Source:" in doc and "runlocal" in doc
