"""Faults at one silo, over real processes on 127.0.0.1 (issue 7, point 4).

Each test runs a real Flower SuperLink, the ServerApp (`flwr run`) and three real
`silo-node start` silos (service + SuperNode) on the sample cohorts, a shrunk copy of the
shipped heart study (2 or 3 rounds of 20 local steps, `min_silos: 2`, no CKKS so that no
key ceremony is needed), and one fault at one silo:

- killed mid-round (SIGKILL of its service and SuperNode right after its privacy charge),
  then restarted with `silo-node start`;
- its clock 3 hours ahead (the whole `silo-node start` tree under Debian's libfaketime);
- its disk full when it writes its ledger (a real tmpfs, full, in the silo's own mount
  namespace: `unshare --mount`, as root here and in CI);
- its cohort file changed between rounds, then restored.

The ServerApp's approval gate holds the round after the fault until the test has set it
up (the lead approves in the store, as the web UI does); the SuperLink's heartbeat, not
the test, tells the coordinator a killed silo is gone. The fast tests at the end check the
same silo-side rules on the real request handler without a federation.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest
import yaml

from coordinator.demo import read_summary, sample_cohorts
from coordinator.runtime import LocalFederation, Process, SiloSpec, free_port
from coordinator.store import open_store
from policies.study import load_study, shipped_study
from silo_node.ledger import PrivacyLedger
from tests.test_resume import _entries, _wait

STUDY_ID = "heart-disease"
SILOS = ("cleveland", "hungary", "va")
REPLY_TIMEOUT = 400  # seconds a round waits for replies on a loaded machine (a dead node is reported sooner)
SLOW_TIMEOUT = 1500  # seconds per real-process test on a loaded 2-core machine (pytest-timeout's default: 600)
LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))),
                   Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"))  # Debian's libfaketime


def _study(tmp_path: Path, *, rounds: int, auto_rounds: int, private: bool) -> Path:
    """The heart study shrunk for a fault test (a new policy hash): 20 local steps, two silos suffice."""
    data = load_study(shipped_study()).model_dump(mode="json")
    data["training"].update(rounds=rounds, local_steps=20)
    data["min_silos"] = 2
    data["encryption"] = "none"
    data["approval"] = {"mode": "auto", "auto_rounds": auto_rounds}
    if not private:
        data["privacy"] = "none"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@contextmanager
def _federation(tmp_path: Path) -> Iterator[LocalFederation]:
    fed = LocalFederation(work_dir=tmp_path / "runtime")
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.stop()


def _spec(tmp_path: Path, name: str, study: Path, cohort: Path | None = None) -> SiloSpec:
    return SiloSpec(name, cohort or sample_cohorts()[name], study, tmp_path / "silos" / name)


def _connections(proc: Process) -> int:
    """How often this silo's SuperNode has connected (the log is appended to across restarts)."""
    return proc.log.read_text(errors="replace").count("SuperNode ID") if proc.log.exists() else 0


def _submit(fed: LocalFederation, tmp_path: Path, study: Path, procs: dict[str, Process]) -> None:
    """Submit the study once every silo's SuperNode is connected (so all take part from round 1)."""
    for name, proc in procs.items():
        _wait(f"{name}'s SuperNode to connect", lambda p=proc: _alive_or_fail(p) and _connections(p) > 0, 400)
    fed.submit({"study-path": str(study), "state-dir": str(tmp_path), "expected-silos": len(procs),
                "reply-timeout": REPLY_TIMEOUT})


def _alive_or_fail(proc: Process) -> bool:
    assert proc.alive(), f"{proc.name} exited: {proc.log.read_text(errors='replace')[-3000:]}"
    return True


def _status(tmp_path: Path) -> str:
    return (read_summary(tmp_path / "coordinator" / "summary.json") or {}).get("status", "")


def _wait_status(tmp_path: Path, status: str, timeout: float = 600) -> None:
    _wait(f"study status {status!r}", lambda: _status(tmp_path) in (status, "stopped"), timeout)
    summary = read_summary(tmp_path / "coordinator" / "summary.json")
    assert summary["status"] == status, summary.get("reason")


