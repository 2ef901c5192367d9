"""Small-cell and complementary suppression of a silo's own evaluation report.

The attack these tests run: a reader knows the study's minimum k and the suppression rule
(this code), and sees one silo's report. Every confusion table that would have produced the
very same report is a candidate; a hidden figure is disclosed when all candidates agree on
it. The tests enumerate every table up to a size and check that no hidden figure and no count
of 1..k-1 patients in a cell, a denominator (n, positives, negatives) or correct is disclosed.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import pytest

from policies.metrics import COUNT_LEN, N_FIXED, RELEASED, SUPPRESSED, silo_report
from policies.study import StudySpec
from ui.data import SILO_COLUMNS, shown

# protected counts as coefficients over (tp, fp, tn, fn): the cells, the denominators n,
# positives (tp + fn) and negatives (tn + fp), and the number correct
PROTECTED = {"tp": (1, 0, 0, 0), "fp": (0, 1, 0, 0), "tn": (0, 0, 1, 0), "fn": (0, 0, 0, 1), "n": (1, 1, 1, 1),
             "positives": (1, 0, 0, 1), "negatives": (0, 1, 1, 0), "correct": (1, 0, 1, 0)}


def counts(tp: int, fp: int, tn: int, fn: int) -> np.ndarray:
    vector = np.zeros(COUNT_LEN)
    vector[:N_FIXED] = (tp, fp, tn, fn, 1.5, tp + fp + tn + fn)
    return vector


def figures(table: tuple[int, ...]) -> dict[str, int]:
    tp, fp, tn, fn = table
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": tp + fp + tn + fn, "correct": tp + tn}


def report_key(report: dict) -> tuple:
    return tuple(sorted(report.items()))


def disclosures(k: int, max_n: int, report_for: Callable[[np.ndarray, int], dict] = silo_report) -> list[str]:
    """Every (table, figure) a reader could pin down, over all tables with n <= max_n.

    A report either shows n (so every candidate has that n, within the enumeration) or hides
    it because n < k <= max_n, so no candidate is missed."""
    candidates: dict[tuple, list[tuple[int, ...]]] = defaultdict(list)
    reports = {}
    for table in itertools.product(range(max_n + 1), repeat=4):
        if sum(table) <= max_n:
            reports[table] = report_for(counts(*table), k)
            candidates[report_key(reports[table])].append(table)
    found = []
    for table, report in reports.items():
        alike = candidates[report_key(report)]
        for name, v in PROTECTED.items():
            value = int(np.dot(v, table))
            if 0 < value < k and all(int(np.dot(v, other)) == value for other in alike):
                found.append(f"{table}: {name} = {value} follows from {report}")
        for name in RELEASED:
            value = figures(table)[name]
            if report[name] == SUPPRESSED and all(figures(other)[name] == value for other in alike):
                found.append(f"{table}: hidden {name} = {value} follows from {report}")
    return found


@pytest.mark.parametrize(("k", "max_n"), [(3, 14), (5, 18)])
def test_no_hidden_figure_follows_from_the_report(k: int, max_n: int) -> None:
    assert disclosures(k, max_n) == []


@pytest.mark.slow
def test_no_hidden_figure_follows_from_the_report_at_the_default_minimum() -> None:
    assert disclosures(10, 28) == []


def cell_by_cell(counts_: np.ndarray, k: int) -> dict:
    """The rule this replaced: each small figure hidden on its own, nothing complementary."""
    tp, fp, tn, fn = (int(c) for c in counts_[:4])
    values = figures((tp, fp, tn, fn))
    return {name: SUPPRESSED if 0 < v < k else v for name, v in values.items()}


def test_the_attack_finds_what_the_cell_by_cell_rule_gives_away() -> None:
    """The attack is not vacuous: hiding only small cells lets fn = n - tp - fp - tn through."""
    found = disclosures(5, 12, cell_by_cell)
    assert "(11, 1, 0, 0): fp = 1 follows from" in "\n".join(found)  # fp = n - tp - tn - fn
    report = {"tp": 30, "fp": 50, "tn": 30, "fn": SUPPRESSED, "n": 113, "correct": 60}
    derived = report["n"] - report["tp"] - report["fp"] - report["tn"]
    assert derived == 3  # the hidden cell, recovered exactly

    shipped = silo_report(counts(30, 50, 30, 3), 10)
    shown_counts = {name: shipped[name] for name in RELEASED if shipped[name] != SUPPRESSED}
    assert shown_counts == {"n": 113, "correct": 60}  # no three cells to subtract, no wrong cell to isolate
    assert shipped["accuracy"] == pytest.approx(60 / 113)
    assert shipped["sensitivity"] is None and shipped["specificity"] is None


@pytest.mark.parametrize(("table", "hidden"), [
    ((40, 30, 35, 0), set()),                                    # a zero is shown: "nobody" singles out no one
    ((40, 30, 35, 4), {"tp", "fp", "tn", "fn"}),                 # small fn: every cell hidden, accuracy kept
    ((40, 3, 35, 4), {"tp", "fp", "tn", "fn"}),                  # accuracy still shown: 7 misclassified
    ((40, 0, 5, 0), {"tp", "fp", "tn", "fn", "correct"}),         # correct = n would give away fp = fn = 0
    ((3, 0, 40, 0), {"tp", "fp", "tn", "fn", "correct"}),
    ((5, 5, 5, 5), {"tp", "fp", "tn", "fn"}),                     # n = 20, correct = 10: both shown
    ((2, 1, 3, 1), {"tp", "fp", "tn", "fn", "n", "correct"}),    # n < k
    ((9, 0, 0, 0), {"tp", "fp", "tn", "fn", "n", "correct"}),
])
def test_what_is_hidden(table: tuple[int, int, int, int], hidden: set[str]) -> None:
    report = silo_report(counts(*table), 10)
    assert {name for name in RELEASED if report[name] == SUPPRESSED} == hidden
    for name in RELEASED:  # a shown count is never 1..k-1
        assert report[name] == SUPPRESSED or not 0 < report[name] < 10
    assert report["small_cell_min"] == 10


def test_ratios_are_shown_only_with_the_counts_they_come_from() -> None:
    full = silo_report(counts(40, 30, 35, 20), 10)
    assert full["sensitivity"] == pytest.approx(40 / 60) and full["specificity"] == pytest.approx(35 / 65)
    assert full["accuracy"] == pytest.approx(75 / 125)
    for table in itertools.product((0, 3, 12), repeat=4):
        report = silo_report(counts(*table), 10)
        if report["accuracy"] is not None:
            assert SUPPRESSED not in (report["n"], report["correct"])
        if report["sensitivity"] is not None:
            assert SUPPRESSED not in (report["tp"], report["fn"])
        if report["specificity"] is not None:
            assert SUPPRESSED not in (report["tn"], report["fp"])


def test_the_ui_shows_hidden_figures_as_suppressed() -> None:
    report = silo_report(counts(40, 3, 35, 4), 10)
    row = {column: shown(report.get(column)) for column in SILO_COLUMNS}
    assert row["tp"] == row["fn"] == row["sensitivity"] == row["specificity"] == "suppressed"
    assert row["n"] == 82 and row["accuracy"] == pytest.approx(75 / 82)
    assert shown(silo_report(counts(3, 0, 40, 0), 10)["accuracy"]) == "suppressed"


def test_study_default_minimum() -> None:
    """The issue asks for a default of 10; the policy's default is what studies get unless they set one."""
    assert StudySpec.model_fields["small_cell_min"].default == 10
