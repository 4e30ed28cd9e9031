"""Text to token arrays: tokenizer loading, classification encoding, causal-LM examples.

Everything here runs on the host with numpy and returns fixed-shape int32 arrays, so the
batches stay a pure function of (seed, step) and the jitted step compiles once.

Causal-LM convention (what ``losses.masked_lm_loss`` takes, via ``lm_loss_args``):
``inputs[i, t]`` is a token id and ``labels[i, t]`` is the token the model must predict at
position ``t`` (the *next* token, already shifted), or ``IGNORE_INDEX`` where nothing is
trained there: prompt tokens, padding, the last real position. The shift is done here, once,
so the loss never needs to know about it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.config import ConfigError

log = logging.getLogger("ftlab")

IGNORE_INDEX = -100  # label value for positions outside the loss (as in Hugging Face)
TOKENIZER_KEY = "config.data.tokenizer"


class TokenizerOfflineError(ConfigError):
    """A hub id was given for the tokenizer but the Hugging Face Hub cannot be reached."""


# -- loading ----------------------------------------------------------------------------------


def _offline_message(name: str, reason: str) -> str:
    return (
        f"{TOKENIZER_KEY}: {name!r} is not a local directory, so it was taken as a Hugging Face "
        f"Hub id, but {reason}. This machine is offline (or cannot reach huggingface.co). "
        "On a machine with network access run "
        f"`AutoTokenizer.from_pretrained({name!r}).save_pretrained(DIR)` (or "
        f"`huggingface-cli download {name} --local-dir DIR`), copy DIR here and set "
        f"{TOKENIZER_KEY}=DIR (a directory holding tokenizer.json / tokenizer_config.json)."
    )


def load_tokenizer(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Any:
    """A ``transformers.AutoTokenizer`` from a local directory, or from the hub when online.

    A tokenizer without a pad token (GPT-2, LLaMA) gets ``pad = eos``: padded positions are
    never trained (labels ``IGNORE_INDEX``, attention mask 0), so the reuse is harmless.
    """
    from transformers import AutoTokenizer

    from ftlab.interop.hub import hub_offline, looks_like_hub_id

    text = os.fspath(name_or_path)
    if not text:
        raise ConfigError(f"{TOKENIZER_KEY}: empty; set it to a tokenizer directory or hub id")
    path = Path(text).expanduser()
    if path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise ConfigError(
                f"{TOKENIZER_KEY}: cannot load a tokenizer from directory {text!r} "
                f"({type(e).__name__}: {e}); it should hold tokenizer.json or the files "
                "written by `tokenizer.save_pretrained`"
            ) from e
    elif path.exists():
        raise ConfigError(
            f"{TOKENIZER_KEY}: {text!r} is a file; pass the directory that holds it "
            "(with tokenizer_config.json)"
        )
    elif not looks_like_hub_id(text):
        raise ConfigError(f"{TOKENIZER_KEY}: tokenizer directory {text!r} does not exist")
    else:
        offline = hub_offline("TRANSFORMERS_OFFLINE")
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                text, revision=revision, local_files_only=offline
            )
        except Exception as e:
            if type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
                raise ConfigError(
                    f"{TOKENIZER_KEY}: the Hugging Face Hub answered {type(e).__name__} for "
                    f"{text!r}: {e}"
                ) from e
            reason = (
                "this machine is offline (HF_HUB_OFFLINE set, or the Hub unreachable) and it "
                "is not in the local Hugging Face cache"
                if offline
                else f"the download failed ({type(e).__name__}: {e})"
            )
            raise TokenizerOfflineError(_offline_message(text, reason)) from e
    return with_pad_token(tokenizer, text)


def with_pad_token(tokenizer: Any, name: str = "tokenizer") -> Any:
    """Set ``pad = eos`` when the tokenizer has no pad token (and say so)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ConfigError(
            f"{TOKENIZER_KEY}: {name!r} has neither a pad nor an eos token; "
            "add a pad token to the tokenizer (and resize the model's embeddings) first"
        )
    tokenizer.pad_token = tokenizer.eos_token
    log.info("tokenizer %s has no pad token: using eos %r for padding", name, tokenizer.eos_token)
    return tokenizer


