"""Tokenizer loading, classification encoding, LM packing/padding and instruction masks.

The tokenizers are trained here on a few sentences with the `tokenizers` library, saved with
`PreTrainedTokenizerFast.save_pretrained` and loaded back through `AutoTokenizer`: no network.
"""

import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ftlab.config import ConfigError
from ftlab.data import text

EOS = "<|endoftext|>"
CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hello.\n\n### Response:\n"
)
RECORDS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello world!"},
    {"instruction": "Name a colour.", "output": "Blue, the colour of the sky."},
]
CORPUS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "hello world the sum is five",
] * 4


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """GPT-2-like: byte-level BPE, eos only, no pad token, with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS + [ALPACA_INPUT, ALPACA_NO_INPUT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)
    fast.chat_template = CHAT
    path = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bpe(bpe_dir):
    return text.load_tokenizer(str(bpe_dir))


@pytest.fixture(scope="module")
def wordlevel(tmp_path_factory):
    """LLaMA-like specials: the post-processor adds <s> before and </s> after every text."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = CORPUS + [ALPACA_INPUT, ALPACA_NO_INPUT] + [json.dumps(r) for r in RECORDS]
    tok.train_from_iterator(
        words, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="[PAD]"
    )
    path = tmp_path_factory.mktemp("wordlevel")
    fast.save_pretrained(path)
    return text.load_tokenizer(str(path))


# -- loading -----------------------------------------------------------------------------------


def test_load_local_dir_with_autotokenizer_sets_pad_to_eos(bpe_dir, caplog):
    with caplog.at_level(logging.INFO, logger="ftlab"):
        tok = text.load_tokenizer(str(bpe_dir))
    reference = AutoTokenizer.from_pretrained(str(bpe_dir))
    assert reference.pad_token is None  # the saved tokenizer really has no pad token
    assert tok.pad_token == EOS and tok.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text
    sentence = "the dog sat in the park"
    assert tok(sentence)["input_ids"] == reference(sentence)["input_ids"]
    assert tok.decode(tok(sentence)["input_ids"]) == sentence


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(text.TokenizerOfflineError) as err:
        text.load_tokenizer("ftlab-no-such-owner/no-such-tokenizer")
    msg = str(err.value)
    assert "config.data.tokenizer" in msg and "offline" in msg and "save_pretrained" in msg


def test_missing_dir_and_file_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        text.load_tokenizer(str(tmp_path / "a" / "b"))
    file = tmp_path / "tokenizer.json"
    file.write_text("{}")
    with pytest.raises(ConfigError, match="is a file"):
        text.load_tokenizer(str(file))


# -- classification ------------------------------------------------------------------------------


def test_classification_truncates_and_pads(wordlevel):
    texts = ["the cat", "a dog ran in the park and the cat ran too", "hello"]
    enc = text.encode_classification(wordlevel, texts, max_length=6)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (3, 6)
    assert enc["input_ids"].dtype == enc["attention_mask"].dtype == np.int32
    for row, t in enumerate(texts):
        ids = wordlevel(t)["input_ids"]  # <s> ... </s>
        n = min(len(ids), 6)
        assert enc["attention_mask"][row].tolist() == [1] * n + [0] * (6 - n)
        assert (enc["input_ids"][row, n:] == wordlevel.pad_token_id).all()
        if len(ids) <= 6:
            assert enc["input_ids"][row, :n].tolist() == ids
        else:  # truncation keeps the specials and cuts the text
            got = enc["input_ids"][row].tolist()
            assert got[0] == wordlevel.bos_token_id and got[-1] == wordlevel.eos_token_id
            assert got[1:-1] == ids[1:5]
    with pytest.raises(ConfigError, match="config.data.max_length"):
        text.encode_classification(wordlevel, texts, max_length=0)


# -- causal LM -----------------------------------------------------------------------------------


