"""Do ftlab's Hugging Face exports load in transformers' PyTorch models with the same logits?

Two halves, because ftlab (jax) and torch live in different environments here:

    python experiments/check_encoder_export_in_torch.py --torch-python /tmp/torchvenv/bin/python

exports every tiny fixture (BERT, ViT, two ResNets, GPT-2, LLaMA) after importing it into ftlab,
plus a ResNet built and exported by ftlab alone (``hf_config_for``) and a BERT export carrying
a tokenizer, into a temporary directory together with ftlab's logits; then reruns this file
under the torch Python (``--check DIR``), which loads each directory with ``AutoModelFor...``
(and ``AutoTokenizer``), reports missing / unexpected / mismatched weights, and compares logits
with the fixture's PyTorch logits (written by transformers when the fixture was made) and with
ftlab's. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
ENCODERS = ("tiny_bert", "tiny_vit", "tiny_resnet", "tiny_resnet_basic")
DECODERS = ("tiny_gpt2", "tiny_llama")
TEXT = ["The cats sat on the mat", "the dog sat"]


# -- half 1: ftlab (jax) ---------------------------------------------------------------------
def _tokenizer(path: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    fast.save_pretrained(path)
    return fast(TEXT)["input_ids"]


def export_all(work: Path) -> None:
    import jax

    from ftlab.interop.hub import read_config
    from ftlab.interop.pretrained import export_hf, hf_config_for, load_pretrained
    from ftlab.models.resnet import ResNet

    def run(model, variables, batch):
        with jax.default_matmul_precision("highest"):
            return np.asarray(model.apply(variables, batch), np.float32)

    for name in ENCODERS:
        pretrained = load_pretrained(FIXTURES / name)
        model, variables = pretrained.model, pretrained.variables
        data = dict(np.load(FIXTURES / name / "inputs_logits.npz"))
        state = {k: v for k, v in variables.items() if k != "params"}
        source = None
        if name == "tiny_bert":
            source = work / "tokenizer_src"
            data["tokenized"] = np.asarray(_tokenizer(source), dtype=object)
            batch = {k: data[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        else:
            batch = data["pixel_values"].transpose(0, 2, 3, 1)
        out = export_hf(
            work / name, variables["params"], read_config(FIXTURES / name),
            model_state=state, source=source,
        )  # fmt: skip
        np.savez(out / "check.npz", ftlab_logits=run(model, variables, batch), **data)

    for name in DECODERS:
        p = load_pretrained(FIXTURES / name)
        data = dict(np.load(FIXTURES / name / "inputs_logits.npz"))
        batch = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
        out = export_hf(work / name, p.params, p.hf_config, source=p.path)
        np.savez(out / "check.npz", ftlab_logits=run(p.model, p.variables, batch), **data)

    # a ResNet that never saw Hugging Face: random weights and running statistics
    model = ResNet(
        depths=(1, 2), hidden_sizes=(8, 16), embedding_size=8, layer_type="basic", num_labels=3
    )
    pixels = np.random.default_rng(0).normal(size=(2, 3, 24, 24)).astype(np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), pixels.transpose(0, 2, 3, 1)))
    rng = np.random.default_rng(1)

    def fill(path, s):
        value = (0.3 * rng.normal(size=s.shape)).astype(np.float32)
        return np.abs(value) + 0.5 if path[-1].key == "var" else value

    import flax.linen as nn

    variables = jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))
    out = export_hf(
        work / "ftlab_resnet", variables["params"], hf_config_for(model),
        model_state={"batch_stats": variables["batch_stats"]},
    )  # fmt: skip
    logits = run(model, variables, pixels.transpose(0, 2, 3, 1))
    np.savez(out / "check.npz", ftlab_logits=logits, pixel_values=pixels)


# -- half 2: torch ---------------------------------------------------------------------------
def check_all(work: Path) -> list[str]:
    import torch
    import transformers

    rows = [
        f"transformers {transformers.__version__}, torch {torch.__version__}",
        "",
        (
            "| export | loaded as | missing / unexpected / mismatched | max abs diff vs fixture "
            "(PyTorch) logits | max abs diff vs ftlab logits |"
        ),
        "|---|---|---|---|---|",
    ]
    names = [*ENCODERS, *DECODERS, "ftlab_resnet"]
    for name in names:
        directory = work / name
        config = json.loads((directory / "config.json").read_text())
        arch = config["architectures"][0]
        auto = {
            "ForSequenceClassification": transformers.AutoModelForSequenceClassification,
            "ForImageClassification": transformers.AutoModelForImageClassification,
            "ForCausalLM": transformers.AutoModelForCausalLM,
            "LMHeadModel": transformers.AutoModelForCausalLM,
        }[next(k for k in ("ForSequenceClassification", "ForImageClassification",
                           "ForCausalLM", "LMHeadModel") if k in arch)]  # fmt: skip
        model, info = auto.from_pretrained(directory, output_loading_info=True)
        model.eval()
        data = dict(np.load(directory / "check.npz", allow_pickle=True))
        if "pixel_values" in data:
            inputs = {"pixel_values": torch.from_numpy(data["pixel_values"])}
        else:
            keys = ("input_ids", "attention_mask", "token_type_ids")
            inputs = {k: torch.from_numpy(data[k].astype(np.int64)) for k in keys if k in data}
        with torch.no_grad():
            logits = model(**inputs).logits.float().numpy()
        problems = "/".join(
            str(len(info.get(k) or ()))
            for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
        )
        vs_fixture = (
            f"{np.abs(logits - data['logits']).max():.1e}" if "logits" in data else "(no fixture)"
        )
        vs_ftlab = f"{np.abs(logits - data['ftlab_logits']).max():.1e}"
        rows.append(f"| {name} | {type(model).__name__} | {problems} | {vs_fixture} | {vs_ftlab} |")
        if "tokenized" in data:
            tok = transformers.AutoTokenizer.from_pretrained(directory)
            same = tok(TEXT)["input_ids"] == [list(x) for x in data["tokenized"]]
            rows.append(
                f"|  | AutoTokenizer -> {type(tok).__name__} | | ids equal to the source "
                f"tokenizer's: {same} | |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", default="/tmp/torchvenv/bin/python")
    parser.add_argument("--check", type=Path, help="(internal) the torch half on this directory")
    args = parser.parse_args()
    if args.check:
        print("\n".join(check_all(args.check)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_all(work)
        done = subprocess.run(
            [args.torch_python, __file__, "--check", str(work)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            sys.exit(done.stderr)
        print(done.stdout)


if __name__ == "__main__":
    main()
