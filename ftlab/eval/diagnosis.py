"""Over- or under-fitting, read from a run's logged loss curves.

A run's ``metrics.jsonl`` already holds what a person would look at to judge the fit: training
loss every few steps and validation loss at every evaluation. ``fit_verdict`` turns those rows
into one verdict with the numbers behind it and the config keys that usually help, so a report
can say *why* a run went wrong instead of only showing the curves.

Curves are noisy (mini-batch training loss, small validation sets), so every comparison is
between window means or smoothed values, and a validation rise must clear both a relative
margin and the noise level of the validation curve itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["OVERFITTING_REMEDIES", "UNDERFITTING_REMEDIES", "chance_loss", "fit_verdict"]

OVERFITTING_REMEDIES = (
    (
        "Stop early: set early_stopping.patience (e.g. 3 evaluations) with "
        "early_stopping.restore_best=True, or shorten training (train.num_steps / train.num_epochs)."
    ),
    (
        "Regularise: raise optim.weight_decay (e.g. 0.01-0.1), model.dropout (e.g. 0.1) or "
        "train.label_smoothing (e.g. 0.1)."
    ),
    (
        "Augment the training data: data.augment.* (images: crop_padding, flip, rotate_degrees, "
        "mixup_alpha; text: synonym_prob, swap_prob, deletion_prob)."
    ),
    "Use more training data (data.train_per_class=0 keeps every labelled training example).",
    (
        "Train fewer parameters: method.name='lora' with a small method.lora.rank, or a linear "
        "probe (method.name='frozen' with method.trainable=('head/',))."
    ),
)

UNDERFITTING_REMEDIES = (
    "Train longer: raise train.num_steps (or train.num_epochs when num_steps is 0).",
    "Raise the learning rate: optim.lr (try 3x; check optim.warmup_steps and optim.schedule).",
    (
        "Add capacity: method.name='full', a higher method.lora.rank or more method.lora.targets, "
        "or a larger model (model.features, model.hidden)."
    ),
    (
        "Loosen regularisation: optim.weight_decay, model.dropout, train.label_smoothing and "
        "data.augment.* all raise the training loss."
    ),
    (
        "Check the data and labels: input scaling (data.scale, data.clean.normalise) and whether "
        "labels match inputs (ftlab.data.label_issues flags likely mislabelled examples)."
    ),
)


def chance_loss(task: str, num_classes: int | None = None) -> float | None:
    """The loss of a model that learned nothing, the yardstick for "high" training loss.

    Classification: log(num_classes), cross-entropy of the uniform prediction. Regression:
    1.0, the mean squared error of predicting the mean of *standardised* targets (pass None to
    ``fit_verdict`` when targets are not standardised). Anything else: None (unknown).
    """
    if task == "classification" and num_classes is not None and num_classes >= 2:
        return math.log(num_classes)
    if task == "regression":
        return 1.0
    return None


def _series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric, sorted by step, last value per step, finite only."""
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if value is None or "step" not in record:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            by_step[int(record["step"])] = value
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that shrinks at the edges, so it does not shift the minimum."""
    window = max(1, min(int(window), len(values)))
    if window == 1:
        return values.copy()
    kernel = np.ones(window)
    sums = np.convolve(values, kernel, mode="same")
    counts = np.convolve(np.ones_like(values), kernel, mode="same")
    return sums / counts


def _noise(values: np.ndarray, smoothed: np.ndarray, window: int) -> float:
    """Point-to-point noise (std) of a curve, from its residuals around the moving average.

    The median absolute deviation ignores the few large residuals where the curve bends
    (early training, the turn at a minimum); a residual from a w-point average has (w-1)/w of
    the noise's variance, hence the factor. Edge points, averaged over fewer, are left out."""
    half = window // 2
    residuals = (values - smoothed)[half : len(values) - half]
    if len(residuals) < 3 or window < 2:
        return 0.0
    mad = float(np.median(np.abs(residuals - np.median(residuals))))
    return 1.4826 * mad * math.sqrt(window / (window - 1))


def _pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


def _result(
    verdict: str, since_step: int | None, evidence: str, remedies: Iterable[str] = ()
) -> dict[str, Any]:
    return {
        "verdict": verdict,
        "since_step": None if since_step is None else int(since_step),
        "evidence": evidence,
        "remedies": list(remedies),
    }