def test_packing_keeps_every_token_once_in_order(bpe):
    docs = CORPUS[:3]
    stream = []
    for d in docs:
        stream += bpe(d, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    block = 7
    out = text.pack_examples(text.encode_texts(bpe, docs), block, bpe.eos_token_id)
    blocks = (len(stream) - 1) // block
    assert out["inputs"].shape == out["labels"].shape == (blocks, block)
    assert out["inputs"].dtype == np.int32
    assert out["inputs"].reshape(-1).tolist() == stream[: blocks * block]
    assert out["labels"].reshape(-1).tolist() == stream[1 : blocks * block + 1]
    with pytest.raises(ConfigError, match="config.data.max_length"):
        text.pack_examples(text.encode_texts(bpe, ["the cat"]), 50, bpe.eos_token_id)


def test_unpacked_examples_are_padded_and_shifted(bpe):
    docs = ["the cat sat on the mat", "hello"]
    out = text.lm_arrays(bpe, docs, max_length=8)
    assert out["inputs"].shape == out["labels"].shape == (2, 8)
    for row, d in enumerate(docs):
        ids = (bpe(d, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id])[:8]
        n = len(ids)
        assert out["inputs"][row].tolist() == ids + [bpe.pad_token_id] * (8 - n)
        assert out["labels"][row].tolist() == ids[1:] + [text.IGNORE_INDEX] * (8 - n + 1)


def test_lm_loss_args_feed_masked_lm_loss(bpe):
    import jax.numpy as jnp

    from ftlab.train.losses import masked_lm_loss

    out = text.lm_arrays(bpe, RECORDS, max_length=64, template="alpaca")
    labels = out["labels"]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=labels.shape + (len(bpe),)).astype(np.float32)
    targets, mask = text.lm_loss_args(jnp.asarray(labels))
    got = float(masked_lm_loss(jnp.asarray(logits), targets, mask))
    keep = labels != text.IGNORE_INDEX
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0][keep]
    assert keep.sum() > 0 and got == pytest.approx(expected.mean(), rel=1e-5)


# -- instruction formatting ----------------------------------------------------------------------


def test_alpaca_template_text_is_exact():
    assert text.ALPACA.prompt("Add the numbers.", "2 and 3") == ALPACA_INPUT
    assert text.ALPACA.prompt("Say hello.") == ALPACA_NO_INPUT
    assert text.ALPACA.prompt("Say hello.", "") == ALPACA_NO_INPUT
    assert text.ALPACA_LEGACY.prompt("Say hello.") == ALPACA_NO_INPUT[:-1]
    assert text.ALPACA.response(ALPACA_NO_INPUT + "Hello world!") == "Hello world!"


def _check_masked_prompt(tok, ex, prompt_ids):
    n = len(prompt_ids)
    assert ex.ids[:n].tolist() == prompt_ids
    assert not ex.trainable[:n].any() and ex.trainable[n:].all()
    padded = text.pad_examples([ex], 80, tok.pad_token_id)
    labels = padded["labels"][0]
    # the targets are exactly the response tokens and eos
    trained = labels[labels != text.IGNORE_INDEX].tolist()
    assert trained == ex.ids[n:].tolist()
    assert trained[-1] == tok.eos_token_id
    return tok.decode(trained)


def test_instruction_masks_exactly_the_prompt_tokens(bpe):
    examples = text.encode_instructions(bpe, RECORDS, text.ALPACA, cutoff_len=256)
    for record, ex in zip(RECORDS, examples):
        prompt = text.ALPACA.prompt(record["instruction"], record.get("input", ""))
        prompt_ids = bpe(prompt)["input_ids"]
        decoded = _check_masked_prompt(bpe, ex, prompt_ids)
        assert decoded == record["output"] + EOS


def test_instruction_keeps_bos_and_drops_appended_eos(wordlevel):
    examples = text.encode_instructions(wordlevel, RECORDS, text.ALPACA, cutoff_len=256)
    for record, ex in zip(RECORDS, examples):
        prompt = text.ALPACA.prompt(record["instruction"], record.get("input", ""))
        prompt_ids = [wordlevel.bos_token_id] + wordlevel(prompt, add_special_tokens=False)[
            "input_ids"
        ]
        _check_masked_prompt(wordlevel, ex, prompt_ids)
        response = wordlevel(record["output"], add_special_tokens=False)["input_ids"]
        assert ex.ids[len(prompt_ids) :].tolist() == response + [wordlevel.eos_token_id]
        assert (ex.ids == wordlevel.eos_token_id).sum() == 1


