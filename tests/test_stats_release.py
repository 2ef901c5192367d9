"""The statistics round: clipped to the schema, noised and charged under DP, its count the weight.

Real Opacus RDP accounting, real ledgers on disk, the heart study's real cohorts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.demo import sample_cohorts
from coordinator.rounds import StudyState
from policies import messages as m
from policies.audit import open_party_log
from policies.errors import PolicyError
from policies.privacy import PrivacyPolicy
from policies.study import StudySpec, load_study, shipped_study
from silo_node import service
from silo_node.dp import STATS_SAMPLE_RATE, epsilon_of, plan_with_stats
from silo_node.features import clipped_moments, moments, normaliser_from_moments, stat_bounds
from silo_node.ledger import PrivacyLedger
from silo_node.stats_release import (
    COUNT_WEIGHT, MIN_STD_Z, add_gaussian_noise, normaliser_from_noised, sensitivity, weight_rows,
)
from silo_node.worker import Silo

DELTA = 1e-3


def _study(private: bool = True, epsilon: float = 1.0, **training) -> StudySpec:
    base = load_study(shipped_study())
    privacy = base.dp.model_copy(update={"epsilon": epsilon, "delta": DELTA}) if private else "none"
    return base.model_copy(update={"encryption": "none", "privacy": privacy,
                                   "training": base.training.model_copy(update=training)})


def _silos(study: StudySpec, tmp_path: Path) -> list[Silo]:
    return [Silo.from_cohort(n, study, p, state_dir=tmp_path / n) for n, p in sample_cohorts().items()]


# ---- clipping ---------------------------------------------------------------------------------


def test_released_moments_are_of_values_clipped_to_the_schema(heart_study, sample_paths) -> None:
    silo = Silo.from_cohort("switzerland", _study(private=False), sample_paths["switzerland"])
    bounds = stat_bounds(heart_study)
    x = silo.design.x_train
    assert (x[:, 3] == 0).all()  # chol 0 (unknown) at Switzerland: below the schema's 80
    released = silo.stats_contribution()
    np.testing.assert_allclose(released, moments(np.clip(x, bounds.low, bounds.high), bounds.centre))
    mean, std = normaliser_from_moments(released, bounds.centre)
    assert mean[3] == pytest.approx(80.0)  # counted as the range's floor, not as 0
    assert not np.allclose(released, moments(x, bounds.centre))


def test_every_record_moves_the_release_by_at_most_the_sensitivity(heart_study) -> None:
    """Worst cases: each value at a bound, or out of range (clipped back), one-hot groups one level hot."""
    bounds = stat_bounds(heart_study)
    rng = np.random.default_rng(0)
    k = bounds.n_numeric
    rows = rng.choice([-1e3, 1e3], size=(200, len(bounds.centre)))  # far outside: every value clipped
    rows[:, k:] = 0.0
    rows[:, k], rows[:, k + 3] = 1.0, 1.0  # one level hot in each of the two one-hot groups (cp 3, restecg 2)
    for row in rows:
        one = clipped_moments(row[None, :], bounds)
        z = one / np.concatenate([[1.0], bounds.half_width, bounds.half_width ** 2])
        d = len(bounds.centre)
        released = np.concatenate([[COUNT_WEIGHT * z[0]], z[1 : 1 + d], z[1 + d :][~bounds.two_valued]])
        assert np.linalg.norm(released) <= sensitivity(bounds) + 1e-12


def test_a_numeric_feature_without_range_is_refused_by_name(heart_study) -> None:
    cohort = heart_study.cohort
    rule = cohort.columns["age"].model_copy(update={"range": None})
    unbounded = heart_study.model_copy(update={"cohort": cohort.model_copy(
        update={"columns": {**cohort.columns, "age": rule}})})
    with pytest.raises(PolicyError, match="'age' has neither a range nor categories"):
        stat_bounds(unbounded)


# ---- noise and its post-processing ---------------------------------------------------------------


def test_noise_is_scaled_by_sensitivity_and_the_count_weighted(heart_study) -> None:
    bounds = stat_bounds(heart_study)
    m0 = np.zeros(1 + 2 * len(bounds.centre))
    draws = np.stack([add_gaussian_noise(m0, bounds, 3.0, np.random.default_rng(s)) for s in range(4000)])
    expected = 3.0 * sensitivity(bounds)
    assert draws[:, 0].std() == pytest.approx(expected / COUNT_WEIGHT, rel=0.05)
    age = 1  # first sum slot, in years: one z unit is the half-width
    assert draws[:, age].std() == pytest.approx(expected * bounds.half_width[0], rel=0.05)


def test_noised_normaliser_stays_usable_when_noise_makes_variance_negative(heart_study) -> None:
    bounds = stat_bounds(heart_study)
    d = len(bounds.centre)
    broken = np.concatenate([[-40.0], np.full(d, 1e6), np.full(d, -1e6)])  # negative count, impossible sums
    mean, std = normaliser_from_noised(broken, bounds)
    assert np.all(mean >= bounds.low) and np.all(mean <= bounds.high)
    assert np.all(std >= MIN_STD_Z * bounds.half_width)
    assert np.isfinite(std).all()


def test_weight_rows_is_rounded_and_clamped_to_the_schema_sizes() -> None:
    assert weight_rows(-12.3, 20, 1000) == 20
    assert weight_rows(57.6, 20, 1000) == 58
    assert weight_rows(5e4, 20, 1000) == 1000


# ---- the whole study against the budget ------------------------------------------------------------


def test_stats_plus_all_planned_rounds_fit_the_budget_and_the_stats_charge_is_in_the_ledger(tmp_path) -> None:
    study = _study(epsilon=1.0)
    silos = _silos(study, tmp_path)
    state = StudyState(study.id, study.policy_hash())
    released = [s.release_stats(nonce="stats-1") for s in silos]
    state.add_stats([r.moments for r in released])
    for r in range(1, study.training.rounds + 1):
        state.add_round([s.train(r, state.stats_sum, state.aggregates, nonce=f"n{r}").update for s in silos])
    for silo, rel in zip(silos, released):
        ledger = silo.ledger()
        plan = silo.dp_plan()
        first = ledger.state.charges[0]
        assert (first.kind, first.round, first.noise_multiplier, first.sample_rate) == (
            "stats", 0, plan.stats_noise_multiplier, STATS_SAMPLE_RATE)
        assert first.released_count == pytest.approx(rel.moments[0])  # the count that left is recorded
        assert [c.kind for c in ledger.state.charges[1:]] == ["release"] * study.training.rounds
        spent = ledger.spent()
        assert study.dp.epsilon * 0.99 <= spent <= study.dp.epsilon
        assert spent == pytest.approx(epsilon_of(ledger.state.history, DELTA))
        assert rel.privacy["ledger_seq"] == 1 and rel.privacy["epsilon_spent"] == pytest.approx(first.epsilon_after)
        assert not ledger.decide(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round).allowed
        # reopened from disk: the same spend (the charge was durable)
        reopened = PrivacyLedger.load(silo.state_dir, study.id)
        assert reopened.spent() == spent and reopened.released_count() == first.released_count


def test_training_alone_gets_the_budget_minus_the_stats_share() -> None:
    study = _study(epsilon=1.0)
    plan = plan_with_stats(study.training, study.dp, 199)
    steps = study.training.rounds * study.training.local_steps
    training_only = epsilon_of([(plan.noise_multiplier, plan.sample_rate, steps)], DELTA)
    assert training_only == pytest.approx(study.dp.training_epsilon(), rel=1e-3)
    both = [(plan.stats_noise_multiplier, 1.0, 1), (plan.noise_multiplier, plan.sample_rate, steps)]
    assert study.dp.epsilon * 0.999 <= epsilon_of(both, DELTA) <= study.dp.epsilon


def test_stats_budget_share_is_validated() -> None:
    for bad in (0.0, 0.6, -0.1):
        with pytest.raises(ValueError, match="stats_budget_share"):
            PrivacyPolicy(epsilon=1.0, delta=1e-5, stats_budget_share=bad)


# ---- the aggregation weight ------------------------------------------------------------------------


def test_the_noised_count_is_the_aggregation_weight(tmp_path) -> None:
    study = _study(rounds=2)
    silos = _silos(study, tmp_path)
    state = StudyState(study.id, study.policy_hash())
    state.add_stats([s.stats_contribution(nonce="s") for s in silos])
    for r in (1, 2):
        updates = [s.train(r, state.stats_sum, state.aggregates, nonce=f"n{r}").update for s in silos]
        for silo, update in zip(silos, updates):
            count = silo.ledger().released_count()
            expected = weight_rows(count, study.cohort.min_rows, study.cohort.max_rows) / study.cohort.max_rows
            assert update[-2] == expected  # the same noised count every round, never the exact n
            assert count != float(len(silo.design.train_idx))
        state.add_round(updates)


def test_without_dp_the_weight_is_the_training_rows(tmp_path, sample_paths) -> None:
    study = _study(private=False)
    silo = Silo.from_cohort("cleveland", study, sample_paths["cleveland"])
    assert silo.aggregation_weight() == len(silo.design.train_idx) / study.cohort.max_rows


def test_a_silo_joining_after_the_stats_round_is_charged_for_its_count_first(tmp_path, sample_paths) -> None:
    study = _study()
    late = Silo.from_cohort("va", study, sample_paths["va"], state_dir=tmp_path / "va")
    late.train(1, _pooled_stats(study, tmp_path), [], nonce="n1")
    kinds = [c.kind for c in late.ledger().state.charges]
    assert kinds == ["stats", "release"]
    assert late.ledger().spent() <= study.dp.epsilon


def _pooled_stats(study: StudySpec, tmp_path: Path) -> np.ndarray:
    others = [Silo.from_cohort(n, study, p, state_dir=tmp_path / f"early-{n}")
              for n, p in sample_cohorts().items() if n != "va"]
    return np.sum([s.stats_contribution(nonce="s") for s in others], axis=0)


# ---- refusal before anything leaves -----------------------------------------------------------------


def test_a_stats_release_above_the_ceiling_is_refused_before_anything_leaves(tmp_path, sample_paths) -> None:
    study = _study()
    silo = Silo.from_cohort("cleveland", study, sample_paths["cleveland"], state_dir=tmp_path / "cleveland")
    silo.ledger().set_ceiling(0.001)  # silo IT's cap: below what the statistics release costs
    ledger_file = PrivacyLedger.path_for(silo.state_dir, study.id)
    before = ledger_file.read_bytes()
    log = open_party_log(silo.state_dir, silo.name, "silo")
    req = m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=0, nonce="s1")
    header, out = service.handle(silo, log, m.STATS, req.model_dump(), {})
    assert header["status"] == "refused" and out == {}  # no moments in the reply
    assert "statistics release" in header["reason"] and "ceiling" in header["reason"]
    assert ledger_file.read_bytes() == before  # nothing charged
    assert silo.ledger().seq == 0
    entries = [json.loads(line) for line in (silo.state_dir / "audit.jsonl").read_text().splitlines() if line.strip()]
    assert entries[-1]["action"] == "stats.refused"