def _check_length(value: int, key: str) -> None:
    if int(value) <= 0:
        raise ConfigError(f"config.{key}: must be a positive number of tokens, got {value}")


def _check_texts(texts: Sequence[Any], what: str) -> list[str]:
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ConfigError(f"{what}: row {i} is {type(t).__name__}, expected a string")
    return out


# -- classification ----------------------------------------------------------------------------


def encode_classification(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    pairs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Token ids and attention mask, both int32 ``[N, max_length]``: truncated, right-padded.

    ``pairs`` gives second segments (NLI-style); the pair is truncated longest-first.
    """
    _check_length(max_length, "data.max_length")
    texts = _check_texts(texts, "classification text")
    second = None if pairs is None else _check_texts(pairs, "classification text pair")
    if second is not None and len(second) != len(texts):
        raise ConfigError(f"text pairs: {len(texts)} first segments but {len(second)} second")
    enc = tokenizer(
        texts,
        second,
        truncation=True,
        padding="max_length",
        max_length=int(max_length),
        padding_side="right",
        return_tensors="np",
    )
    return {
        "input_ids": enc["input_ids"].astype(np.int32),
        "attention_mask": enc["attention_mask"].astype(np.int32),
    }


# -- causal-LM examples --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tokens:
    """One tokenised example: ``trainable[i]`` says whether ``ids[i]`` is a loss target."""

    ids: np.ndarray  # int32 [n]
    trainable: np.ndarray  # bool [n]

    def __len__(self) -> int:
        return len(self.ids)


def _tokens(ids: Sequence[int], trainable: Sequence[bool]) -> Tokens:
    return Tokens(np.asarray(ids, np.int32), np.asarray(trainable, bool))


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[Tokens]:
    """Plain text for language modelling: every token is a target (no special tokens)."""
    texts = _check_texts(texts, "language-modelling text")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [_tokens(x, [True] * len(x)) for x in ids]


def _labels(ids: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """Shifted targets: position t predicts token t+1 when that token is trainable."""
    nxt = ids[1:]
    return np.where(trainable[1:], nxt, IGNORE_INDEX).astype(np.int32)


def pad_examples(examples: Sequence[Tokens], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row: truncated to ``max_length`` tokens, right-padded with ``pad_id``.

    Returns int32 ``inputs`` and shifted ``labels`` ``[N, max_length]`` (``IGNORE_INDEX``
    at padding, at each row's last token and wherever the token is not trainable).
    """
    _check_length(max_length, "data.max_length")
    n = len(examples)
    inputs = np.full((n, max_length), pad_id, np.int32)
    labels = np.full((n, max_length), IGNORE_INDEX, np.int32)
    for row, ex in enumerate(examples):
        ids, trainable = ex.ids[:max_length], ex.trainable[:max_length]
        inputs[row, : len(ids)] = ids
        labels[row, : max(len(ids) - 1, 0)] = _labels(ids, trainable)
    return {"inputs": inputs, "labels": labels}


def pack_examples(
    examples: Sequence[Tokens], block_size: int, separator: int | None = None
) -> dict[str, np.ndarray]:
    """Concatenate the examples (``separator``, e.g. eos, after each) and cut fixed blocks.

    Row ``k`` holds stream tokens ``[k*L, (k+1)*L)`` and its labels are the stream shifted by
    one (nanoGPT style), so every token is an input exactly once, in order, and every token
    but the first is a target exactly once; no padding. The tail that does not fill a block
    is dropped (logged). Attention is not reset at example boundaries, as in GPT-2 training.
    """
    _check_length(block_size, "data.max_length")
    ids, trainable = [], []
    for ex in examples:
        ids.append(ex.ids)
        trainable.append(ex.trainable)
        if separator is not None:
            ids.append(np.asarray([separator], np.int32))
            trainable.append(np.asarray([True]))
    stream = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    mask = np.concatenate(trainable) if trainable else np.zeros(0, bool)
    blocks = (len(stream) - 1) // block_size if len(stream) else 0
    if blocks == 0:
        raise ConfigError(
            f"config.data.max_length: {len(stream)} tokens in all cannot fill one packed block "
            f"of {block_size} (+1 for the shifted target); use a smaller max_length or more data"
        )
    used = blocks * block_size
    if len(stream) - used - 1 > 0:
        log.info(
            "packing: %d of %d tokens left over after the last block",
            len(stream) - used - 1,
            len(stream),
        )
    inputs = stream[:used].reshape(blocks, block_size)
    labels = np.where(mask[1 : used + 1], stream[1 : used + 1], IGNORE_INDEX)
    return {
        "inputs": inputs.astype(np.int32),
        "labels": labels.reshape(blocks, block_size).astype(np.int32),
    }


def lm_loss_args(labels):
    """``(targets, mask)`` for ``losses.masked_lm_loss`` from shifted labels (numpy or jax)."""
    mask = labels != IGNORE_INDEX
    return labels * mask, mask


# -- instruction formatting ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Alpaca-LoRA's template format: the response is appended to the formatted prompt.

    A template file is JSON with string keys ``prompt_input`` (placeholders ``{instruction}``
    and ``{input}``), ``prompt_no_input`` (``{instruction}``), ``response_split`` (the text
    after which a generation's answer starts) and optionally ``description``.
    """

    prompt_input: str
    prompt_no_input: str
    response_split: str
    description: str = ""

    def prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def response(self, generated: str) -> str:
        """The answer part of a generated text (after ``response_split``), stripped."""
        return generated.split(self.response_split, 1)[-1].strip()


ALPACA = PromptTemplate(  # tloen/alpaca-lora templates/alpaca.json
    prompt_input=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    prompt_no_input=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    response_split="### Response:",
    description="Template used by Alpaca-LoRA.",
)
# Stanford Alpaca's original (train.py PROMPT_DICT): no newline after "### Response:".
ALPACA_LEGACY = PromptTemplate(
    prompt_input=ALPACA.prompt_input.removesuffix("\n"),
    prompt_no_input=ALPACA.prompt_no_input.removesuffix("\n"),
    response_split="### Response:",
    description="Stanford Alpaca's original template.",
)
TEMPLATES = {"alpaca": ALPACA, "alpaca_legacy": ALPACA_LEGACY}
CHAT = "chat"  # use the tokenizer's own chat template


def load_template(spec: str, key: str = "config.data.template") -> PromptTemplate | str:
    """A built-in template name, ``"chat"``, or the path of a JSON template file."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if spec == CHAT:
        return CHAT
    file = Path(spec).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"{key}: {spec!r} is neither a built-in template ({', '.join(TEMPLATES)}, {CHAT}) "
            "nor an existing JSON template file"
        )
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: cannot read template file {str(file)!r}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: {file}: expected a JSON object")
    fields = ("prompt_input", "prompt_no_input", "response_split")
    missing = [f for f in fields if not isinstance(raw.get(f), str)]
    if missing:
        raise ConfigError(f"{key}: {file}: missing string field(s) {missing}")
    unknown = sorted(set(raw) - set(fields) - {"description"})
    if unknown:
        raise ConfigError(f"{key}: {file}: unknown field(s) {unknown}")
    for field, needed in (
        ("prompt_input", ("instruction", "input")),
        ("prompt_no_input", ("instruction",)),
    ):
        for name in needed:
            if "{" + name + "}" not in raw[field]:
                raise ConfigError(f"{key}: {file}: {field} lacks the {{{name}}} placeholder")
    template = PromptTemplate(**{k: raw[k] for k in (*fields, "description") if k in raw})
    try:
        template.prompt("x", "y"), template.prompt("x")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"{key}: {file}: bad placeholder in a prompt ({e!r}); "
            "use {instruction} and {input}, and double other braces"
        ) from None
    return template


