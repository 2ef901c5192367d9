"""A real study over a real Flower SuperLink and four SuperNodes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from coordinator.demo import sample_cohorts
from coordinator.rounds import StudyState, final_evaluation
from policies.study import load_study, shipped_study
from silo_node.worker import Silo

pytestmark = pytest.mark.slow
ROUNDS = 2


def _demo(state, *extra: str, rounds: int | None = ROUNDS) -> tuple[dict, str]:
    out = state / "summary.json"
    rounds_args = ("--rounds", str(rounds)) if rounds else ()
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "demo", "--state-dir", str(state), "--json", str(out),
         "--timeout", "400", *rounds_args, *extra],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`coordinator demo --rounds 2` on a non-private copy of the heart study (deterministic)."""
    state = tmp_path_factory.mktemp("state")
    data = load_study(shipped_study()).model_dump(mode="json")
    data["privacy"] = "none"
    data["encryption"] = "none"
    study = state / "nonprivate.yaml"
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    summary, stdout = _demo(state, "--study", str(study))
    return state, summary, stdout


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """The shipped study (CKKS + DP-SGD at every silo), 2 rounds. Switzerland's silo IT set
    a lower ceiling (epsilon 0.9) than the study's 1.0: statistics + round 1 spend about
    0.81 there, round 2 would bring it to 1.0, so it must refuse round 2."""
    state = tmp_path_factory.mktemp("dpstate")
    data = load_study(shipped_study()).model_dump(mode="json")
    data["training"]["rounds"] = ROUNDS
    study = state / "study.yaml"
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "silo_node.cli", "approve", "--study", str(study), "--state-dir",
         str(state / "silos" / "switzerland"), "--yes", "--epsilon-ceiling", "0.9"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary, stdout = _demo(state, "--study", str(study), rounds=None)
    return state, summary, stdout


def _in_process(study_path) -> dict:
    study = load_study(study_path)
    silos = [Silo.from_cohort(name, study, path) for name, path in sample_cohorts().items()]
    state = StudyState(study.id, study.policy_hash())
    state.add_stats([s.stats_contribution() for s in silos])
    for r in range(1, study.training.rounds + 1):
        state.add_round([s.train(r, state.stats_sum, state.aggregates)[0] for s in silos])
    counts = [s.evaluate(state.stats_sum, state.aggregates) for s in silos]
    return final_evaluation(np.sum(counts, axis=0), {})


def test_demo_completes_and_reports(demo_run):
    state, summary, stdout = demo_run
    assert summary["status"] == "completed"
    assert summary["rounds"] == ROUNDS
    assert set(summary["center_accuracy"]) == {"cleveland", "hungary", "switzerland", "va"}
    assert all(0.0 <= a <= 1.0 for a in summary["center_accuracy"].values())
    assert 0.5 < summary["pooled_test_accuracy"] <= 1.0
    assert summary["mean_center_accuracy"] == pytest.approx(np.mean(list(summary["center_accuracy"].values())))
    assert summary["wall_seconds"] > 0
    for rnd in summary["history"]:
        assert sorted(rnd["replied"]) == ["cleveland", "hungary", "switzerland", "va"]
        assert rnd["refused"] == {}
    assert "4-hospital mean" in stdout and "FedYogi (FLamby" in stdout


def test_flower_run_matches_in_process_run(demo_run):
    """The transport changes nothing: same pooled metrics to 1e-6 as the in-process path."""
    state, summary, _ = demo_run
    expected = _in_process(state / "study.yaml")
    assert summary["pooled"]["loss"] == pytest.approx(expected["pooled"]["loss"], abs=1e-6)
    assert summary["pooled"]["accuracy"] == pytest.approx(expected["pooled"]["accuracy"], abs=1e-6)
    assert summary["pooled"]["auroc"] == pytest.approx(expected["pooled"]["auroc"], abs=1e-6)


def test_no_process_left_behind(demo_run):
    state, summary, _ = demo_run
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(state) not in out, "a process started by the demo is still running"


def test_small_cells_suppressed_in_summary(demo_run):
    """Switzerland's test set has one negative: its specificity cells never leave the silo."""
    _, summary, _ = demo_run
    swiss = summary["per_silo"]["switzerland"]
    assert swiss["specificity"] is None
    assert isinstance(swiss["tn"], str) or isinstance(swiss["fp"], str)


