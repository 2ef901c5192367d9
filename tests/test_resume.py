"""Checkpoint and resume: the coordinator or the SuperLink dies mid-study, the study goes on.

The unit tests check what a checkpoint holds. The slow tests run a 4-round study over a
real SuperLink and four real `silo-node start` silos, kill the ServerApp (or the whole
SuperLink with it) after round 2 is checkpointed, and finish the study with
`coordinator start`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from coordinator.demo import read_summary, sample_cohorts
from coordinator.rounds import RoundRecord, StudyState
from coordinator.runtime import LocalFederation, SiloSpec, free_port
from coordinator.store import open_store
from policies.errors import PolicyError
from policies.metrics import metrics_from_counts
from policies.study import load_study, shipped_study

ROUNDS = 4
STUDY_ID = "heart-disease"


# ---- what a checkpoint holds (fast) ------------------------------------------------------


def test_checkpoint_round_trip_keeps_sums_and_records():
    state = StudyState(STUDY_ID, "a" * 64, stats_sum=np.arange(5.0), aggregates=[np.ones(3), np.full(3, 2.0)])
    state.rounds = [RoundRecord(1, ["a", "b"], ["a"], {"b": "no reply in time"}, pooled={"accuracy": 0.5},
                                privacy={"a": {"epsilon_spent": 0.1}}),
                    RoundRecord(2, ["a", "b"], ["a", "b"], {})]
    blob = state.to_checkpoint({"eval_sum": np.arange(4, dtype=np.uint8)}, {"round": 2, "next_nonces": {"a": "n1"}})
    back, arrays, meta = StudyState.from_checkpoint(blob, STUDY_ID, "a" * 64)
    np.testing.assert_array_equal(back.stats_sum, state.stats_sum)
    assert [a.tolist() for a in back.aggregates] == [a.tolist() for a in state.aggregates]
    assert back.rounds == state.rounds and back.started == state.started
    assert arrays["eval_sum"].tolist() == [0, 1, 2, 3] and meta == {"round": 2, "next_nonces": {"a": "n1"}}


def test_checkpoint_of_another_study_or_with_gaps_is_refused():
    state = StudyState(STUDY_ID, "a" * 64, aggregates=[np.ones(3)])
    blob = state.to_checkpoint({}, {})
    with pytest.raises(PolicyError, match="not heart-disease policy bbbbbbbbbbbb"):
        StudyState.from_checkpoint(blob, STUDY_ID, "b" * 64)
    with pytest.raises(PolicyError, match="cannot be read"):
        StudyState.from_checkpoint(b"not an archive", STUDY_ID, "a" * 64)
    with pytest.raises(ValueError, match="clash"):
        state.to_checkpoint({"agg_0002": np.ones(3)}, {})


def test_start_without_a_store_or_study_says_so_and_creates_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "start", "--state-dir", str(tmp_path / "s"),
                           "--insecure-local-demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr
    assert not (tmp_path / "s").exists()
    proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "start", "--state-dir", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--insecure-local-demo" in proc.stderr


def test_silo_outbox_answers_a_resend_after_a_service_restart(tmp_path):
    """A train reply is on disk before it leaves; a restarted service answers the resend from it."""
    from silo_node.outbox import Outbox

    box = Outbox(tmp_path, durable=frozenset({"train"}), size=3)
    update = np.arange(10, dtype=np.uint8)
    box.put(("train", 3, "n3"), ({"status": "ok", "round": 3}, {"update": update}))
    box.put(("query.enrol", 0, "e1"), ({"status": "ok", "round": 0}, {"enrol_pub": update}))
    box.put(("train", 4, "n4"), ({"status": "refused", "reason": "budget"}, {}))
    again = Outbox(tmp_path, durable=frozenset({"train"}), size=3)
    header, arrays = again.get(("train", 3, "n3"))
    assert header == {"status": "ok", "round": 3} and arrays["update"].tolist() == update.tolist()
    assert again.get(("query.enrol", 0, "e1")) is None and again.get(("train", 4, "n4")) is None
    for r in (5, 6, 7):
        again.put(("train", r, f"n{r}"), ({"status": "ok", "round": r}, {"update": update}))
    assert again.get(("train", 3, "n3")) is None  # only the newest `size` replies are kept
    assert len(list((tmp_path / "outbox").glob("*.npz"))) == 3


def test_supernode_keeper_restarts_then_gives_up_on_a_broken_setup():
    """An exited SuperNode is started again; one that never gets going stops the silo."""
    import threading

    from silo_node.supernode_keeper import GIVE_UP_AFTER, SuperNodeKeeper

    gave_up, lines = threading.Event(), []
    keeper = SuperNodeKeeper([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), backoff=0.1,
                             say=lines.append, on_give_up=gave_up.set)
    keeper.start()
    assert gave_up.wait(60), lines
    assert keeper.restarts == GIVE_UP_AFTER - 1 and keeper.stopping
    assert "exited with code 3" in lines[0] and "giving up" in lines[-1]
    keeper.stop()


# ---- real processes ------------------------------------------------------------------------


def _small_study(tmp_path: Path, *, private: bool, auto_rounds: int) -> Path:
    """The heart study shrunk for a test: 4 rounds of 20 local steps (a new policy hash)."""
    data = load_study(shipped_study()).model_dump(mode="json")
    data["training"].update(rounds=ROUNDS, local_steps=20)
    data["approval"] = {"mode": "auto", "auto_rounds": auto_rounds}
    if not private:
        data.update(privacy="none", encryption="none")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _wait(what: str, predicate, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    """Dead, or a zombie its parent (Flower's SuperExec) has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _supernode_pid(silo_log: str) -> int:
    """The SuperNode `silo-node start` launched (it prints the pid)."""
    return int(silo_log.split("SuperNode pid ", 1)[1].split()[0])


def _trained(silo_dir: Path, round_no: int) -> bool:
    path = silo_dir / "audit.jsonl"
    return path.exists() and any(e["action"] == "train.replied" and e["subject"].endswith(f"round-{round_no}")
                                 for e in _entries(path))


def _checkpointed(state: Path) -> int:
    """The last checkpointed round in the store, -1 if none yet."""
    try:
        store = open_store(None, state)
        try:
            row = store.load_last_checkpoint(STUDY_ID)
        finally:
            store.close()
    except PolicyError:
        return -1
    return -1 if row is None else row.round_no


def _coordinator_start(state: Path, fed: LocalFederation) -> tuple[dict, subprocess.CompletedProcess]:
    out = state / "resumed.json"
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "start", "--state-dir", str(state), "--superlink", fed.address,
         "--expected-silos", "4", "--json", str(out), "--timeout", "600", "--insecure-local-demo"],
        capture_output=True, text=True, timeout=900, cwd=state,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_four_rounds_once(state: Path, summary: dict, old_run: str) -> dict:
    """Exactly rounds 1..4 in the summary and the store; the audit names the restart."""
    assert summary["status"] == "completed", summary.get("reason")
    assert summary["rounds"] == ROUNDS
    assert [h["round"] for h in summary["history"]] == [1, 2, 3, 4]
    store = open_store(None, state)
    rounds = store.list_rounds(STUDY_ID)
    assert [(r.round_no, r.status) for r in rounds if r.round_no > 0] == [(r, "finished") for r in range(1, ROUNDS + 1)]
    assert store.get_study(STUDY_ID).status == "completed"
    new_run = str(summary["flower_run_id"])
    assert new_run != old_run
    entries = _entries(state / "coordinator" / "audit.jsonl")
    resumed = [e for e in entries if e["action"] == "study.resumed"]
    assert len(resumed) == 1
    details = resumed[0]["details"]
    assert details["old_run_id"] == old_run and details["new_run_id"] == new_run
    saved = [e["details"]["round"] for e in entries if e["action"] == "checkpoint.saved"]
    resumed_from = details["resumed_from_round"]
    assert saved == list(range(0, ROUNDS + 1))[: resumed_from + 1] + list(range(resumed_from + 1, ROUNDS + 1))
    assert [e["action"] for e in entries].count("round.finished") == ROUNDS
    assert {r.round_no: str(r.flower_run_id) for r in rounds if r.round_no > resumed_from} == \
        {r: new_run for r in range(resumed_from + 1, ROUNDS + 1)}
    store.close()
    return details


