"""Score a fine-tuned causal LM by what it writes: decode test prompts, BLEU and ROUGE.

Rows sharing a prompt (E2E has several human references per meaning representation) are
decoded once and scored against all of their references, as the E2E and LoRA papers do.
The prompt is formatted by the run's template and tokenised exactly as in training
(``ftlab.data.text``), so the model continues where its training examples' responses began.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.data import Split
from ftlab.data import text as text_lib
from ftlab.eval import text_metrics
from ftlab.eval.generate import decode_sources, decoded_texts, generate, generate_seq2seq


def grouped_prompts(split: Split, limit: int) -> list[tuple[dict[str, str], list[str]]]:
    """Up to ``limit`` distinct (record, references) pairs in split order."""
    if "response" not in split.text or "prompt" not in split.text:
        raise ValueError("generation needs the split's prompt and response texts")
    context = split.text.get("context", np.full(len(split), "", object))
    groups: dict[tuple[str, str], list[str]] = {}
    for p, c, r in zip(split.text["prompt"], context, split.text["response"]):
        groups.setdefault((str(p), str(c)), []).append(str(r))
    items = list(groups.items())[:limit]
    return [({"instruction": p, "input": c, "output": ""}, refs) for (p, c), refs in items]


def prompt_ids(tokenizer: Any, template: Any, record: dict[str, str]) -> list[int]:
    """The prompt's tokens exactly as training tokenised them (bos kept, no eos)."""
    prompt, _ = text_lib.instruction_texts({**record, "output": "x"}, template, tokenizer)
    return text_lib.encode_formatted(tokenizer, [prompt], template)[0]


def decode_prompts(
    model: Any,
    method: Any,
    trainable: Any,
    frozen: Any,
    ids: list[list[int]],
    tokenizer: Any,
    cfg: Any,
) -> list[str]:
    """The text generated after each prompt (token ids) with ``config.eval``'s decoding
    settings, in fixed-size left-padded batches (the decoder compiles once)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts: list[str] = []
    for start in range(0, len(ids), cfg.batch_size):
        chunk = ids[start : start + cfg.batch_size]
        width = max(len(i) for i in chunk)
        batch = np.full((cfg.batch_size, width), pad, np.int32)
        mask = np.zeros((cfg.batch_size, width), np.int32)
        for row, seq in enumerate(chunk):  # left-padded, as the KV cache wants
            batch[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = 1
        mask[len(chunk) :, -1] = 1  # filler rows need one real token
        out = generate(
            model,
            None,
            batch,
            mask,
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            adapter=method,
            trainable=trainable,
            frozen=frozen,
            num_beams=cfg.num_beams,
            length_penalty=cfg.length_penalty,
            no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        )
        texts += decoded_texts(out, len(chunk), tokenizer, eos)
    return texts


def evaluate_generation(
    model: Any,
    method: Any,
    trainable: Any,
    frozen: Any,
    split: Split,
    tokenizer: Any,
    template_spec: str,
    cfg: Any,
    out_file: Path | None = None,
) -> dict[str, float]:
    """Decode ``cfg.generate_examples`` distinct prompts (``config.eval``) and score them;
    speech data (log-mel ``input_features``) is transcribed and scored by WER instead
    (``evaluate_transcription``)."""
    if isinstance(split.inputs, dict) and "input_features" in split.inputs:
        return evaluate_transcription(
            model, method, trainable, frozen, split, tokenizer, cfg, out_file
        )
    if isinstance(split.inputs, dict) and "decoder_input_ids" in split.inputs:  # T5
        return evaluate_seq2seq(model, method, trainable, frozen, split, tokenizer, cfg, out_file)
    template = text_lib.load_template(template_spec)
    groups = grouped_prompts(split, cfg.generate_examples)
    ids = [prompt_ids(tokenizer, template, record) for record, _ in groups]
    hypotheses = decode_prompts(model, method, trainable, frozen, ids, tokenizer, cfg)
    references = [refs for _, refs in groups]
    rows = [
        {"prompt": record["instruction"], "output": text, "references": refs}
        for (record, refs), text in zip(groups, hypotheses)
    ]
    scores = {
        "bleu": text_metrics.bleu(hypotheses, references),
        "chrf": text_metrics.chrf(hypotheses, references),
    }
    scores.update(text_metrics.rouge(hypotheses, references))
    scores["generated_examples"] = len(hypotheses)
    if out_file is not None:
        with open(out_file, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return scores


def _scores(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    scores = {
        "bleu": text_metrics.bleu(hypotheses, references),
        "chrf": text_metrics.chrf(hypotheses, references),
    }
    scores.update(text_metrics.rouge(hypotheses, references))
    scores["generated_examples"] = len(hypotheses)
    return scores


def source_text(prompt: str, context: str = "") -> str:
    """A text-to-text example's source as ``text_to_text_dataset`` forms it: the prompt, then
    the context after a space when there is one."""
    return f"{prompt} {context}".strip()


def encode_sources(tokenizer: Any, sources: list[str], max_length: int) -> list[list[int]]:
    """Source token ids (eos-terminated, cut to ``max_length``) exactly as ``seq2seq_arrays``
    encodes a training example's source (the targets here are placeholders)."""
    if not sources:
        return []
    arrays = text_lib.seq2seq_arrays(tokenizer, sources, ["x"] * len(sources), max_length)
    ids, mask = arrays["inputs"]["input_ids"], arrays["inputs"]["attention_mask"]
    return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]