def _field(record: Mapping[str, Any], name: str, row: int, required: bool = True) -> str:
    value = record.get(name, None)
    if value is None:
        if required:
            raise ConfigError(f"instruction data: row {row} lacks the {name!r} field")
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"instruction data: row {row}: {name!r} is {type(value).__name__}")
    return value


def _messages(record: Mapping[str, Any], row: int) -> list[dict[str, str]]:
    if "messages" in record:
        msgs = list(record["messages"])
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ConfigError(
                f"instruction data: row {row}: the last message must be the "
                "assistant's (it is the trained response)"
            )
        return msgs
    instruction, extra = _field(record, "instruction", row), _field(record, "input", row, False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _field(record, "output", row)},
    ]


def instruction_texts(
    record: Mapping[str, Any], template: PromptTemplate | str, tokenizer: Any = None, row: int = 0
) -> tuple[str, str]:
    """``(prompt, response)`` texts of one record; ``prompt + response`` is the full text.

    Records are Alpaca's ``{"instruction", "input" (optional), "output"}``; with the chat
    template also ``{"messages": [{"role", "content"}, ...]}`` (only the last, assistant, turn
    is trained).
    """
    if not isinstance(record, Mapping):
        raise ConfigError(f"instruction data: row {row} is {type(record).__name__}, not a record")
    if template != CHAT:
        prompt = template.prompt(
            _field(record, "instruction", row), _field(record, "input", row, False)
        )
        return prompt, _field(record, "output", row)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "config.data.template: 'chat' needs a tokenizer with a chat_template; "
            "this one has none (choose alpaca or a template file)"
        )
    msgs = _messages(record, row)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(prompt):
        raise ConfigError(
            f"config.data.template: the tokenizer's chat template does not render "
            f"row {row}'s conversation as its prompt followed by the answer"
        )
    return prompt, full[len(prompt) :]