def test_prompt_merging_across_the_boundary_keeps_prompt_tokens(bpe, tmp_path):
    file = tmp_path / "qa.json"
    file.write_text(
        json.dumps(
            {
                "prompt_input": "Q: {instruction} {input} A: ",
                "prompt_no_input": "Q: {instruction} A: ",
                "response_split": "A:",
            }
        )
    )
    template = text.load_template(str(file))
    record = {"instruction": "the cat", "output": "sat on the mat"}
    prompt = template.prompt("the cat")
    prompt_ids = bpe(prompt)["input_ids"]
    full_ids = bpe(prompt + record["output"])["input_ids"]
    assert full_ids[: len(prompt_ids)] != prompt_ids  # the merge this test is about happens
    (ex,) = text.encode_instructions(bpe, [record], template)
    decoded = _check_masked_prompt(bpe, ex, prompt_ids)
    assert decoded == record["output"] + EOS
    assert bpe.decode(ex.ids.tolist()) == prompt + record["output"] + EOS


def test_cutoff_len_truncates_like_alpaca_lora(bpe):
    full = text.encode_instructions(bpe, RECORDS[:1], text.ALPACA, cutoff_len=256)[0]
    cut = text.encode_instructions(bpe, RECORDS[:1], text.ALPACA, cutoff_len=len(full) - 2)[0]
    assert len(cut) == len(full) - 2
    assert cut.ids.tolist() == full.ids[: len(full) - 2].tolist()
    assert cut.ids[-1] != bpe.eos_token_id  # a cut example loses its eos
    on_inputs = text.encode_instructions(bpe, RECORDS[:1], train_on_inputs=True)[0]
    assert on_inputs.trainable.all()


def test_chat_template_path(bpe):
    record = {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello world!"},
        ]
    }
    examples = text.encode_instructions(bpe, [record, RECORDS[0]], "chat")
    prompt = bpe.apply_chat_template(
        record["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>Say hello.\n<|assistant|>"  # the template really is used
    prompt_ids = bpe(prompt, add_special_tokens=False)["input_ids"]
    decoded = _check_masked_prompt(bpe, examples[0], prompt_ids)
    assert decoded == "Hello world!\n" + EOS
    alpaca_prompt = "<|user|>Add the numbers.\n\n2 and 3\n<|assistant|>"
    decoded = _check_masked_prompt(bpe, examples[1], bpe(alpaca_prompt)["input_ids"])
    assert decoded == "The sum is 5.\n" + EOS


def test_chat_without_template_and_bad_inputs_are_errors(wordlevel, tmp_path):
    with pytest.raises(ConfigError, match="chat_template"):
        text.encode_instructions(wordlevel, RECORDS, "chat")
    with pytest.raises(ConfigError, match="row 1 lacks the 'output'"):
        text.encode_instructions(wordlevel, [RECORDS[0], {"instruction": "x"}])
    with pytest.raises(ConfigError, match="config.data.template"):
        text.load_template(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "prompt_input": "{instruction}",
                "prompt_no_input": "{instruction}",
                "response_split": "A:",
            }
        )
    )
    with pytest.raises(ConfigError, match=r"prompt_input lacks the \{input\}"):
        text.load_template(str(bad))


def test_lm_arrays_instruction_packed_keeps_prompt_masks(bpe):
    examples = text.encode_instructions(bpe, RECORDS, text.ALPACA)
    packed = text.lm_arrays(bpe, RECORDS, max_length=16, template="alpaca", pack=True)
    ids = np.concatenate([e.ids for e in examples])
    trainable = np.concatenate([e.trainable for e in examples])
    n = packed["inputs"].size
    assert packed["inputs"].reshape(-1).tolist() == ids[:n].tolist()
    expected = np.where(trainable[1 : n + 1], ids[1 : n + 1], text.IGNORE_INDEX)
    assert packed["labels"].reshape(-1).tolist() == expected.tolist()
