"""Generation metrics: corpus BLEU (sacrebleu) and ROUGE (Google's rouge-score), perplexity,
and the word error rate of transcripts (jiwer).

BLEU is sacrebleu's corpus BLEU with its default 13a tokenisation, so numbers are comparable
with published ones computed the same way (the E2E challenge's own script differs slightly).
Several references per hypothesis are allowed (E2E has many per meaning representation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _references(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]):
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} reference entries: one entry "
            "(a string or a list of strings) per hypothesis"
        )
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's reference streams: stream k holds every hypothesis's k-th reference."""
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus BLEU (0-100) of ``hypotheses`` against one or more references each."""
    import sacrebleu

    streams = _streams(_references(hypotheses, references))
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def chrf(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (0-100, sacrebleu's defaults: character 6-grams, beta 2) against one or
    more references each; robust to tokenisation, so it complements BLEU on short outputs."""
    import sacrebleu

    streams = _streams(_references(hypotheses, references))
    return float(sacrebleu.corpus_chrf(list(hypotheses), streams).score)


def rouge(
    hypotheses: Sequence[str],
    references: Sequence[str | Sequence[str]],
    kinds: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
) -> dict[str, float]:
    """Mean ROUGE F-measure (0-100) per kind; with several references, the best one counts."""
    from rouge_score import rouge_scorer

    refs = _references(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = {k: 0.0 for k in kinds}
    for hyp, rs in zip(hypotheses, refs):
        for k in kinds:
            totals[k] += max(scorer.score(r, hyp)[k].fmeasure for r in rs)
    return {k: 100.0 * v / len(refs) for k, v in totals.items()}


def perplexity(token_losses: np.ndarray, token_counts: np.ndarray) -> float:
    """exp of the token-weighted mean cross-entropy (nats) over examples."""
    counts = np.asarray(token_counts, np.float64)
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("perplexity over zero tokens")
    mean = float(np.sum(np.asarray(token_losses, np.float64) * counts) / total)
    return math.exp(mean)


def normalise_transcript(text: str) -> str:
    """Lower case, punctuation removed (apostrophes kept), whitespace collapsed: the light
    normalisation WER is commonly reported after (not Whisper's full English normaliser)."""
    import re

    text = re.sub(r"[^\w\s']", " ", str(text).lower())
    return " ".join(text.split())


def wer(hypotheses: Sequence[str], references: Sequence[str], normalise: bool = True) -> float:
    """Corpus word error rate (jiwer: substitutions + deletions + insertions over reference
    words), as a fraction; transcripts are normalised first (``normalise_transcript``)."""
    import jiwer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not len(references):
        return float("nan")
    prep = normalise_transcript if normalise else str
    refs = [prep(r) for r in references]
    hyps = [prep(h) for h in hypotheses]
    if not any(refs):
        raise ValueError("WER needs at least one non-empty reference")
    # jiwer refuses empty references: a hypothesis for one counts its words as insertions
    pairs = [(r, h) for r, h in zip(refs, hyps) if r]
    dropped = [h for r, h in zip(refs, hyps) if not r]
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    errors = out.substitutions + out.deletions + out.insertions
    errors += sum(len(h.split()) for h in dropped)
    words = sum(len(r.split()) for r, _ in pairs)
    return float(errors / words)