def fit_verdict(
    records: list[dict],
    *,
    chance_loss: float | None,
    train_key: str = "train/loss",
    val_key: str = "val/loss",
    min_evals: int = 3,
    val_window: int = 3,
    train_window: int = 5,
    rise_margin: float = 0.1,
    noise_z: float = 2.0,
    min_rise_evals: int = 2,
    train_drop: float = 0.02,
    tail_fraction: float = 0.25,
    high_fraction: float = 0.7,
    flat_tol: float = 0.05,
    min_progress: float = 0.1,
) -> dict[str, Any]:
    """Judge a run's fit from its metrics rows: overfitting, underfitting, fine or unknown.

    Returns ``{"verdict", "since_step", "evidence", "remedies"}`` (JSON-able); ``since_step``
    is the step where overfitting began, else None.

    Overfitting: the validation loss, smoothed over ``val_window`` evaluations, has its minimum
    at some evaluation followed by at least ``min_rise_evals`` more, and the mean of the last
    evaluations after it (the last ``tail_fraction`` of all, at least ``min_rise_evals``) is
    above that minimum by ``rise_margin`` (relative) and by ``noise_z`` times the validation
    curve's own noise; meanwhile the training loss (smoothed over ``train_window`` points)
    fell by at least ``train_drop`` (relative) from that step to the end. ``since_step`` is the
    step of the lowest raw evaluation within half a window of the smoothed minimum. Checked first: a rising validation loss is the more urgent signal.

    Underfitting, with ``chance_loss`` (log(num_classes) for classification, 1.0 for
    standardised regression; see ``chance_loss()``): the mean training loss over the last
    ``tail_fraction`` of its points is at least ``high_fraction`` of the chance level, whether
    still falling (then training longer leads the remedies) or flat. Without a chance level:
    that mean is flat (fell by less than ``flat_tol``, relative, from the window before) and
    barely below the mean of the first window (by less than ``min_progress``, relative).

    Unknown: fewer than ``min_evals`` validation evaluations or two training points.
    Regularisation that only acts in training (dropout, mixup, label smoothing) raises the
    logged training loss; keep that in mind when reading an underfitting verdict.
    """
    vs, vv = _series(records, val_key)
    ts, tv = _series(records, train_key)
    if len(vv) < min_evals:
        return _result(
            "unknown",
            None,
            f"Only {len(vv)} finite {val_key} evaluation(s) were logged; at least {min_evals} "
            "are needed to judge the fit.",
        )
    if len(tv) < 2:
        return _result(
            "unknown",
            None,
            f"Only {len(tv)} finite {train_key} point(s) were logged; at least 2 are needed.",
        )

    # Overfitting: validation rises after its minimum while training loss keeps falling.
    val_smooth = _smooth(vv, val_window)
    best = int(np.argmin(val_smooth))
    # The smoothed minimum locates the turn despite noise; the step itself is the lowest raw
    # evaluation next to it (smoothing blurs a sharp turn by up to half a window).
    half = max(1, val_window // 2)
    lo, hi = max(0, best - half), min(len(vv), best + half + 1)
    turn = lo + int(np.argmin(vv[lo:hi]))
    after = len(vv) - 1 - turn
    train_smooth = _smooth(tv, train_window)
    train_end = float(np.mean(tv[-max(1, min(train_window, len(tv))) :]))
    if after >= min_rise_evals:
        n_tail = min(after, max(min_rise_evals, math.ceil(tail_fraction * len(vv))))
        val_min = float(val_smooth[best])  # smoothed: a noise dip alone is no minimum
        val_tail = float(np.mean(vv[-n_tail:]))
        rise = val_tail - val_min
        relative = rise / max(abs(val_min), 1e-12)
        raw_min = float(vv[turn])
        noise = _noise(vv, val_smooth, min(val_window, len(vv)))
        train_then = float(np.interp(vs[turn], ts, train_smooth))
        train_fell = train_end <= train_then * (1 - train_drop)
        if relative >= rise_margin and rise >= noise_z * noise and train_fell:
            return _result(
                "overfitting",
                int(vs[turn]),
                f"Validation loss reached its minimum {raw_min:.4g} at step {int(vs[turn])} "
                f"and rose to {val_tail:.4g} ({_pct(val_tail / raw_min - 1 if raw_min else 0.0)}, "
                f"mean of the last {n_tail} "
                f"evaluations, to step {int(vs[-1])}) while training loss fell from "
                f"{train_then:.4g} to {train_end:.4g} "
                f"({_pct(train_end / train_then - 1 if train_then else 0.0)}).",
                OVERFITTING_REMEDIES,
            )

    # Underfitting: training loss stays high (near chance) or never really moved.
    k = max(1, math.ceil(tail_fraction * len(tv)))
    start = float(np.mean(tv[:k]))
    end = float(np.mean(tv[-k:]))
    before = float(np.mean(tv[-2 * k : -k])) if len(tv) >= 2 * k else start
    change = end / before - 1 if before else 0.0
    flat = before - end <= flat_tol * abs(before)
    trend = (
        f"changed {_pct(change)} over the last {k} logged points"
        if flat
        else f"was still falling ({_pct(change)} over the last {k} logged points)"
    )
    if chance_loss is not None and chance_loss > 0:
        if end >= high_fraction * chance_loss:
            remedies = list(UNDERFITTING_REMEDIES)
            if flat:  # more steps will not help a flat curve much; lr and capacity first
                remedies = remedies[1:3] + remedies[:1] + remedies[3:]
            return _result(
                "underfitting",
                None,
                f"Training loss ended at {end:.4g} (mean of the last {k} logged points, to step "
                f"{int(ts[-1])}), {100 * end / chance_loss:.0f}% of the chance level "
                f"{chance_loss:.4g}, and {trend}.",
                remedies,
            )
    elif flat and end >= (1 - min_progress) * start:
        return _result(
            "underfitting",
            None,
            f"Training loss ended at {end:.4g} (mean of the last {k} logged points, to step "
            f"{int(ts[-1])}), only {_pct(end / start - 1 if start else 0.0)} from its start "
            f"{start:.4g}, and {trend}.",
            UNDERFITTING_REMEDIES[1:3] + UNDERFITTING_REMEDIES[:1] + UNDERFITTING_REMEDIES[3:],
        )

    val_last = float(vv[-1])
    chance = f", {100 * end / chance_loss:.0f}% of chance" if chance_loss else ""
    return _result(
        "fine",
        None,
        f"Validation loss ended at {val_last:.4g} (step {int(vs[-1])}), "
        f"{_pct(val_last / float(np.min(vv)) - 1 if np.min(vv) else 0.0)} from its minimum "
        f"{float(np.min(vv)):.4g} (step {int(vs[int(np.argmin(vv))])}), and training loss fell from "
        f"{start:.4g} to {end:.4g}{chance}.",
    )