def _strip_trailing_specials(with_sp: list[int], plain: list[int], bos: int | None) -> list[int]:
    """Keep leading special tokens (bos) but drop ones appended after the text (eos, sep)."""
    if not plain:
        return with_sp[:1] if with_sp[:1] == [bos] else []
    for k in range(len(with_sp) - len(plain) + 1):
        if with_sp[k : k + len(plain)] == plain:
            return with_sp[: k + len(plain)]
    return with_sp


def encode_formatted(
    tokenizer: Any, texts: Sequence[str], template: PromptTemplate | str
) -> list[list[int]]:
    """Token ids of template-formatted texts: a leading bos kept, specials appended after the
    text (eos, sep) dropped; chat templates write their own specials into the text. Training
    prompts and the prompts decoded at evaluation are tokenised by this one function."""
    plain = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if template == CHAT:
        return [list(p) for p in plain]
    with_sp = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [_strip_trailing_specials(list(a), list(b), bos) for a, b in zip(with_sp, plain)]


def encode_instructions(
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    template: PromptTemplate | str = ALPACA,
    cutoff_len: int = 256,
    train_on_inputs: bool = False,
    add_eos: bool = True,
) -> list[Tokens]:
    """Prompt + response (+ eos) token ids, the prompt's tokens not trained (Alpaca-LoRA).

    The prompt is tokenised alone and its tokens are kept as they are, so the untrained prefix
    is exactly the prompt's tokenisation. The response's tokens come from tokenising the full
    text when that begins with the prompt's tokens; when a tokenizer merges across the
    boundary (a prompt ending in a space, say), the response is tokenised on its own instead.
    Then eos is appended (unless already last) and the result cut to ``cutoff_len`` tokens:
    a cut example loses its eos, as in Alpaca-LoRA.
    """
    _check_length(cutoff_len, "data.max_length")
    pairs = [instruction_texts(r, template, tokenizer, i) for i, r in enumerate(records)]
    prompts = [p for p, _ in pairs]
    fulls = [p + r for p, r in pairs]
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ConfigError(f"{TOKENIZER_KEY}: the tokenizer has no eos token to end responses with")
    prompt_ids = encode_formatted(tokenizer, prompts, template)
    full_ids = encode_formatted(tokenizer, fulls, template)
    merged = [i for i, (p, f) in enumerate(zip(prompt_ids, full_ids)) if f[: len(p)] != p]
    alone = (
        tokenizer([pairs[i][1] for i in merged], add_special_tokens=False)["input_ids"]
        if merged
        else []
    )
    response_ids = {i: full_ids[i][len(prompt_ids[i]) :] for i in range(len(pairs))}
    response_ids.update(zip(merged, (list(x) for x in alone)))
    out = []
    for i, p in enumerate(prompt_ids):
        rest = list(response_ids[i])
        ids = list(p) + rest
        if add_eos and (not ids or ids[-1] != eos):
            rest.append(eos)
            ids.append(eos)
        trainable = [train_on_inputs] * len(p) + [True] * len(rest)
        out.append(_tokens(ids[:cutoff_len], trainable[:cutoff_len]))
    return out


