"""The coordinator store on a real SQLite file: schema, each table's API, lifecycle, approval gate.

Several processes share the store in production (ServerApp, UI, CLI), so some tests open
two Store objects on one file, and one writes from a separate Python process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from coordinator import lifecycle
from coordinator.lifecycle import TRANSITIONS, check_transition, transition
from coordinator.store import TABLES, VERSION_TABLE, Base, Store, needs_manual_approval, open_store
from policies.errors import PolicyError
from policies.study import load_study_text, shipped_study

ROOT = Path(__file__).resolve().parent.parent
U64_MAX = 18446744073709551615
SILOS = ("cleveland", "hungary", "switzerland", "va")


def policy(*, version: int = 1, mode: str = "manual", auto_rounds: int = 0, rounds: int = 4,
           min_silos: int = 3, **top: Any) -> str:
    """The shipped heart-disease policy with the few knobs these tests turn."""
    data = yaml.safe_load(shipped_study("heart_disease").read_text(encoding="utf-8"))
    data.update(version=version, min_silos=min_silos, **top)
    data["training"]["rounds"] = rounds
    data["approval"] = {"mode": mode, "auto_rounds": auto_rounds}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    st = open_store(None, tmp_path)
    yield st
    st.close()


def running_study(store: Store, text: str | None = None, silos: tuple[str, ...] = SILOS[:3]) -> str:
    """A study moved to running with enough validated silos; returns its id."""
    row = store.create_study(text or policy(), "lead")
    transition(store, row.id, "open", "lead")
    for silo in silos:
        store.record_enrolment(row.id, silo, "validated", {"ok": True, "rows": 100})
    transition(store, row.id, "running", "lead")
    return row.id


# ---------------------------------------------------------------------------- schema


def test_open_creates_default_file_with_all_tables_wal_and_foreign_keys(tmp_path: Path, store: Store) -> None:
    db = tmp_path / "coordinator" / "fedcohort.db"
    assert db.is_file()
    names = set(inspect(store.engine).get_table_names())
    assert names == set(TABLES) | {VERSION_TABLE}
    assert set(TABLES) == {"studies", "silos", "enrolments", "rounds", "approvals", "evaluations",
                           "privacy_spend", "users", "audit_entries", "checkpoints", "model_releases"}
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar() == "0004_revocation"


def test_migrations_match_the_models(store: Store) -> None:
    """A model change without a migration would show up here as a diff."""
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
        assert compare_metadata(ctx, Base.metadata) == []


def test_reopening_a_migrated_store_is_a_no_op(tmp_path: Path, store: Store) -> None:
    store.create_study(policy(), "lead")
    with open_store(None, tmp_path) as again:
        assert [s.id for s in again.list_studies()] == ["heart-disease"]


def test_explicit_sqlite_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with open_store(url, tmp_path / "unused") as st:
        assert st.url == url
        assert (tmp_path / "elsewhere.db").is_file()


# ---------------------------------------------------------------------------- studies


def test_create_study_validates_and_hashes(store: Store) -> None:
    text = policy()
    row = store.create_study(text, "alice")
    assert (row.id, row.version, row.status, row.created_by) == ("heart-disease", 1, "draft", "alice")
    assert row.policy_hash == load_study_text(text).policy_hash()
    assert row.policy_yaml == text and row.label == "heart-disease v1"
    assert row.spec.approval.mode == "manual"
    assert row.created_at.tzinfo is not None
    assert store.get_study("heart-disease") == row
    with pytest.raises(PolicyError, match="already exists"):
        store.create_study(text, "alice")
    with pytest.raises(PolicyError, match="not valid"):
        store.create_study("protocol_version: 1\nid: x\n", "alice")


def test_new_version_gets_a_new_hash_and_keeps_the_old(store: Store) -> None:
    v1 = store.create_study(policy(), "lead")
    v2 = store.new_version(v1.id, policy(version=2, rounds=6), "lead")
    assert (v2.version, v2.status) == (2, "draft")
    assert v2.policy_hash != v1.policy_hash
    assert store.get_study(v1.id).version == 2
    assert store.get_study(v1.id, 1).policy_hash == v1.policy_hash
    assert [s.version for s in store.list_studies(all_versions=True)] == [1, 2]
    assert [s.version for s in store.list_studies()] == [2]


@pytest.mark.parametrize(("text", "message"), [
    (policy(version=1, rounds=6), "must say version: 2"),
    (policy(version=2), "unchanged"),
    (policy(version=2, id="other-study"), "not 'heart-disease'"),
])
def test_new_version_refusals(store: Store, text: str, message: str) -> None:
    store.create_study(policy(), "lead")
    with pytest.raises(PolicyError, match=message):
        store.new_version("heart-disease", text, "lead")


def test_a_draft_may_be_edited_in_place_an_open_study_may_not(store: Store) -> None:
    row = store.create_study(policy(), "lead")
    edited = store.edit_draft(row.id, policy(rounds=7), "lead")
    assert edited.policy_hash != row.policy_hash and edited.spec.training.rounds == 7
    transition(store, row.id, "open", "lead")
    with pytest.raises(PolicyError, match=r"heart-disease v1 is open; its policy can no longer change in place"):
        store.edit_draft(row.id, policy(rounds=8), "lead")


# ---------------------------------------------------------------------------- lifecycle


def test_lifecycle_legal_path(store: Store) -> None:
    row = store.create_study(policy(), "lead")
    change = transition(store, row.id, "open", "lead", "enrolment opens")
    assert (change.from_status, change.to_status, change.user, change.reason) == ("draft", "open", "lead", "enrolment opens")
    for silo in SILOS[:2]:
        store.record_enrolment(row.id, silo, "validated", {"ok": True})
    store.record_enrolment(row.id, SILOS[2], "failed", {"ok": False})
    with pytest.raises(PolicyError, match="needs at least 3 silos with a validated enrolment before it can run; 2 so far"):
        transition(store, row.id, "running", "lead")
    store.record_enrolment(row.id, SILOS[3], "validated", {"ok": True})
    transition(store, row.id, "running", "lead")
    transition(store, row.id, "completed", "lead")
    assert store.get_study(row.id).status == "completed"
    with pytest.raises(PolicyError, match="^study heart-disease v1 is completed; it cannot be reopened$"):
        transition(store, row.id, "open", "lead")
    with pytest.raises(PolicyError, match="is completed; it cannot be run again"):
        transition(store, row.id, "running", "lead")


@pytest.mark.parametrize("current", lifecycle.STATUSES)
@pytest.mark.parametrize("to", lifecycle.STATUSES)
def test_transition_table_is_exactly_what_check_allows(current: str, to: str) -> None:
    def attempt() -> str:
        return check_transition("s v1", current, to, min_silos=3, validated_silos=3, reason="why")  # type: ignore[arg-type]

    if to in TRANSITIONS[current]:  # type: ignore[index]
        assert attempt() == to
    else:
        with pytest.raises(PolicyError, match="^study s v1 is "):
            attempt()


def test_illegal_transitions_say_why(store: Store) -> None:
    row = store.create_study(policy(), "lead")
    with pytest.raises(PolicyError, match="open it for enrolment first"):
        transition(store, row.id, "running", "lead")
    with pytest.raises(PolicyError, match="not a study status"):
        transition(store, row.id, "paused", "lead")
    with pytest.raises(PolicyError, match="say why it is stopped"):
        transition(store, row.id, "stopped", "lead")
    transition(store, row.id, "stopped", "lead", "withdrawn by ethics board")
    with pytest.raises(PolicyError, match="is stopped; it cannot be reopened"):
        transition(store, row.id, "open", "lead")


def test_only_one_version_of_a_study_is_active(store: Store) -> None:
    v1 = store.create_study(policy(), "lead")
    transition(store, v1.id, "open", "lead", version=1)
    store.new_version(v1.id, policy(version=2, rounds=6), "lead")
    with pytest.raises(PolicyError, match="cannot open while v1 of the same study is open or running"):
        transition(store, v1.id, "open", "lead", version=2)
    transition(store, v1.id, "stopped", "lead", "superseded by v2", version=1)
    assert transition(store, v1.id, "open", "lead").version == 2


# ---------------------------------------------------------------------------- silos and enrolments


def test_silos_keep_u64_node_ids_and_pinned_keys(store: Store) -> None:
    silo = store.register_silo("cleveland", "sha256:aa", node_id=U64_MAX)
    assert silo.flower_node_id == U64_MAX and not silo.online
    with pytest.raises(PolicyError, match="different key"):
        store.register_silo("cleveland", "sha256:bb")
    with pytest.raises(PolicyError, match="unsigned 64-bit"):
        store.register_silo("cleveland", node_id=U64_MAX + 1)
    seen = store.mark_silo_seen("cleveland", online=True, node_id=str(U64_MAX - 1))
    assert seen.online and seen.last_seen is not None and seen.flower_node_id == U64_MAX - 1
    assert [s.name for s in store.list_silos()] == ["cleveland"]
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT typeof(flower_node_id) FROM silos").scalar() == "text"


def test_enrolments(store: Store) -> None:
    row = store.create_study(policy(), "lead")
    with pytest.raises(PolicyError, match="is draft; round 1 will not run"):
        store.wait_for_approval(row.id, 1, timeout=0)
    with pytest.raises(PolicyError, match="is draft; it takes no enrolments"):
        store.record_enrolment(row.id, "va", "pending")
    transition(store, row.id, "open", "lead")
    report = {"ok": True, "rows": 200, "missing_per_column": {"chol": "<5"}}
    store.record_enrolment(row.id, "va", "pending")
    got = store.record_enrolment(row.id, "va", "validated", report, key_ceremony="done")
    assert (got.status, got.validation_report, got.key_ceremony) == ("validated", report, "done")
    with pytest.raises(PolicyError, match="cannot be 'validated'"):
        store.record_enrolment(row.id, "hungary", "validated", {"ok": False})
    with pytest.raises(PolicyError, match="not a valid enrolment status"):
        store.record_enrolment(row.id, "hungary", "maybe")
    assert [(e.silo, e.status) for e in store.list_enrolments(row.id)] == [("va", "validated")]
    assert store.get_silo("va") is not None


# ---------------------------------------------------------------------------- approval gate


def test_manual_mode_needs_an_approval_per_round(store: Store) -> None:
    sid = running_study(store, policy(mode="manual"))
    assert not store.is_round_approved(sid, 1)
    with pytest.raises(PolicyError, match="not approved"):
        store.record_round_start(sid, 1, ["a"])
    with pytest.raises(TimeoutError, match="waiting for approval"):
        store.wait_for_approval(sid, 1, poll=0.01, timeout=0.05)
    assert store.get_round(sid, 1).status == "waiting_approval"
    approval = store.record_approval(sid, 1, "approve", "lead", "looks fine")
    assert approval.policy_hash == store.get_study(sid).policy_hash
    assert store.is_round_approved(sid, 1) and store.get_round(sid, 1).status == "approved"
    assert not store.is_round_approved(sid, 2)
    store.record_approval(sid, 1, "hold", "lead", "wait for the ethics call")
    assert not store.is_round_approved(sid, 1) and store.get_round(sid, 1).status == "held"
    with pytest.raises(TimeoutError, match="on hold"):
        store.wait_for_approval(sid, 1, poll=0.01, timeout=0.05)
    store.record_approval(sid, 1, "reject", "lead")
    assert store.wait_for_approval(sid, 1, poll=0.01, timeout=1) == "reject"
    assert [a.decision for a in store.list_approvals(sid, 1)] == ["approve", "hold", "reject"]
    assert store.approval_for(sid, 1).decision == "reject"
    with pytest.raises(PolicyError, match="no round 5"):
        store.record_approval(sid, 5, "approve", "lead")


def test_auto_mode_lets_the_first_rounds_through(store: Store) -> None:
    sid = running_study(store, policy(mode="auto", auto_rounds=2))
    spec = store.get_study(sid).spec
    assert [needs_manual_approval(spec, r) for r in range(5)] == [False, False, False, True, True]
    assert [store.is_round_approved(sid, r) for r in range(5)] == [True, True, True, False, False]
    assert store.approval_for(sid, 1) is None
    assert store.wait_for_approval(sid, 2, poll=0.01, timeout=1) == "approve"
    assert store.get_round(sid, 2).status == "approved"
    store.record_approval(sid, 2, "hold", "lead", "a lead may still hold an auto round")
    assert not store.is_round_approved(sid, 2)
    store.record_approval(sid, 3, "approve", "lead")
    assert store.is_round_approved(sid, 3)


def test_wait_for_approval_sees_an_approval_from_another_process(tmp_path: Path, store: Store) -> None:
    sid = running_study(store)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from coordinator.store import open_store
        time.sleep(0.3)
        with open_store(None, Path({str(tmp_path)!r})) as st:
            st.record_approval({sid!r}, 1, "approve", "lead-in-ui", "from the UI process")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    try:
        t0 = time.monotonic()
        assert store.wait_for_approval(sid, 1, poll=0.05, timeout=60) == "approve"
        assert time.monotonic() - t0 >= 0.3
    finally:
        assert proc.wait(timeout=60) == 0
    assert store.approval_for(sid, 1).user == "lead-in-ui"


def test_wait_for_approval_stops_when_the_study_stops(store: Store) -> None:
    sid = running_study(store)
    other = open_store(store.url, Path("unused"))
    timer = threading.Timer(0.1, lambda: transition(other, sid, "stopped", "lead", "enough"))
    timer.start()
    try:
        with pytest.raises(PolicyError, match="is stopped; round 1 will not run"):
            store.wait_for_approval(sid, 1, poll=0.02, timeout=30)
    finally:
        timer.join()
        other.close()


# ---------------------------------------------------------------------------- rounds


def test_round_start_and_finish_keep_u64_run_ids(store: Store) -> None:
    sid = running_study(store, policy(mode="auto", auto_rounds=4))
    started = store.record_round_start(sid, 1, ["cleveland", "hungary", "va"], flower_run_id=U64_MAX)
    assert (started.status, started.flower_run_id, started.asked) == ("running", U64_MAX, ["cleveland", "hungary", "va"])
    with pytest.raises(PolicyError, match="already running"):
        store.record_round_start(sid, 1, ["cleveland"])
    with pytest.raises(PolicyError, match="both reply and refuse"):
        store.record_round_finish(sid, 1, ["va"], {"va": "budget"})
    done = store.record_round_finish(sid, 1, ["cleveland", "hungary"], {"va": "privacy budget exhausted"})
    assert done.status == "finished" and done.refused == {"va": "privacy budget exhausted"}
    assert done.finished_at >= done.started_at
    assert store.get_round(sid, 1).flower_run_id == U64_MAX
    with pytest.raises(PolicyError, match="is finished, not running"):
        store.record_round_finish(sid, 1, [], {})
    store.record_round_start(sid, 2, ["cleveland"], flower_run_id="12345")
    assert store.record_round_finish(sid, 2, [], {"cleveland": "no reply in time"}, failed=True).status == "failed"
    assert [(r.round_no, r.status) for r in store.list_rounds(sid)] == [(1, "finished"), (2, "failed")]
    with pytest.raises(PolicyError, match="a decision can no longer change it"):
        store.record_approval(sid, 1, "hold", "lead")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT flower_run_id FROM rounds WHERE round_no = 1").scalar() == str(U64_MAX)


def test_rounds_only_start_while_the_study_runs(store: Store) -> None:
    row = store.create_study(policy(mode="auto", auto_rounds=4), "lead")
    transition(store, row.id, "open", "lead")
    with pytest.raises(PolicyError, match="is open; round 1 cannot start"):
        store.record_round_start(row.id, 1, ["a"])


# ---------------------------------------------------------------------------- the other tables


def test_evaluations_privacy_and_checkpoints(store: Store) -> None:
    import numpy as np

    sid = running_study(store)
    pooled = {"accuracy": np.float64(0.75), "n": np.int64(200), "auroc": float("nan"), "hist": np.arange(3)}
    row = store.record_evaluation(sid, 1, "pooled", pooled)
    assert row.metrics == {"accuracy": 0.75, "n": 200, "auroc": None, "hist": [0, 1, 2]}
    store.record_evaluation(sid, 1, "va", {"accuracy": "<5"})
    store.record_evaluation(sid, 1, "pooled", {"accuracy": 0.8})  # a re-evaluation replaces
    assert [(e.round_no, e.scope, e.metrics["accuracy"]) for e in store.list_evaluations(sid)] == [
        (1, "pooled", 0.8), (1, "va", "<5")]

    store.record_privacy_spend(sid, "va", 1, 0.5, 3.0, rounds_left=5)
    spend = store.record_privacy_spend(sid, "va", 2, 1.1, 3.0, rounds_left=4)
    assert (spend.epsilon_spent_total, spend.epsilon_budget, spend.rounds_left) == (1.1, 3.0, 4)
    assert [p.round_no for p in store.list_privacy_spend(sid)] == [1, 2]
    with pytest.raises(PolicyError, match="finite number"):
        store.record_privacy_spend(sid, "va", 3, float("inf"), 3.0)

    assert store.load_last_checkpoint(sid) is None
    blob = bytes(range(256)) * 1000
    store.save_checkpoint(sid, 1, b"round-1", ["cleveland", "hungary", "va"])
    store.save_checkpoint(sid, 2, blob, ["cleveland", "hungary"])
    last = store.load_last_checkpoint(sid)
    assert (last.round_no, last.encrypted_state, last.silos_in) == (2, blob, ["cleveland", "hungary"])


def test_users(store: Store) -> None:
    user = store.add_user("alice", "lead", "scrypt$salt$hash")
    assert (user.role, user.failed_attempts, user.is_locked()) == ("lead", 0, False)
    with pytest.raises(PolicyError, match="already exists"):
        store.add_user("alice", "admin", "x")
    with pytest.raises(PolicyError, match="not a valid role"):
        store.add_user("bob", "superuser", "x")
    for _ in range(2):
        store.note_login_failure("alice", max_attempts=3)
    locked = store.note_login_failure("alice", max_attempts=3, lock_for=timedelta(minutes=5))
    assert locked.is_locked() and locked.failed_attempts == 0
    assert store.note_login_failure("nobody") is None
    assert not store.note_login_success("alice").is_locked()
    assert store.set_password_hash("alice", "new").password_hash == "new"
    assert store.get_user("alice").password_hash == "new" and store.get_user("bob") is None


def _audit(seq: int, prev: str) -> dict[str, Any]:
    return {"seq": seq, "ts": "2026-01-01T00:00:00Z", "actor": "alice", "role": "lead", "action": "round.approved",
            "subject": "heart-disease", "details": {"round": seq}, "prev_hash": prev, "hash": f"h{seq}"}


def test_audit_mirror_keeps_the_chain(store: Store) -> None:
    store.append_audit_mirror(_audit(1, "genesis"))
    row = store.append_audit_mirror(_audit(2, "h1"))
    assert (row.seq, row.action, row.actor, row.entry["details"]) == (2, "round.approved", "alice", {"round": 2})
    assert store.append_audit_mirror(_audit(2, "h1")) == row  # a retry is harmless
    with pytest.raises(PolicyError, match="already mirrored"):
        store.append_audit_mirror(_audit(2, "h1") | {"hash": "forged"})
    with pytest.raises(PolicyError, match="does not follow"):
        store.append_audit_mirror(_audit(4, "h3"))
    with pytest.raises(PolicyError, match="does not follow"):
        store.append_audit_mirror(_audit(3, "not-h2"))
    store.append_audit_mirror(_audit(1, "genesis"), party="va")
    assert [r.seq for r in store.audit_mirror()] == [1, 2]
    assert store.audit_head().hash == "h2" and store.audit_head("va").seq == 1
    assert [r.seq for r in store.audit_mirror(after_seq=1)] == [2]


# ---------------------------------------------------------------------------- several processes


def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    with open_store(None, tmp_path) as ui, open_store(None, tmp_path) as server:
        sid = running_study(ui, policy(mode="manual"))
        assert server.get_study(sid).status == "running"
        assert not server.is_round_approved(sid, 1)
        ui.record_approval(sid, 1, "approve", "lead")
        assert server.is_round_approved(sid, 1)
        server.record_round_start(sid, 1, ["cleveland"], flower_run_id=U64_MAX)
        assert ui.get_round(sid, 1).status == "running"
        server.record_round_finish(sid, 1, ["cleveland"], {})
        assert ui.get_round(sid, 1).replied == ["cleveland"]


def test_concurrent_writers_from_threads_do_not_lose_updates(tmp_path: Path) -> None:
    """Each thread has its own Store (as separate processes would); BEGIN IMMEDIATE serialises them."""
    with open_store(None, tmp_path) as first:
        sid = running_study(first)
    errors: list[BaseException] = []

    def writer(silo: str) -> None:
        try:
            with open_store(None, tmp_path) as st:
                for r in range(1, 5):
                    st.record_privacy_spend(sid, silo, r, 0.1 * r, 3.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(s,)) for s in SILOS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    with open_store(None, tmp_path) as st:
        assert len(st.list_privacy_spend(sid)) == 16


def test_one_store_shared_by_threads(store: Store) -> None:
    """Streamlit serves sessions from threads of one process; they may share its Store."""
    sid = running_study(store)
    errors: list[BaseException] = []

    def work(r: int) -> None:
        try:
            for silo in SILOS:
                store.record_privacy_spend(sid, silo, r, 0.1, 3.0)
                store.list_privacy_spend(sid)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(store.list_privacy_spend(sid)) == 16