def _approve(tmp_path: Path, *rounds: int) -> None:
    store = open_store(None, tmp_path)
    try:
        for r in rounds:
            store.record_approval(STUDY_ID, r, "approve", "lead-alice", "fault test")
    finally:
        store.close()


def _finished(tmp_path: Path) -> dict:
    _wait_status(tmp_path, "completed")
    return read_summary(tmp_path / "coordinator" / "summary.json")


def _silo_log(state_dir: Path) -> list[dict]:
    return _entries(state_dir / "audit.jsonl")


def _round(summary: dict, r: int) -> dict:
    return next(h for h in summary["history"] if h["round"] == r)


def _kill_node(proc: Process) -> None:
    """SIGKILL a silo as a power cut would: its service and its SuperNode (own session)."""
    supernode = int(re.findall(r"SuperNode pid (\d+)", proc.log.read_text(errors="replace"))[-1])
    for pgid in (proc.popen.pid, supernode):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.popen.wait(timeout=30)


# ---- 1. a silo killed mid-round ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_silo_killed_mid_round_rest_finish_it_rejoins_and_its_spend_is_accounted(tmp_path):
    """DP study, 3 rounds (round 3 waits for the lead). va is SIGKILLed the moment its round-2
    charge is on disk. Round 2 completes with cleveland and hungary; `silo-node start` brings
    va back as a new node, which trains round 3. Every privacy charge in va's ledger is one the
    coordinator accepted, one va recorded as released-but-lost, or one va logged as sent that
    the coordinator's round record shows never arrived."""
    study_path = _study(tmp_path, rounds=3, auto_rounds=2, private=True)
    va = _spec(tmp_path, "va", study_path)
    ledger_file = PrivacyLedger.path_for(va.state_dir, STUDY_ID)
    with _federation(tmp_path) as fed:
        procs = {n: fed.start_silo(_spec(tmp_path, n, study_path)) for n in SILOS}
        _submit(fed, tmp_path, study_path, procs)
        _wait("va to answer round 1", lambda: _replied(va.state_dir, "train", 1), 600)
        deadline = time.monotonic() + 300
        while not _charged(ledger_file, 2):  # then as fast as we can: kill right after the charge
            assert time.monotonic() < deadline and procs["va"].alive(), "va never charged round 2"
            time.sleep(0.002)
        _kill_node(procs["va"])
        _wait_status(tmp_path, "round 3 waiting for approval", 600)
        assert not _replied(va.state_dir, "train", 3)
        before = _connections(procs["va"])
        procs["va"] = fed.start_silo(va)  # silo IT restarts the node
        _wait("va's new SuperNode to connect", lambda: _alive_or_fail(procs["va"]) and _connections(procs["va"]) > before, 400)
        _approve(tmp_path, 3)
        summary = _finished(tmp_path)

    second, third = _round(summary, 2), _round(summary, 3)
    assert sorted(second["replied"]) == ["cleveland", "hungary"], second
    assert "va" in second["refused"] and ("no reply" in second["refused"]["va"]), second["refused"]
    assert sorted(third["replied"]) == ["cleveland", "hungary", "va"] and third["refused"] == {}, third
    assert summary["rounds"] == 3 and summary["final"]["per_silo"].keys() >= {"va"}
    coordinator_log = _entries(tmp_path / "coordinator" / "audit.jsonl")
    assert [e["subject"] for e in coordinator_log if e["action"] == "silo.disconnected"] == ["va"]
    assert sum(e["action"] == "silo.joined_late" for e in coordinator_log) == 1  # va's new node

    # va's spend: every charge accounted for, nothing charged twice, the spend never lower.
    ledger = PrivacyLedger.load(va.state_dir, STUDY_ID)
    charges = {c.seq: c for c in ledger.state.charges}
    assert [c.kind for c in ledger.state.charges] == ["stats", "release", "release", "release"]
    accepted = {h["privacy"]["va"]["ledger_seq"]: h["round"] for h in summary["history"] if "va" in h["privacy"]}
    assert sorted(accepted.values()) == [1, 3]
    log = _silo_log(va.state_dir)
    lost = {e["details"]["ledger_seq"] for e in log if e["action"] == "privacy.released_but_lost"}
    sent_unseen = {e["details"]["ledger_seq"] for e in log if e["action"] == "train.replied"} - set(accepted)
    round2 = next(s for s, c in charges.items() if c.round == 2)
    assert round2 in lost | sent_unseen, "the charge of the round va was killed in is not accounted for"
    assert not lost & set(accepted) and not lost & sent_unseen
    for seq in sent_unseen:  # logged as sent at va, never received: the coordinator says so
        assert "va" in _round(summary, charges[seq].round)["refused"]
    assert set(charges) == {1} | set(accepted) | lost | sent_unseen  # 1: the statistics release
    assert [e["details"]["ledger_seq"] for e in log if e["action"] == "privacy.released_but_lost"] == sorted(lost)
    assert third["privacy"]["va"]["epsilon_spent"] == pytest.approx(ledger.spent(), rel=1e-12)
    assert ledger.spent() == pytest.approx(charges[max(charges)].epsilon_after, rel=1e-12)