def lm_arrays(
    tokenizer: Any,
    data: Sequence[Any],
    max_length: int,
    template: str = "",
    pack: bool = False,
    train_on_inputs: bool = False,
) -> dict[str, np.ndarray]:
    """Causal-LM ``inputs``/``labels`` from plain texts (``template=""``) or instruction records.

    Every document / example ends with eos. Unpacked, each is cut to ``max_length`` tokens
    (Alpaca-LoRA's cutoff_len) and padded; packed, examples are kept whole and the stream is
    cut into blocks of ``max_length``.
    """
    if template:
        cutoff = sys.maxsize if pack else max_length
        examples = encode_instructions(
            tokenizer, data, load_template(template), cutoff, train_on_inputs
        )
        separator = None  # each example already ends with eos
    else:
        examples = encode_texts(tokenizer, data)
        separator = tokenizer.eos_token_id
    if pack:
        return pack_examples(examples, max_length, separator)
    if not template and separator is not None:  # documents end with eos, trained
        examples = [
            _tokens(np.append(e.ids, separator), np.append(e.trainable, True)) for e in examples
        ]
    return pad_examples(examples, max_length, tokenizer.pad_token_id)


# -- text to text (encoder-decoder: T5) ----------------------------------------------------------


def seq2seq_arrays(
    tokenizer: Any,
    sources: Sequence[str],
    targets: Sequence[str],
    max_length: int,
    target_length: int = 0,
    decoder_start_token_id: int | None = None,
    prefix: str = "",
) -> dict[str, Any]:
    """Encoder inputs and decoder targets of source -> target text pairs (T5).

    Each text is tokenised without special tokens and ends with eos (what T5's tokenizer does),
    the source after ``prefix`` (T5's task prefix, e.g. ``"summarize: "``). Returns
    ``{"inputs": {...}, "labels": ...}``: ``input_ids`` / ``attention_mask`` (n, max_length),
    right-padded with the pad id (a longer source keeps its first ``max_length - 1`` tokens
    and its eos); ``labels`` (n, target_length, default ``max_length``): the target tokens
    and eos, ``IGNORE_INDEX`` on padding (a longer target is cut, its eos with it);
    ``decoder_input_ids``: the labels shifted right behind ``decoder_start_token_id``
    (default: the pad id, as T5), pad ids where the labels are ignored;
    ``decoder_attention_mask``: 1 on the start token and the real targets before the last.
    The loss on these is ``losses.seq2seq_lm_loss``: position ``i`` predicts ``labels[:, i]``.
    """
    _check_length(max_length, "data.max_length")
    target_length = int(target_length or max_length)
    _check_length(target_length, "data.target_length")
    sources = _check_texts(sources, "seq2seq source text")
    targets = _check_texts(targets, "seq2seq target text")
    if len(sources) != len(targets):
        raise ConfigError(f"seq2seq: {len(sources)} source texts but {len(targets)} targets")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ConfigError(f"{TOKENIZER_KEY}: a seq2seq tokenizer needs pad and eos tokens")
    start = pad if decoder_start_token_id is None else int(decoder_start_token_id)
    n = len(sources)
    src = tokenizer([prefix + s for s in sources], add_special_tokens=False)["input_ids"]
    tgt = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    input_ids = np.full((n, max_length), pad, np.int32)
    attention_mask = np.zeros((n, max_length), np.int32)
    labels = np.full((n, target_length), IGNORE_INDEX, np.int32)
    for i, (s, t) in enumerate(zip(src, tgt)):
        s = list(s[: max_length - 1]) + [eos]
        input_ids[i, : len(s)] = s
        attention_mask[i, : len(s)] = 1
        t = (list(t) + [eos])[:target_length]
        labels[i, : len(t)] = t
    shifted = np.concatenate([np.full((n, 1), start, np.int32), labels[:, :-1]], axis=1)
    decoder_mask = np.concatenate([np.ones((n, 1), bool), labels[:, :-1] >= 0], axis=1)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": np.where(shifted < 0, pad, shifted).astype(np.int32),
        "decoder_attention_mask": decoder_mask.astype(np.int32),
    }
    return {"inputs": inputs, "labels": labels}