def test_audit_trail_exports_and_verifies(demo_run, tmp_path):
    """Every party logged the study; exports verify; an edited entry is named by verify."""
    state, _, _ = demo_run
    cli = [sys.executable, "-m", "coordinator.cli", "audit"]
    out = tmp_path / "exports"
    proc = subprocess.run([*cli, "export", "--state-dir", str(state), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    bundles = sorted(out.glob("*/*.zip"))
    assert {b.parent.name for b in bundles} == {"coordinator", "cleveland", "hungary", "switzerland", "va"}
    proc = subprocess.run([*cli, "verify", *map(str, bundles)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    coordinator_log = (state / "coordinator" / "audit.jsonl").read_text().splitlines()
    actions = [json.loads(line)["action"] for line in coordinator_log]
    assert actions.count("round.finished") == ROUNDS and "study.completed" in actions
    assert actions.count("audit.witnessed") >= 4 * ROUNDS  # each silo's head, every round
    silo_actions = [json.loads(line)["action"] for line in (state / "silos" / "va" / "audit.jsonl").read_text().splitlines()]
    assert silo_actions.count("train.replied") == ROUNDS and "audit.witnessed" in silo_actions
    _assert_closing_exchange(state, ["cleveland", "hungary", "switzerland", "va"], "completed")
    silo_out = tmp_path / "va-export"
    proc = subprocess.run([sys.executable, "-m", "silo_node.cli", "audit", "export", "--state-dir",
                           str(state / "silos" / "va"), "--out", str(silo_out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "silo_node.cli", "audit", "verify", *map(str, silo_out.glob("*.zip"))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    # tamper with the coordinator's exported JSONL inside a copy of the bundle directory
    tampered = out / "coordinator"
    jsonl = tampered / "audit.jsonl"
    lines = jsonl.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["subject"] = "edited"
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    jsonl.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([*cli, "verify", str(tampered)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "BROKEN" in proc.stdout and "entry 3" in proc.stdout


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_closing_exchange(state, silos: list[str], outcome: str) -> None:
    """The coordinator's final head is in every silo's log, and every silo's final head
    (its `close.replied` entry, which chains over that witness) is in the coordinator's."""
    coordinator = _log(state / "coordinator" / "audit.jsonl")
    closed = [e for e in coordinator if e["action"] == "study.closed"]
    assert len(closed) == 1 and closed[0]["details"]["outcome"] == outcome
    details = closed[0]["details"]
    final = next(e for e in coordinator if e["seq"] == details["final_seq"])
    assert final["hash"] == details["final_head"] and final["action"] in ("study.status", "study.completed", "study.stopped")
    assert set(details["silo_heads"]) == set(silos) and details["no_final_head"] == []
    seen_by_coordinator = {(e["details"]["party"], e["details"]["seq"], e["details"]["head"])
                           for e in coordinator if e["action"] == "audit.witnessed"}
    for silo in silos:
        entries = _log(state / "silos" / silo / "audit.jsonl")
        by_seq = {e["seq"]: e for e in entries}
        head = details["silo_heads"][silo]
        assert by_seq[head["seq"]]["hash"] == head["head"] and by_seq[head["seq"]]["action"] == "close.replied"
        assert (f"silo:{silo}", head["seq"], head["head"]) in seen_by_coordinator
        witness = by_seq[head["seq"] - 1]  # what the silo logged just before its final reply
        assert witness["action"] == "audit.witnessed"
        assert witness["details"] == {"party": "coordinator", "seq": details["final_seq"], "head": details["final_head"]}


def test_dp_spend_is_recorded_and_witnessed(dp_run):
    """Each silo charges its ledger durably for the statistics release and per round; the
    coordinator sees spend vs budget; a silo over its own ceiling refuses with the numbers
    and the round goes on without it."""
    from silo_node.ledger import PrivacyLedger

    state, summary, _ = dp_run
    assert summary["status"] == "completed"
    study = load_study(state / "study.yaml")
    first, second = summary["history"]
    assert set(first["privacy"]) == {"cleveland", "hungary", "switzerland", "va"}
    assert set(second["privacy"]) == {"cleveland", "hungary", "va"}
    reason = second["refused"]["switzerland"]
    assert "0.90" in reason and "spent" in reason  # spent, would-spend and this silo's budget
    for silo in ("cleveland", "va"):
        spend = [rnd["privacy"][silo]["epsilon_spent"] for rnd in summary["history"]]
        assert 0 < spend[0] < spend[1] <= study.dp.epsilon
        assert second["privacy"][silo]["epsilon_budget"] == study.dp.epsilon
        ledger = PrivacyLedger.load(state / "silos" / silo, study.id)
        assert ledger.seq == ROUNDS + 1 and ledger.spent() == pytest.approx(spend[-1])
        assert ledger.state.charges[0].kind == "stats" and ledger.released_count() is not None
    swiss = PrivacyLedger.load(state / "silos" / "switzerland", study.id)
    assert swiss.seq == 2 and swiss.spent() == pytest.approx(first["privacy"]["switzerland"]["epsilon_spent"])
    assert first["privacy"]["switzerland"]["epsilon_budget"] == 0.9
    assert 0.5 < summary["pooled_test_accuracy"] <= 1.0


def test_store_shows_each_silo_enrolment_validation_ceremony_and_connection(dp_run):
    """What the Silos page reads comes from the real run: counts-only validation reports
    (no local file path), key ceremony done, the node id, enrolment key and last contact."""
    from coordinator.store import open_store

    state, summary, _ = dp_run
    study = load_study(state / "study.yaml")
    store = open_store(None, state)
    enrolments = {e.silo: e for e in store.list_enrolments(study.id, version=study.version)}
    assert set(enrolments) == {"cleveland", "hungary", "switzerland", "va"}
    for name, e in enrolments.items():
        assert e.status == "validated" and e.key_ceremony == "done"
        report = e.validation_report
        assert report and report["ok"] is True and report["study_id"] == study.id
        assert "file" not in report and str(state) not in json.dumps(report)
        assert any(r["rule"] == "cohort.min_rows" and r["passed"] for r in report["results"])
    assert any(not r["passed"] for r in enrolments["switzerland"].validation_report["results"])  # chol = 0 warns
    silos = {s.name: s for s in store.list_silos()}
    for name in enrolments:
        assert silos[name].last_seen is not None and silos[name].flower_node_id is not None
        assert len(silos[name].key_fingerprint or "") == 64


def test_coordinator_never_holds_the_secret_key(dp_run):
    """The shipped study is CKKS: the ceremony ran, and no coordinator file holds secret-key bytes."""
    from policies.ckks import has_secret_key, load_context
    from silo_node.keys import load_study_secret

    state, summary, _ = dp_run
    study = load_study(state / "study.yaml")
    assert study.encryption == "ckks"
    entries = [json.loads(line) for line in (state / "coordinator" / "audit.jsonl").read_text().splitlines()]
    ceremony = [e for e in entries if e["action"] == "key.ceremony_done"]
    assert len(ceremony) == 1 and ceremony[0]["details"]["holder"] == study.ckks.key_holder == "cleveland"
    assert sum(e["action"] == "key.enrolment_seen" for e in entries) == 4
    secrets_at_silos = [load_study_secret(state / "silos" / s, study.id) for s in ("cleveland", "va")]
    assert secrets_at_silos[0] == secrets_at_silos[1]  # the sealed copy opened to the same key
    assert has_secret_key(load_context(secrets_at_silos[0], study.ckks))
    probe = secrets_at_silos[0][len(secrets_at_silos[0]) // 2:][:64]
    for path in (state / "coordinator").rglob("*"):
        if path.is_file():
            assert probe not in path.read_bytes(), f"secret-key bytes found in {path}"
    for path in (state / "silos" / "va" / "keys").iterdir():
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_manual_approval_gate_waits_then_runs(tmp_path):
    """`approval: manual`: the ServerApp waits for a named user's approval in the store."""
    import threading
    import time

    from coordinator.store import open_store

    data = load_study(shipped_study()).model_dump(mode="json")
    data.update(privacy="none", encryption="none", approval={"mode": "manual", "auto_rounds": 0})
    data["training"]["rounds"] = 1
    study_path = tmp_path / "manual.yaml"
    study_path.write_text(yaml.safe_dump(data, sort_keys=False))
    state = tmp_path / "state"
    seen: dict[str, object] = {}

    def lead() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                store = open_store(None, state)
                rnd = store.get_round("heart-disease", 1)
                if rnd is not None and rnd.status == "waiting_approval":
                    time.sleep(3)  # the gate must hold while nobody decides
                    seen["still_waiting"] = store.get_round("heart-disease", 1).status
                    store.record_approval("heart-disease", 1, "approve", "lead-alice", "looks fine")
                    return
            except Exception:  # the store may not exist yet
                pass
            time.sleep(0.5)

    thread = threading.Thread(target=lead, daemon=True)
    thread.start()
    summary, _ = _demo(state, "--study", str(study_path), rounds=None)
    thread.join(timeout=10)
    assert seen.get("still_waiting") == "waiting_approval"
    assert summary["status"] == "completed" and summary["rounds"] == 1
    approvals = open_store(None, state).list_approvals("heart-disease")
    assert [(a.user, a.decision) for a in approvals] == [("lead-alice", "approve")]


def test_late_silo_receives_the_key_and_joins(tmp_path):
    """A silo that connects after the key ceremony gets the same key, sealed by the key
    holder, and contributes from the next round on. Every silo IT pinned its peers by name,
    so each silo checks that the key came from cleveland's pinned enrolment key."""
    import hashlib
    import time

    from coordinator.demo import read_summary
    from coordinator.runtime import SiloSpec, local_federation
    from coordinator.store import open_store
    from silo_node.approval import approve
    from silo_node.keys import EnrolmentKey, load_study_secret

    data = load_study(shipped_study()).model_dump(mode="json")
    data["training"]["rounds"] = 3
    data["approval"] = {"mode": "auto", "auto_rounds": 1}  # round 2 waits for the lead
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(data, sort_keys=False))
    study = load_study(study_path)
    cohorts = sample_cohorts()
    keys = {name: EnrolmentKey.load_or_create(tmp_path / "silos" / name) for name in cohorts}
    for name in cohorts:  # `silo-node approve --pin NAME=FINGERPRINT` for every peer
        approve(tmp_path / "silos" / name, study, [f"{n}={k.fingerprint()}" for n, k in keys.items() if n != name], "it")
    summary_path = tmp_path / "coordinator" / "summary.json"
    with local_federation(tmp_path / "runtime") as fed:
        fed.start_superlink()
        for name in ("cleveland", "hungary", "switzerland"):
            fed.start_silo(SiloSpec(name, cohorts[name], study_path, tmp_path / "silos" / name))
        fed.submit({"study-path": str(study_path), "state-dir": str(tmp_path), "expected-silos": 3})
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and "round 2 waiting" not in (read_summary(summary_path) or {}).get("status", ""):
            time.sleep(0.5)
        late = fed.start_silo(SiloSpec("va", cohorts["va"], study_path, tmp_path / "silos" / "va"))
        while time.monotonic() < deadline and "SuperNode ID" not in late.log.read_text():
            time.sleep(0.5)
        store = open_store(None, tmp_path)
        for r in (2, 3):
            store.record_approval("heart-disease", r, "approve", "lead-alice")
        while time.monotonic() < deadline and (read_summary(summary_path) or {}).get("status") not in ("completed", "stopped"):
            time.sleep(0.5)
    summary = read_summary(summary_path)
    assert summary["status"] == "completed", summary.get("reason")
    assert "va" not in summary["history"][0]["replied"]
    assert "va" in summary["history"][1]["replied"] and "va" in summary["history"][2]["replied"]
    assert "va" in summary["final"]["per_silo"]
    assert load_study_secret(tmp_path / "silos" / "va", study.id) == load_study_secret(tmp_path / "silos" / "cleveland", study.id)
    actions = [json.loads(line)["action"] for line in (tmp_path / "coordinator" / "audit.jsonl").read_text().splitlines()]
    assert "silo.joined_late" in actions
    holder_fp = hashlib.sha256(keys["cleveland"].public_bytes()).hexdigest()
    for name in ("hungary", "va"):
        entries = [json.loads(line) for line in (tmp_path / "silos" / name / "audit.jsonl").read_text().splitlines()]
        received = [e["details"] for e in entries if e["action"] == "key.received"]
        assert received == [{"sealed_by_fingerprint": holder_fp, "holder_pinned": True}], name
    _assert_closing_exchange(tmp_path, ["cleveland", "hungary", "switzerland", "va"], "completed")