def _charged(ledger_file: Path, round_no: int) -> bool:
    try:
        return any(c["round"] == round_no for c in json.loads(ledger_file.read_text())["charges"])
    except (FileNotFoundError, ValueError, KeyError):
        return False  # not written yet (the file is only ever replaced whole, by rename)


def _replied(state_dir: Path, kind: str, round_no: int) -> bool:
    path = state_dir / "audit.jsonl"
    return path.exists() and any(e["action"] == f"{kind}.replied" and e["subject"].endswith(f"round-{round_no}")
                                 for e in _entries(path))


# ---- 2. a silo whose clock is off ----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_silo_with_clock_off_trains_and_the_audit_keeps_both_times(tmp_path):
    """va's silo service, the process that holds its cohort, ledger, outbox and audit log,
    runs under libfaketime 3 hours ahead. Freshness comes from nonces, so it trains every
    round, and its audit entries carry its own time and the coordinator's request time side
    by side. Its Flower SuperNode keeps the true clock: Flower 1.41 itself refuses a node whose
    clock is off (checked at the end: a SuperNode 3 h ahead is refused at registration, 401)."""
    assert LIBFAKETIME.exists(), f"{LIBFAKETIME} missing: apt-get install libfaketime (.ci/run installs it)"
    study_path = _study(tmp_path, rounds=2, auto_rounds=2, private=False)
    with _federation(tmp_path) as fed:
        procs = {n: fed.start_silo(_spec(tmp_path, n, study_path), wrapper=_shifted_service("+3h") if n == "va" else ())
                 for n in SILOS}
        _submit(fed, tmp_path, study_path, procs)
        summary = _finished(tmp_path)
        refused_before = _refused_registrations(fed)
        ahead = fed._spawn("supernode-3h-ahead", [  # Flower alone, 3 h ahead, against the same SuperLink
            "env", f"LD_PRELOAD={LIBFAKETIME}", "FAKETIME=+3h", str(Path(sys.executable).parent / "flower-supernode"),
            "--insecure", "--superlink", fed.address, "--port", str(free_port())])
        _wait("the SuperNode 3 h ahead to be refused", lambda: not ahead.alive(), 300)
        assert _refused_registrations(fed) > refused_before, "Flower's SuperLink now accepts a clock 3 h ahead"
        assert "SuperNode ID" not in ahead.log.read_text(errors="replace")

    for r in (1, 2):
        assert sorted(_round(summary, r)["replied"]) == sorted(SILOS), _round(summary, r)
    assert "va" in summary["final"]["per_silo"]
    for name, low, high in (("va", 3 * 3600 - 5, 3 * 3600 + 300), ("cleveland", -5, 300)):
        replies = [e for e in _silo_log(tmp_path / "silos" / name) if e["action"] == "train.replied"]
        assert len(replies) == 2
        for e in replies:  # own time minus the coordinator's: the offset plus delivery and training
            skew = (_parse(e["ts"]) - _parse(e["details"]["coordinator_time"])).total_seconds()
            assert low < skew < high, f"{name}: own time {e['ts']}, coordinator's {e['details']['coordinator_time']}"