def evaluate_seq2seq(
    model: Any,
    method: Any,
    trainable: Any,
    frozen: Any,
    split: Split,
    tokenizer: Any,
    cfg: Any,
    out_file: Path | None = None,
) -> dict[str, float]:
    """An encoder-decoder's (T5's) outputs for up to ``cfg.generate_examples`` distinct sources
    of a text-to-text split (``prompt`` + ``context`` -> ``response``), each decoded once
    (``decode_sources``, ``config.eval``'s settings) and scored by BLEU / chrF / ROUGE against
    all of its references (E2E has several per meaning representation), as the causal-LM
    branch scores. Sources are encoded by ``seq2seq_arrays`` to the split's source length,
    as in training (the split's ``source`` texts: ``data.source_prefix`` included); ``out_file`` gets one JSON line per source (prompt, output, references)."""
    groups = grouped_prompts(split, cfg.generate_examples)
    sources = [source_text(r["instruction"], r["input"]) for r, _ in groups]
    if "source" in split.text:  # what training encoded: data.source_prefix included
        context = split.text.get("context", np.full(len(split), "", object))
        encoded = {
            source_text(str(p), str(c)): str(s)
            for p, c, s in zip(split.text["prompt"], context, split.text["source"])
        }
        sources = [encoded.get(s, s) for s in sources]
    width = int(np.shape(split.inputs["input_ids"])[-1])
    ids = encode_sources(tokenizer, sources, width)
    hypotheses = decode_sources(model, method, trainable, frozen, ids, tokenizer, cfg)
    references = [refs for _, refs in groups]
    if out_file is not None:
        with open(out_file, "w") as f:
            for (record, refs), text in zip(groups, hypotheses):
                row = {"prompt": record["instruction"], "output": text, "references": refs}
                if record["input"]:
                    row["context"] = record["input"]
                f.write(json.dumps(row) + "\n")
    return _scores(hypotheses, references)


def transcribe(
    model: Any,
    params: Any,
    features: np.ndarray,
    tokenizer: Any,
    batch_size: int,
    max_new_tokens: int,
    *,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Transcripts of log-mel ``features`` (n, mels, frames) by a Whisper model with the
    cache, after the tokenizer's forced prefix (``<|startoftranscript|><|en|>
    <|transcribe|><|notimestamps|>``): greedy, or Hugging Face's beam search with
    ``num_beams`` > 1 (``generate_seq2seq``), in fixed-size batches (one compilation)."""
    prefix = list(tokenizer.prefix_tokens)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    room = model.config.max_target_positions - len(prefix)
    steps = max(1, min(int(max_new_tokens), room))
    texts: list[str] = []
    for start in range(0, len(features), batch_size):
        chunk = np.asarray(features[start : start + batch_size], np.float32)
        batch = np.zeros((batch_size, *chunk.shape[1:]), np.float32)
        batch[: len(chunk)] = chunk
        out = generate_seq2seq(
            model,
            params,
            None,
            input_features=batch,
            max_new_tokens=steps,
            decoder_start_token_id=prefix,
            eos_token_id=eos,
            pad_token_id=pad,
            num_beams=int(num_beams),
            length_penalty=float(length_penalty),
            no_repeat_ngram_size=int(no_repeat_ngram_size),
        )
        texts += decoded_texts(out, len(chunk), tokenizer, eos)
    return texts


def evaluate_transcription(
    model: Any,
    method: Any,
    trainable: Any,
    frozen: Any,
    split: Split,
    tokenizer: Any,
    cfg: Any,
    out_file: Path | None = None,
) -> dict[str, float]:
    """Transcribe up to ``cfg.generate_examples`` clips of ``split`` (LoRA merged; greedy, or
    beam search with ``cfg.num_beams`` > 1, as T5's evaluation decodes) and
    score the word error rate (``text_metrics.wer``, lower is better) against their
    transcripts; ``out_file`` gets one JSON line per clip (audio, output, reference)."""
    n = min(int(cfg.generate_examples), len(split))
    params = method.merged_params(trainable, frozen)
    features = split.inputs["input_features"][:n]
    hypotheses = transcribe(
        model,
        params,
        features,
        tokenizer,
        cfg.batch_size,
        cfg.max_new_tokens,
        num_beams=cfg.get("num_beams", 1),
        length_penalty=cfg.get("length_penalty", 1.0),
        no_repeat_ngram_size=cfg.get("no_repeat_ngram_size", 0),
    )
    references = [str(t) for t in split.text["text"][:n]]
    scores = {"wer": text_metrics.wer(hypotheses, references), "generated_examples": n}
    if out_file is not None:
        audio = split.text.get("audio", np.full(n, "", object))
        with open(out_file, "w") as f:
            for clip, text, ref in zip(audio, hypotheses, references):
                row = {"audio": str(clip), "output": text, "reference": ref}
                f.write(json.dumps(row) + "\n")
    return scores
