"""The privacy ledger: durable, never reset, charged once per release, refusing when in doubt.

Real files in tmp_path and real Opacus RDP accounting; a second process checks durability.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policies.errors import PolicyError
from policies.privacy import PrivacyPolicy
from policies.study import Training
from silo_node.dp import plan_for_silo
from silo_node.ledger import PrivacyLedger, SiloBudget

ROOT = Path(__file__).resolve().parent.parent
POLICY = PrivacyPolicy(epsilon=1.0, delta=1e-3)
SIGMA, Q, STEPS = 2.4, 4 / 199, 100  # about Cleveland's per-round cost at epsilon 1 over 15 rounds
ENOSPC = OSError(28, "No space left on device")


def _open(state_dir: Path, study: str = "heart", privacy: PrivacyPolicy = POLICY) -> PrivacyLedger:
    return PrivacyLedger.load(state_dir, study, policy_hash=f"hash-of-{study}", privacy=privacy)


def _charge(ledger: PrivacyLedger, round_no: int, nonce: str | None = None):
    return ledger.charge(round_no, nonce or f"nonce-{round_no}", SIGMA, Q, STEPS)


def _file(state_dir: Path, study: str = "heart") -> Path:
    return PrivacyLedger.path_for(state_dir, study)


# ---- durability -------------------------------------------------------------------------------


def test_charge_is_durable_and_seen_by_a_new_process(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    for r in (1, 2, 3):
        _charge(ledger, r)
    code = (
        "import sys; from silo_node.ledger import PrivacyLedger; "
        "l = PrivacyLedger.load(sys.argv[1], 'heart'); print(l.seq, repr(l.spent()), l.head)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True)
    seq, spent, head = out.stdout.split()
    assert (int(seq), float(spent), head) == (3, ledger.spent(), ledger.head)


def test_restart_never_lowers_spend(tmp_path: Path) -> None:
    seen = [0.0]
    for r in range(1, 5):
        ledger = _open(tmp_path)  # a restarted node: a fresh object from disk each round
        assert ledger.spent() == pytest.approx(seen[-1], abs=1e-12)
        _charge(ledger, r)
        seen.append(ledger.spent())
    assert seen == sorted(seen) and seen[-1] > 0


def test_a_fresh_study_starts_at_zero_and_needs_its_policy(tmp_path: Path) -> None:
    assert _open(tmp_path).spent() == 0.0
    assert not _file(tmp_path).exists(), "nothing is written before the first charge"
    with pytest.raises(PolicyError, match="no privacy ledger"):
        PrivacyLedger.load(tmp_path, "heart")


# ---- what is charged ---------------------------------------------------------------------------


def test_same_round_and_nonce_is_charged_once(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    first = _charge(ledger, 1, "abc")
    spent = ledger.spent()
    again = _charge(_open(tmp_path), 1, "abc")  # a resent cached update, even after a restart
    assert again == first
    assert _open(tmp_path).seq == 1 and _open(tmp_path).spent() == spent


def test_new_nonce_for_the_same_round_is_a_new_release(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    _charge(ledger, 1, "abc")
    spent = ledger.spent()
    retrain = _charge(ledger, 1, "def")
    assert (retrain.kind, retrain.seq) == ("retrain", 2)
    assert ledger.spent() > spent


def test_same_nonce_with_a_different_update_is_a_new_release(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.charge(1, "abc", SIGMA, Q, STEPS, release_digest="aa" * 32)
    assert ledger.charge(1, "abc", SIGMA, Q, STEPS, release_digest="aa" * 32).seq == 1
    assert ledger.charge(1, "abc", SIGMA, Q, STEPS, release_digest="bb" * 32).kind == "retrain"
    assert ledger.seq == 2


def test_the_planned_study_fits_and_one_more_round_is_refused(tmp_path: Path) -> None:
    training = Training()
    plan = plan_for_silo(training, POLICY, 199)
    ledger = _open(tmp_path)
    assert ledger.rounds_left_at_rate(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round) == training.rounds
    for r in range(1, training.rounds + 1):
        assert ledger.decide(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, round=r).allowed
        ledger.charge(r, f"n{r}", plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    assert ledger.spent() == pytest.approx(POLICY.epsilon, rel=1e-3)
    assert ledger.rounds_left_at_rate(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round) == 0
    assert not ledger.decide(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round).allowed


def test_a_budget_for_exactly_two_rounds_trains_two_and_refuses_the_third(tmp_path: Path) -> None:
    probe = _open(tmp_path / "probe")
    _charge(probe, 1)
    _charge(probe, 2)
    two_rounds = probe.spent()  # what two rounds cost under this accountant, to set the budget
    privacy = PrivacyPolicy(epsilon=two_rounds * (1 + 1e-9), delta=POLICY.delta)
    ledger = _open(tmp_path / "silo", privacy=privacy)
    for r in (1, 2):
        assert ledger.decide(SIGMA, Q, STEPS, round=r).allowed
        _charge(ledger, r)
    third = ledger.decide(SIGMA, Q, STEPS, round=3)
    assert not third.allowed
    assert "round 3" in third.reason and f"{third.spent:.2f}" in third.reason and f"{third.budget:.2f}" in third.reason
    with pytest.raises(PolicyError, match="above"):
        _charge(ledger, 3)
    assert _open(tmp_path / "silo", privacy=privacy).seq == 2


def test_refusal_over_budget_says_spent_would_spend_and_budget(tmp_path: Path) -> None:
    ledger = _open(tmp_path, privacy=PrivacyPolicy(epsilon=0.3, delta=1e-3))
    r = 1
    while ledger.decide(SIGMA, Q, STEPS, round=r).allowed:
        _charge(ledger, r)
        r += 1
    decision = ledger.decide(SIGMA, Q, STEPS, round=r)
    assert decision.spent <= decision.budget < decision.would_spend
    for number in (decision.spent, decision.would_spend, decision.budget):
        assert f"{number:.2f}" in decision.reason
    assert f"round {r}" in decision.reason and "above" in decision.reason
    seq = ledger.seq
    with pytest.raises(PolicyError, match="above"):
        _charge(ledger, r)  # charge enforces the budget too, whatever the caller decided
    assert _open(tmp_path, privacy=PrivacyPolicy(epsilon=0.3, delta=1e-3)).seq == seq


def test_silo_ceiling_lowers_the_study_budget(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.set_ceiling(0.2)
    reopened = _open(tmp_path)
    assert reopened.budget() == 0.2
    assert reopened.rounds_left_at_rate(SIGMA, Q, STEPS) < _open(tmp_path / "other").rounds_left_at_rate(SIGMA, Q, STEPS)
    decision = reopened.decide(SIGMA, Q, 10 * STEPS)
    assert not decision.allowed and "ceiling" in decision.reason


def test_a_policy_cannot_change_a_study_budget(tmp_path: Path) -> None:
    _charge(_open(tmp_path), 1)
    with pytest.raises(PolicyError, match="cannot change"):
        _open(tmp_path, privacy=PrivacyPolicy(epsilon=5.0, delta=1e-3))


def test_two_studies_have_separate_ledgers(tmp_path: Path) -> None:
    a, b = _open(tmp_path, "study-a"), _open(tmp_path, "study-b")
    _charge(a, 1)
    _charge(a, 2)
    _charge(b, 1)
    assert (_open(tmp_path, "study-a").seq, _open(tmp_path, "study-b").seq) == (2, 1)
    assert _open(tmp_path, "study-a").spent() > _open(tmp_path, "study-b").spent() > 0
    assert _file(tmp_path, "study-a") != _file(tmp_path, "study-b")


# ---- refusing when in doubt ------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["not json", "truncated", "edited charge", "raised budget", "lowered history"])
def test_a_corrupted_ledger_is_refused_and_never_reset(tmp_path: Path, damage: str) -> None:
    ledger = _open(tmp_path)
    for r in (1, 2, 3):
        _charge(ledger, r)
    path = _file(tmp_path)
    text = path.read_text()
    data = json.loads(text)
    if damage == "not json":
        text = "{ this is not json"
    elif damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "edited charge":
        data["charges"][1]["noise_multiplier"] = 50.0
        text = json.dumps(data)
    elif damage == "raised budget":
        data["epsilon"] = 10.0
        text = json.dumps(data)
    else:  # a consistent truncation (dropping the last charges) is the witness' job, see below
        data["history"][0][2] -= STEPS
        text = json.dumps(data)
    path.write_text(text)
    with pytest.raises(PolicyError, match="corrupted|cannot be read"):
        _open(tmp_path)
    with pytest.raises(PolicyError):
        _charge(ledger, 4)  # an open ledger object re-reads the disk before charging
    assert path.read_text() == text, "a bad ledger is left for a person to restore, not replaced"


def test_a_deleted_ledger_of_a_study_that_trained_is_refused(tmp_path: Path) -> None:
    _charge(_open(tmp_path), 1)
    _file(tmp_path).unlink()
    with pytest.raises(PolicyError, match="missing"):
        _open(tmp_path)


def test_witness_detects_a_ledger_restored_from_an_older_backup(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    _charge(ledger, 1)
    backup = _file(tmp_path).read_bytes()
    _charge(ledger, 2)
    witnessed = (ledger.seq, ledger.head)  # the coordinator saw this with round 2's update
    _open(tmp_path).check_witness(*witnessed)
    _file(tmp_path).write_bytes(backup)
    with pytest.raises(PolicyError, match="older backup"):
        _open(tmp_path).check_witness(*witnessed)


def test_witness_detects_a_different_history(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    _charge(ledger, 1)
    with pytest.raises(PolicyError, match="differs"):
        ledger.check_witness(1, "0" * 64)
    ledger.check_witness(0, ledger.head_at(0))


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_write_leaves_the_old_ledger_and_sends_nothing(tmp_path: Path, monkeypatch, failing: str) -> None:
    ledger = _open(tmp_path)
    _charge(ledger, 1)
    before = _file(tmp_path).read_bytes()

    def disk_full(*args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(os, failing, disk_full)
    with pytest.raises(PolicyError, match="could not record the privacy charge durably.*nothing was sent"):
        _charge(ledger, 2)
    monkeypatch.undo()
    assert _file(tmp_path).read_bytes() == before
    assert ledger.seq == 1 and _open(tmp_path).seq == 1
    assert sorted(p.name for p in _file(tmp_path).parent.iterdir()) == [".lock", "heart.json", "index.json"]


# ---- the silo-wide ceiling ---------------------------------------------------------------------------


def test_silo_ceiling_caps_the_sum_of_study_budgets(tmp_path: Path) -> None:
    silo = SiloBudget(tmp_path)
    assert silo.fits(100.0).allowed, "no ceiling file: no silo-wide cap"
    silo.set_total_epsilon(2.5)
    _charge(_open(tmp_path, "study-a"), 1)  # charged: counts at its full epsilon 1
    silo.reserve("study-b", PrivacyPolicy(epsilon=1.0, delta=1e-3), "hash-b")  # approved, not yet trained
    assert SiloBudget(tmp_path).committed() == {"study-a": 1.0, "study-b": 1.0}
    assert silo.fits(0.5).allowed
    refused = silo.fits(1.0, "study-c")
    assert not refused.allowed and (refused.spent, refused.would_spend, refused.budget) == (2.0, 3.0, 2.5)
    assert "study-a" in refused.reason and "above" in refused.reason
    with pytest.raises(PolicyError, match="above"):
        silo.reserve("study-c", PrivacyPolicy(epsilon=1.0, delta=1e-3), "hash-c")
    assert silo.fits(1.0, "study-b").allowed, "re-approving a committed study does not count it twice"