def _shifted_service(offset: str) -> list[str]:
    """Run `silo-node start` under libfaketime, but hand its SuperNode the true clock: the
    service drops LD_PRELOAD from the environment its children inherit, then runs the CLI.
    FAKETIME stays set: libfaketime re-reads it, and without LD_PRELOAD children ignore it."""
    drop_then_run = ("import os, runpy, sys; os.environ.pop('LD_PRELOAD'); "
                     "sys.argv = sys.argv[1:]; runpy.run_module('silo_node.cli', run_name='__main__')")
    return ["env", f"LD_PRELOAD={LIBFAKETIME}", f"FAKETIME={offset}", sys.executable, "-c", drop_then_run]


def _refused_registrations(fed: LocalFederation) -> int:
    log = (fed.work_dir / "logs" / "superlink.log").read_text(errors="replace")
    return len(re.findall(r"/v1/fleet/register-node HTTP/1\.1\" 401", log))


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


# ---- 3. a silo whose disk is full when it writes its ledger -------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_silo_with_full_disk_refuses_sends_nothing_and_spends_nothing(tmp_path):
    """va's state directory is a 16 MB tmpfs and its ledger directory a 1 MB tmpfs inside it,
    mounted in va's own mount namespace (`unshare --mount`; the test reaches them through
    /proc/PID/root). After round 1 the ledger's filesystem is filled: round 2's charge cannot
    be made durable, so va refuses, logs why, sends no update and its ledger is unchanged.
    Then the state directory is filled too: va cannot even write its audit log, and the
    refusal that reaches the coordinator says so."""
    study_path = _study(tmp_path, rounds=3, auto_rounds=1, private=True)
    va = _spec(tmp_path, "va", study_path)
    state = str(va.state_dir)
    mounts = ('mount -t tmpfs -o size=16m,mode=0700 tmpfs "$0" && mkdir -m 0700 "$0/ledger" '
              '&& mount -t tmpfs -o size=1m,mode=0700 tmpfs "$0/ledger" && exec "$@"')
    own_disk = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts, state]
    with _federation(tmp_path) as fed:
        procs = {n: fed.start_silo(_spec(tmp_path, n, study_path), wrapper=own_disk if n == "va" else ())
                 for n in SILOS}
        inside = Path(f"/proc/{procs['va'].popen.pid}/root") / state.lstrip("/")  # va's view of its state dir
        _submit(fed, tmp_path, study_path, procs)
        _wait_status(tmp_path, "round 2 waiting for approval", 600)
        ledger_file = PrivacyLedger.path_for(inside, STUDY_ID)
        before = ledger_file.read_bytes()
        assert [c["round"] for c in json.loads(before)["charges"]] == [0, 1]
        _fill(inside / "ledger" / "filler")
        _approve(tmp_path, 2)
        _wait_status(tmp_path, "round 3 waiting for approval", 600)
        assert ledger_file.read_bytes() == before, "the ledger changed on a full disk"
        assert sorted(p.name for p in (inside / "ledger").iterdir()) == sorted(
            [".lock", "filler", "index.json", f"{STUDY_ID}.json"]), "a temp file was left behind"
        log_after_2 = _silo_log(inside)
        _fill(inside / "filler")
        audit_size = (inside / "audit.jsonl").stat().st_size
        _approve(tmp_path, 3)
        summary = _finished(tmp_path)
        assert (inside / "audit.jsonl").stat().st_size == audit_size, "the audit log was half-written"
        assert ledger_file.read_bytes() == before
        outbox = sorted((inside / "outbox").glob("*.npz"))
        sent = [e for e in log_after_2 if e["action"] == "train.replied"]

    second, third = _round(summary, 2), _round(summary, 3)
    assert sorted(second["replied"]) == ["cleveland", "hungary"] and "va" not in second["privacy"]
    assert "No space left on device" in second["refused"]["va"] and "nothing was sent" in second["refused"]["va"]
    assert sorted(third["replied"]) == ["cleveland", "hungary"] and "va" not in third["privacy"]
    assert "cannot write its audit log" in third["refused"]["va"], third["refused"]
    refusals = [e for e in log_after_2 if e["action"] == "train.refused"]
    assert [(e["subject"], "No space left on device" in e["details"]["reason"]) for e in refusals] == \
        [(f"{STUDY_ID}/round-2", True)]
    assert [e["subject"] for e in sent] == [f"{STUDY_ID}/round-1"]  # no update left after round 1
    assert len(outbox) == 1, "only round 1's update was ever ready to leave"
    store = open_store(None, tmp_path)
    try:
        rounds = {r.round_no: r for r in store.list_rounds(STUDY_ID)}
        assert "va" in rounds[2].refused and "va" in rounds[3].refused
    finally:
        store.close()