def text_to_text_dataset(
    frames: Mapping[str, Any],
    tokenizer: Any,
    max_length: int,
    target_length: int = 0,
    decoder_start_token_id: int | None = None,
    prefix: str = "",
) -> Any:
    """A ``seq2seq`` ``Dataset`` of text-to-text columns: each split's ``prompt`` (the source;
    with ``context`` appended after a space when there is one) -> ``response`` (the target),
    through ``seq2seq_arrays`` (``prefix``: ``config.data.source_prefix`` before every source;
    ``target_length``: ``config.data.target_length``). Examples are weighted by their
    target-token count (as language-modelling examples are) and keep their ``prompt`` /
    ``context`` / ``response`` texts, so evaluation by generation can group references by
    source, and ``source``: the exact text encoded (prefix included), which evaluation by
    generation encodes again.

    ``frames``: ``{"train", "val", "test"}`` data frames (``ftlab.data.loading`` makes them).
    """
    from ftlab.data import Dataset, Split

    out = {}
    for name, frame in frames.items():
        missing = [c for c in ("prompt", "response") if c not in frame.columns]
        if missing:
            raise ConfigError(
                f"config.data.columns: text-to-text (seq2seq) data needs 'prompt' (source) and "
                f"'response' (target) columns; {name} lacks {', '.join(missing)}"
            )
        sources = frame["prompt"].astype(str).tolist()
        if "context" in frame.columns:
            context = frame["context"].fillna("").astype(str).tolist()
            sources = [f"{s} {c}".strip() for s, c in zip(sources, context)]
        targets = frame["response"].astype(str).tolist()
        kept = {  # a missing context kept as "" (as in the source), never "nan"
            c: frame[c].fillna("").astype(str).to_numpy(object)
            for c in ("prompt", "context", "response")
            if c in frame.columns
        }
        kept["source"] = np.asarray([prefix + s for s in sources], dtype=object)
        if not sources:
            empty = seq2seq_arrays(tokenizer, ["x"], ["x"], max_length, target_length)
            arrays = {
                "inputs": {k: v[:0] for k, v in empty["inputs"].items()},
                "labels": empty["labels"][:0],
            }
        else:
            arrays = seq2seq_arrays(
                tokenizer,
                sources,
                targets,
                max_length,
                target_length,
                decoder_start_token_id,
                prefix,
            )
        labels = arrays["labels"]
        weights = (labels >= 0).sum(-1).astype(np.float32)
        out[name] = Split(arrays["inputs"], labels, weights, kept)
    data = Dataset(**out, task="seq2seq", num_outputs=0, class_names=[])
    data.tokenizer = tokenizer
    return data