@pytest.mark.slow
def test_coordinator_killed_after_round_2_resumes_without_double_charge(tmp_path):
    """CKKS + DP study; rounds 3 and 4 wait for the lead. At the round-3 gate (round 2
    checkpointed) va's SuperNode is paused, the lead approves, and once the three other
    silos have trained and answered round 3 the ServerApp is SIGKILLed, so round 3 dies
    in flight. `coordinator start` finds the SuperLink alive, continues in a new run and
    resends round 3 with its checkpointed nonces: the silos answer from their outbox, so
    4 rounds and exactly one charge per round per silo.

    The final model cannot equal a run without a crash: DP noise comes from OS entropy, so
    no two runs agree. What must hold instead: the final evaluation is the evaluation of
    the model replayed from exactly the 4 checkpointed aggregates (nothing lost, nothing
    counted twice); the plaintext case below compares with an uninterrupted computation.
    """
    from policies.ckks import has_secret_key, load_context
    from silo_node.keys import load_study_secret
    from silo_node.worker import Silo

    study_path = _small_study(tmp_path, private=True, auto_rounds=2)
    study = load_study(study_path)
    state, cohorts = tmp_path, sample_cohorts()
    summary_path = state / "coordinator" / "summary.json"
    fed = LocalFederation(work_dir=state / "runtime" / "test")
    try:
        fed.start_superlink()
        silos = {name: fed.start_silo(SiloSpec(name, cohort, study_path, state / "silos" / name))
                 for name, cohort in cohorts.items()}
        fed.submit({"study-path": str(study_path), "state-dir": str(state), "expected-silos": 4})
        _wait("round 3 to wait for approval after checkpoint 2",
              lambda: (read_summary(summary_path) or {}).get("status") == "round 3 waiting for approval"
              and _checkpointed(state) == 2)
        before = read_summary(summary_path)
        old_run = str(before["flower_run_id"])
        va_node = _supernode_pid(silos["va"].log.read_text())
        os.kill(va_node, signal.SIGSTOP)  # va will not answer round 3 in the first run
        store = open_store(None, state)
        for r in (3, 4):
            store.record_approval(STUDY_ID, r, "approve", "lead-alice", "go on")
        store.close()
        others = [n for n in cohorts if n != "va"]
        _wait("three silos to answer round 3", lambda: all(_trained(state / "silos" / n, 3) for n in others))
        os.kill(int(before["pid"]), signal.SIGKILL)  # the coordinator's ServerApp, round 3 in flight
        _wait("the ServerApp to die", lambda: _gone(int(before["pid"])), 30)
        os.kill(va_node, signal.SIGCONT)
        assert _checkpointed(state) == 2
        summary, proc = _coordinator_start(state, fed)
        assert "resuming after round 2" in proc.stdout
    finally:
        fed.stop()
    details = _assert_four_rounds_once(state, summary, old_run)
    assert details["resumed_from_round"] == 2 and details["rounds_to_rerun"] == [3]
    resent = {n for n in cohorts if any(e["action"] == "request.resent" and e["subject"].endswith("round-3")
                                        for e in _entries(state / "silos" / n / "audit.jsonl"))}
    assert set(others) <= resent, f"round 3 was not answered from the outbox at {set(others) - resent}"

    for name in cohorts:
        silo_dir = state / "silos" / name
        ledger = json.loads((silo_dir / "ledger" / f"{STUDY_ID}.json").read_text())
        all_charges = [(c["round"], c["nonce"], c["kind"]) for c in ledger["charges"]]
        assert [c for c in all_charges if c[2] == "stats"] == [c for c in all_charges if c[0] == 0], name
        assert len([c for c in all_charges if c[2] == "stats"]) == 1, f"{name}: one statistics release: {all_charges}"
        charges = [c for c in all_charges if c[0] > 0]
        assert [c[0] for c in charges] == [1, 2, 3, 4], f"{name}: {all_charges}"
        assert {c[2] for c in charges} == {"release"}
        sent = [(e["subject"].rsplit("-", 1)[1], e["details"]["nonce"])
                for e in _entries(silo_dir / "audit.jsonl") if e["action"] == "train.replied"]
        assert sent == [(str(r), n) for r, n, _ in charges], f"{name}: what was sent differs from what was charged"

    store = open_store(None, state)
    last = store.load_last_checkpoint(STUDY_ID)
    assert last.round_no == ROUNDS
    back, arrays, meta = StudyState.from_checkpoint(last.encrypted_state, STUDY_ID, study.policy_hash())
    assert all(a.dtype == np.uint8 for a in back.aggregates) and back.stats_sum.dtype == np.uint8
    assert not has_secret_key(load_context(arrays["aggregator_context"].tobytes(), study.ckks))
    store.close()
    secret = load_study_secret(state / "silos" / "cleveland", STUDY_ID)
    probes = [secret[i:i + 64] for i in range(len(secret) // 4, len(secret) - 64, len(secret) // 8)]
    stored = b"".join(p.read_bytes() for p in (state / "coordinator").glob("fedcohort.db*"))
    assert not any(p in last.encrypted_state or p in stored for p in probes)

    workers = [Silo.from_cohort(n, study, p, state_dir=state / "silos" / n) for n, p in cohorts.items()]
    counts = np.sum([w.evaluate(back.stats_sum, back.aggregates) for w in workers], axis=0)
    replayed = metrics_from_counts(counts)
    assert summary["pooled"]["accuracy"] == pytest.approx(replayed["accuracy"], abs=1e-9)
    assert summary["pooled"]["loss"] == pytest.approx(replayed["loss"], abs=1e-5)


@pytest.mark.slow
def test_superlink_killed_mid_study_resumes_on_a_new_superlink(tmp_path):
    """Plaintext study (deterministic): the SuperLink and the ServerApp under it die after
    round 2 is checkpointed, with round 3 possibly in flight. `coordinator start` brings up
    a new SuperLink on the same address, the silos' SuperNodes register again (new node
    ids), the study finishes with exactly 4 rounds and the same result as an uninterrupted
    computation."""
    from tests.test_integration_flower import _in_process

    study_path = _small_study(tmp_path, private=False, auto_rounds=ROUNDS)
    state, cohorts = tmp_path, sample_cohorts()
    summary_path = state / "coordinator" / "summary.json"
    fed = LocalFederation(work_dir=state / "runtime" / "test", port=free_port())
    try:
        superlink = fed.start_superlink()
        silos = {name: fed.start_silo(SiloSpec(name, cohort, study_path, state / "silos" / name))
                 for name, cohort in cohorts.items()}
        fed.submit({"study-path": str(study_path), "state-dir": str(state), "expected-silos": 4})
        _wait("round 2 to be checkpointed", lambda: _checkpointed(state) >= 2)
        old_run = str(read_summary(summary_path)["flower_run_id"])
        os.kill(superlink.popen.pid, signal.SIGKILL)  # the SuperLink crashes; its ServerApp is orphaned
        superlink.popen.wait(timeout=30)
        assert all(p.alive() for p in silos.values())
        summary, proc = _coordinator_start(state, fed)
        assert all(p.alive() for p in silos.values()), "a silo service died with the SuperLink"
        restarted = [name for name, p in silos.items() if "starting a new one" in p.log.read_text()]
        assert sorted(restarted) == sorted(cohorts), "every SuperNode had to register with the new SuperLink"
    finally:
        fed.stop()
    details = _assert_four_rounds_once(state, summary, old_run)
    assert details["resumed_from_round"] >= 2
    expected = _in_process(study_path)
    assert summary["pooled"]["accuracy"] == pytest.approx(expected["pooled"]["accuracy"], abs=1e-9)
    assert summary["pooled"]["loss"] == pytest.approx(expected["pooled"]["loss"], abs=1e-6)
    assert summary["pooled"]["auroc"] == pytest.approx(expected["pooled"]["auroc"], abs=1e-6)