def _fill(path: Path) -> None:
    """Write zeros until the filesystem is full (ENOSPC), as a full disk would be."""
    block = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    with pytest.raises(OSError):
        (path.parent / ".probe").write_bytes(b"\0" * 4096)
    (path.parent / ".probe").unlink(missing_ok=True)


# ---- 4. a silo whose cohort file changes between rounds -----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT)
def test_silo_whose_cohort_changes_refuses_until_the_file_is_restored(tmp_path):
    """hungary's cohort file loses 10 rows after round 1: round 2 is refused at hungary by its
    fingerprint check (a reason with short fingerprints, no path, no value) and goes on with the
    others; silo IT restores the validated file and hungary trains round 3."""
    study_path = _study(tmp_path, rounds=3, auto_rounds=1, private=False)
    cohort = tmp_path / "hungary.parquet"
    shutil.copyfile(sample_cohorts()["hungary"], cohort)
    original = cohort.read_bytes()
    with _federation(tmp_path) as fed:
        procs = {n: fed.start_silo(_spec(tmp_path, n, study_path, cohort if n == "hungary" else None)) for n in SILOS}
        _submit(fed, tmp_path, study_path, procs)
        _wait_status(tmp_path, "round 2 waiting for approval", 600)
        table = pq.read_table(cohort)
        pq.write_table(table.slice(0, table.num_rows - 10), cohort)  # someone edits the file between rounds
        _approve(tmp_path, 2)
        _wait_status(tmp_path, "round 3 waiting for approval", 600)
        cohort.write_bytes(original)  # silo IT's fix: restore the validated file
        _approve(tmp_path, 3)
        summary = _finished(tmp_path)

    second, third = _round(summary, 2), _round(summary, 3)
    assert sorted(second["replied"]) == ["cleveland", "va"], second
    reason = second["refused"]["hungary"]
    validated = hashlib.sha256(original).hexdigest()
    assert "cohort file changed" in reason and validated[:12] in reason, reason
    assert str(tmp_path) not in reason and "parquet" not in reason
    assert sorted(third["replied"]) == list(SILOS) and third["refused"] == {}, third
    log = _silo_log(tmp_path / "silos" / "hungary")
    assert [e["details"]["cohort_sha256"] for e in log if e["action"] == "silo.started"] == [validated]
    assert [e["subject"] for e in log if e["action"] == "train.refused"] == [f"{STUDY_ID}/round-2"]
    assert [e["subject"] for e in log if e["action"] == "train.replied"] == [f"{STUDY_ID}/round-{r}" for r in (1, 3)]
    coordinator_log = _entries(tmp_path / "coordinator" / "audit.jsonl")
    finished = [e["details"] for e in coordinator_log if e["action"] == "round.finished"]
    assert "hungary" in finished[1]["refused"] and "hungary" in finished[2]["replied"]


# ---- the same rules at the request handler, fast --------------------------------------------------


@pytest.fixture
def dp_silo(tmp_path, heart_study, sample_paths):
    """A DP silo as the service holds it (real cohort file, ledger and audit log), plaintext updates."""
    from policies.audit import open_party_log
    from silo_node.worker import Silo

    data = heart_study.model_dump(mode="json")
    data["encryption"] = "none"
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cohort = tmp_path / "va.parquet"
    shutil.copyfile(sample_paths["va"], cohort)
    silo = Silo.from_cohort("va", load_study(tmp_path / "study.yaml"), cohort, state_dir=tmp_path / "va")
    silo.audit = open_party_log(silo.state_dir, "va", "silo")
    return silo


def _request(silo, round_no: int, nonce: str, audit_seq: int = 0) -> dict:
    from policies import messages as m

    return m.Request(study_id=silo.study.id, policy_hash=silo.study.policy_hash(), round=round_no, nonce=nonce,
                     sent_at="2026-01-01T00:00:00Z", audit_seq=audit_seq, audit_head="ab" * 32).model_dump()


