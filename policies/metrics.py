"""Evaluation counts and the study-level metrics pooled from them.

Silos send counts (confusion cells, loss sum, score histograms), never predictions or
rows; counts from many silos add up, and every metric here is a function of the sum.
"""

from __future__ import annotations

import math

import numpy as np

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


# Small-cell suppression of a silo's own report, with complementary suppression.
#
# Protected: every count of 1..k-1 patients in a confusion cell or a denominator (n, the
# positives tp + fn, the negatives tn + fp), and the number correct, which is shown as a count.
# The report shows counts linear in the four cells: each cell, n and correct. Hiding only the
# small cells is not enough: with n and three cells shown, the fourth is n minus the others.
# Nor is "hide the fewest further cells that stop every derivation": which cells that rule
# picks depends on which were small, and a reader who knows the rule can narrow a hidden cell
# down to one value (tests/test_metrics_suppression.py found such tables). So the pattern
# depends only on coarse facts:
#   - no cell has 1..k-1 patients: everything is shown (no denominator can be small then);
#   - otherwise all four cells are hidden (the complementary suppression), n is shown only
#     if it is at least k, and correct only if n is shown and k <= correct < n (correct = n
#     would give away that the hidden fp and fn are 0).
# No protected count and no hidden figure then follows from the shown ones; the tests check
# this by enumerating every table a reader could not tell apart from the real one. What a
# shown accuracy does give away is n - correct, the number misclassified, which is neither a
# cell nor a denominator.

SUPPRESSED = "suppressed"
RELEASED = ("tp", "fp", "tn", "fn", "n", "correct")


def suppression(cells: tuple[int, int, int, int], k: int) -> set[str]:
    """The figures of ``RELEASED`` to show as suppressed for confusion cells (tp, fp, tn, fn)."""
    if not any(0 < c < k for c in cells):
        return set()
    n, correct = sum(cells), cells[0] + cells[2]
    hidden = {"tp", "fp", "tn", "fn"}
    if n < k:
        hidden.add("n")
    if n < k or correct < k or correct == n:
        hidden.add("correct")
    return hidden


def silo_report(counts: np.ndarray, k: int) -> dict[str, int | str | float | None]:
    """What one silo may show about its own test set, with small-cell and complementary suppression.

    Counts are numbers or ``SUPPRESSED``; a ratio is shown (else None) only when the counts it
    is made of are shown, so it reveals nothing the counts do not.
    """
    tp, fp, tn, fn, _loss, _n = (int(round(c)) for c in counts[:N_FIXED])
    values = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": tp + fp + tn + fn, "correct": tp + tn}
    hidden = suppression((tp, fp, tn, fn), k)
    report: dict[str, int | str | float | None] = {
        name: SUPPRESSED if name in hidden else value for name, value in values.items()
    }

    def ratio(numerator: str, *denominator: str) -> float | None:
        if hidden & {numerator, *denominator}:
            return None
        total = sum(values[d] for d in denominator)
        return values[numerator] / total if total > 0 else None

    report["accuracy"] = ratio("correct", "n")
    report["sensitivity"] = ratio("tp", "tp", "fn")
    report["specificity"] = ratio("tn", "tn", "fp")
    report["small_cell_min"] = k
    return report
