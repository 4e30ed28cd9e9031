"""Train the two tiny tokenizers the recipes use under ``runlocal`` (offline stand-ins for
GPT-2's / LLaMA's BPE and BERT's WordPiece), saved as Hugging Face tokenizer directories
that ``transformers.AutoTokenizer`` loads.

    python configs/data/make_samples.py && python configs/assets/make_tokenizers.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).parent
DATA = HERE.parent / "data"


def corpus() -> list[str]:
    texts = []
    for line in (DATA / "e2e_sample.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["meaning_representation"], row["human_reference"]]
    for row in json.loads((DATA / "alpaca_sample.json").read_text()):
        texts += [row["instruction"], row["input"], row["output"]]
    texts += [json.loads(line)["sentence"] for line in (DATA / "sst2_sample.jsonl").open()]
    texts.append(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n### Input:\n### Response:\n"
    )
    return texts


def byte_bpe(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )


def wordpiece(texts: list[str]) -> PreTrainedTokenizerFast:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def main() -> None:
    texts = [t for t in corpus() if t]
    byte_bpe(texts).save_pretrained(HERE / "tiny_bpe")
    wordpiece(texts).save_pretrained(HERE / "tiny_wordpiece")


if __name__ == "__main__":
    main()