def test_a_silo_that_cannot_write_its_audit_log_sends_only_the_refusal(dp_silo):
    """The audit log on /dev/full (every write: ENOSPC). A request carries the coordinator's
    audit head, which the silo logs first: that fails, so the request is refused before any
    work, nothing is charged, nothing leaves but the refusal, and the refusal says why."""
    from policies import messages as m
    from policies.audit import AuditLog
    from silo_node.service import handle

    full = AuditLog("/dev/full", dp_silo.audit.key, "va", "silo")
    reply, out = handle(dp_silo, full, m.STATS, _request(dp_silo, 0, "n0", audit_seq=7), {})
    assert reply["status"] == "refused" and out == {}
    assert "cannot write its audit log" in reply["reason"] and "No space left on device" in reply["reason"]
    assert "nothing sent" in reply["reason"]
    assert not PrivacyLedger.path_for(dp_silo.state_dir, STUDY_ID).exists(), "charged without an audit record"


def test_a_changed_cohort_is_refused_until_restored(dp_silo):
    from policies import messages as m
    from silo_node.service import handle

    original = dp_silo.cohort.path.read_bytes()
    table = pq.read_table(dp_silo.cohort.path)
    pq.write_table(table.slice(0, table.num_rows - 1), dp_silo.cohort.path)
    reply, out = handle(dp_silo, dp_silo.audit, m.STATS, _request(dp_silo, 0, "n0"), {})
    assert reply["status"] == "refused" and out == {} and "cohort file changed" in reply["reason"]
    assert dp_silo.cohort.sha256[:12] in reply["reason"] and "parquet" not in reply["reason"]
    assert not PrivacyLedger.path_for(dp_silo.state_dir, STUDY_ID).exists(), "a refused round spent something"
    dp_silo.cohort.path.write_bytes(original)
    reply, out = handle(dp_silo, dp_silo.audit, m.STATS, _request(dp_silo, 0, "n1"), {})
    assert reply["status"] == "ok" and m.MOMENTS in out


def test_charges_never_recorded_as_sent_are_logged_released_but_lost_once(dp_silo):
    from silo_node.service import UNSENT_ACTION, record_unsent_charges

    result = dp_silo.release_stats("n0")  # charged; the service was "killed" before it replied
    record_unsent_charges(dp_silo, dp_silo.audit)
    record_unsent_charges(dp_silo, dp_silo.audit)  # a second restart records nothing new
    lost = [e for e in dp_silo.audit.entries() if e.action == UNSENT_ACTION]
    assert [(e.details["ledger_seq"], e.details["nonce"], e.details["kind"]) for e in lost] == \
        [(result.privacy["ledger_seq"], "n0", "stats")]
    assert lost[0].details["epsilon_after"] == pytest.approx(dp_silo.ledger().spent(), rel=1e-12)


def test_a_reply_that_cannot_be_kept_for_resends_is_not_sent_and_its_charge_is_lost(dp_silo):
    """The outbox write (before a reply leaves) fails: a refusal goes instead, and the charge
    the reply carried is recorded as released-but-lost at once (not again at the next start)."""
    from policies import messages as m
    from silo_node.service import UNSENT_ACTION, _unsent, handle, record_unsent_charges

    payload = handle(dp_silo, dp_silo.audit, m.STATS, _request(dp_silo, 0, "n0"), {})
    assert payload[0]["status"] == "ok" and payload[0]["ledger_seq"] == 1
    reply, out = _unsent(dp_silo.audit, payload, "[Errno 28] No space left on device")
    assert out == {} and reply["status"] == "refused" and reply["ledger_seq"] == 0 and reply["epsilon_spent"] is None
    assert "No space left on device" in reply["reason"] and "nothing sent" in reply["reason"]
    record_unsent_charges(dp_silo, dp_silo.audit)
    lost = [e.details for e in dp_silo.audit.entries() if e.action == UNSENT_ACTION]
    assert [(d["ledger_seq"], d["nonce"]) for d in lost] == [(1, "n0")]
