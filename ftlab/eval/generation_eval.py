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
from ftlab.eval.generate import generate


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
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for row in range(len(chunk)):
            new = [t for t in tokens[row, : lengths[row]].tolist() if t != eos]
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
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
    """Decode ``cfg.generate_examples`` distinct prompts (``config.eval``) and score them."""
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
