"""Evaluation counts and the study-level metrics pooled from them.

Silos send counts (confusion cells, loss sum, score histograms), never predictions or
rows; counts from many silos add up, and every metric here is a function of the sum.
"""

from __future__ import annotations

import math

import numpy as np

from policies.validation import suppress

HIST_BINS = 20
# Layout: tp, fp, tn, fn, loss_sum, n, positive-score histogram, negative-score histogram
N_FIXED = 6
COUNT_LEN = N_FIXED + 2 * HIST_BINS
CELLS = ("tp", "fp", "tn", "fn")


def eval_counts(y_true: np.ndarray, scores: np.ndarray, loss_sum: float) -> np.ndarray:
    """Counts of one evaluation at threshold 0.5, plus score histograms for AUROC."""
    y = y_true.astype(bool)
    pred = scores >= 0.5
    bins = np.linspace(0.0, 1.0, HIST_BINS + 1)
    hist_pos, _ = np.histogram(scores[y], bins=bins)
    hist_neg, _ = np.histogram(scores[~y], bins=bins)
    fixed = [np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & ~y), np.sum(~pred & y), loss_sum, len(y)]
    return np.concatenate([np.asarray(fixed, dtype=np.float64), hist_pos, hist_neg]).astype(np.float64)


def wilson(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: sane at 0 or n successes, unlike the normal approximation."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def auroc_from_histograms(hist_pos: np.ndarray, hist_neg: np.ndarray) -> float:
    """AUROC from binned scores (ties within a bin count half)."""
    p, q = hist_pos.sum(), hist_neg.sum()
    if p == 0 or q == 0:
        return math.nan
    neg_below = np.concatenate([[0.0], np.cumsum(hist_neg)[:-1]])
    return float(np.sum(hist_pos * (neg_below + 0.5 * hist_neg)) / (p * q))


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else math.nan


def metrics_from_counts(counts: np.ndarray) -> dict[str, float]:
    """Accuracy, sensitivity, specificity (with 95% Wilson CIs), AUROC and mean loss."""
    tp, fp, tn, fn, loss_sum, n = (float(c) for c in counts[:N_FIXED])
    hist_pos = counts[N_FIXED : N_FIXED + HIST_BINS]
    hist_neg = counts[N_FIXED + HIST_BINS :]
    out = {
        "n": n,
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "auroc": auroc_from_histograms(hist_pos, hist_neg),
        "loss": _ratio(loss_sum, n),
    }
    for name, (s, m) in {"accuracy": (tp + tn, n), "sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp)}.items():
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = wilson(s, m)
    return out


def silo_report(counts: np.ndarray, k: int) -> dict[str, int | str | float | None]:
    """What one silo may show about its own test set: cells below k suppressed.

    Accuracy is shown when the test-set size and the number correct are at least k;
    sensitivity and specificity only when every cell they rest on is at least k.
    """
    tp, fp, tn, fn, _loss, n = (int(round(c)) for c in counts[:N_FIXED])
    correct = tp + tn
    report: dict[str, int | str | float | None] = {c: suppress(v, k) for c, v in zip(CELLS, (tp, fp, tn, fn))}
    report["n"] = suppress(n, k)
    report["correct"] = suppress(correct, k)

    def shown(*cells: int) -> bool:
        return all(c == 0 or c >= k for c in cells)

    report["accuracy"] = correct / n if n >= k and shown(correct) else None
    report["sensitivity"] = tp / (tp + fn) if tp + fn > 0 and shown(tp, fn) else None
    report["specificity"] = tn / (tn + fp) if tn + fp > 0 and shown(tn, fp) else None
    return report
