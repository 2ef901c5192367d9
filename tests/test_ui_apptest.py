"""The Streamlit UI, headless (streamlit.testing AppTest), per page and per role.

Each test gets its own state dir, built here through the store and audit APIs: a running
heart study with two finished rounds (pooled and suppressed per-silo evaluations, privacy
spend), round 2 waiting for approval, a signed coordinator audit log and a matching
summary.json. `build_state` is also used by the browser test.
"""

from __future__ import annotations

import json
import re
import sqlite3
import zipfile
from contextlib import closing
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from coordinator import users
from coordinator.lifecycle import transition
from coordinator.store import Store, open_store
from policies.audit import open_party_log, verify_bundle
from policies.errors import PolicyError
from policies.study import shipped_study

pytest.importorskip("streamlit.testing.v1")
from streamlit.testing.v1 import AppTest  # noqa: E402

from ui import actions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "ui" / "app.py"
STUDY = "heart-disease"
SILOS = ("cleveland", "hungary", "switzerland", "va")
PASSWORDS = {"lead": "lead password 123", "aud": "auditor password 1", "root": "admin password 12"}
ROLES = {"lead": "lead", "aud": "auditor", "root": "admin"}
PAGES = ("views/studies.py", "views/silos.py", "views/rounds.py", "views/evaluations.py", "views/audit.py")


def _policy() -> str:
    data = yaml.safe_load(shipped_study("heart_disease").read_text(encoding="utf-8"))
    data["training"]["rounds"] = 4
    data["approval"] = {"mode": "manual", "auto_rounds": 0}
    data["privacy"] = {"epsilon": 1.0, "delta": 1e-5}
    return yaml.safe_dump(data, sort_keys=False)


def _metrics(acc: float, n: int = 254) -> dict:
    return {"n": n, "accuracy": acc, "sensitivity": acc + 0.05, "specificity": acc - 0.05, "auroc": acc + 0.1,
            "loss": 0.7 - acc / 4, "accuracy_ci_low": acc - 0.06, "accuracy_ci_high": acc + 0.06,
            "sensitivity_ci_low": acc - 0.03, "sensitivity_ci_high": acc + 0.12,
            "specificity_ci_low": acc - 0.13, "specificity_ci_high": acc + 0.03}


def _silo_report(silo: str) -> dict:
    small = silo in ("switzerland", "va")
    return {"tp": 20, "fp": 6, "tn": "<5" if small else 30, "fn": 9, "n": 60, "correct": 50,
            "accuracy": 0.71, "sensitivity": 0.69, "specificity": None if small else 0.8}


def _validation(silo: str) -> dict:
    return {"ok": True, "rows": 120, "study_id": STUDY, "results": [
        {"rule": "column_present", "column": "age", "severity": "error", "passed": True, "violations": 0,
         "description": "column age is present"},
        {"rule": "range", "column": "chol", "severity": "warning", "passed": silo != "switzerland",
         "violations": "<5" if silo == "va" else 0, "description": "chol within [80, 700]"}]}


def build_state(state: Path, finished: int = 2) -> Store:
    """A coordinator state dir mid-study (see module docstring): rounds 0..finished-1 done,
    round `finished` waiting for approval. Returns its open store."""
    store = open_store(None, state)
    for name, password in PASSWORDS.items():
        users.add_user(store, name, ROLES[name], password)
    row = store.create_study(_policy(), "lead")
    transition(store, STUDY, "open", "lead")
    for silo in SILOS:
        store.register_silo(silo, key_fingerprint=f"fp-{silo}", node_id=1000 + len(silo))
        store.record_enrolment(STUDY, silo, "validated", _validation(silo), key_ceremony="done")
        store.mark_silo_seen(silo, online=silo != "va")
    transition(store, STUDY, "running", "lead")
    log = users.coordinator_log(state)
    log.append("study.started", STUDY, {"policy_hash": row.policy_hash, "rounds": 4})
    history = []
    for r in range(finished):
        store.record_approval(STUDY, r, "approve", "lead", f"go {r}")
        store.record_round_start(STUDY, r, list(SILOS), flower_run_id=2**63 + r)
        refused = {"va": "privacy budget would be exceeded"} if r == 1 else {}
        replied = [s for s in SILOS if s not in refused]
        store.record_round_finish(STUDY, r, replied, refused)
        store.record_evaluation(STUDY, r, "pooled", _metrics(0.6 + 0.06 * r))
        for silo in replied:
            store.record_evaluation(STUDY, r, silo, _silo_report(silo))
            store.record_privacy_spend(STUDY, silo, r, 0.2 * (r + 1), 1.0, rounds_left=4 - r)
        log.append("round.finished", f"{STUDY}/round-{r}", {"asked": 4, "replied": replied, "refused": refused})
        history.append({"round": r, "asked": list(SILOS), "replied": replied, "refused": refused,
                        "pooled_entering_model": _metrics(0.6), "privacy": {}, "seconds": 3.0})
    silo_log = open_party_log(state / "silos" / "va", "va", "silo")  # a local demo keeps silo logs here
    silo_log.append("silo.started", STUDY, {"policy_hash": row.policy_hash, "train_rows": 85})
    silo_log.witness("coordinator", *log.head())
    store.request_approval(STUDY, finished)
    summary = {"study_id": STUDY, "policy_hash": row.policy_hash, "rounds": finished, "history": history,
               "final": None, "status": f"round {finished} waiting for approval", "reason": "", "planned_rounds": 4}
    (state / "coordinator" / "summary.json").write_text(json.dumps(summary))
    return store


@pytest.fixture()
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDCOHORT_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FEDCOHORT_DB_URL", raising=False)
    build_state(tmp_path).close()
    return tmp_path


@pytest.fixture()
def store(state: Path) -> Store:
    st = open_store(None, state)
    yield st
    st.close()


def app(user: str | None = None) -> AppTest:
    """The app, signed in as `user` (session state set before the first run skips the form)."""
    at = AppTest.from_file(str(APP), default_timeout=60)
    if user:
        at.session_state["user"] = user
        at.session_state["last_seen"] = datetime.now(timezone.utc)
    return at.run()


def on(at: AppTest, page: str) -> AppTest:
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def audit_actions(state: Path) -> list:
    return list(users.coordinator_log(state).entries())


# ----------------------------------------------------------------------------- sign-in


def test_login_works_and_shows_user_and_role(state: Path) -> None:
    at = app()
    assert [b.label for b in at.button] == ["Sign in"]
    at.text_input(key="login_name").input("lead")
    at.text_input(key="login_password").input(PASSWORDS["lead"])
    at.button[0].click().run()
    assert not at.exception
    assert at.title[0].value == "Studies"
    assert "Signed in as **lead**" in at.sidebar.markdown[0].value and "`lead`" in at.sidebar.markdown[0].value
    assert audit_actions(state)[-1].action == "user.login"
    at.sidebar.button(key="sign_out").click().run()
    assert [b.label for b in at.button] == ["Sign in"]
    assert any("Signed out" in i.value for i in at.info)


def test_login_fails_with_wrong_password_and_is_audited(state: Path) -> None:
    at = app()
    at.text_input(key="login_name").input("lead")
    at.text_input(key="login_password").input("not the password")
    at.button[0].click().run()
    assert at.error and "Sign-in failed" in at.error[0].value
    assert "user" not in at.session_state
    last = audit_actions(state)[-1]
    assert (last.action, last.subject, last.details["reason"]) == ("user.login_failed", "lead", "bad_password")
    assert "not the password" not in (state / "coordinator" / "audit.jsonl").read_text()


def test_idle_session_times_out(state: Path) -> None:
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["user"] = "lead"
    at.session_state["last_seen"] = datetime.now(timezone.utc) - timedelta(minutes=users.SESSION_MINUTES + 1)
    at.run()
    assert [b.label for b in at.button] == ["Sign in"]
    assert any("without activity" in i.value for i in at.info)


# ----------------------------------------------------------------------------- every page, every role


@pytest.mark.parametrize("user", ["lead", "aud", "root"])
def test_every_page_renders_for_every_role(state: Path, user: str) -> None:
    at = app(user)
    assert not at.exception
    if user != "root":
        with pytest.raises(ValueError, match="navigation page"):
            at.switch_page("views/users.py")  # not in a non-admin's navigation
    titles = [on(at, page).title[0].value for page in PAGES]
    assert titles == ["Studies", "Silos", "Rounds", "Evaluations", "Audit trail"]
    if user == "root":
        assert on(at, "views/users.py").title[0].value == "Users"


def test_silos_page_shows_counts_spend_and_connections(state: Path) -> None:
    at = on(app("aud"), "views/silos.py")
    frames = [d.value for d in at.dataframe]
    enrol = frames[0]
    assert list(enrol["silo"]) == list(SILOS) and set(enrol["status"]) == {"validated"}
    assert set(enrol["key ceremony"]) == {"done"}
    assert enrol.set_index("silo").loc["switzerland", "warnings"] == 1
    spend = next(f for f in frames if "epsilon_spent" in f)
    assert spend.set_index("silo").loc["cleveland", "epsilon_spent"] == pytest.approx(0.4)
    conn = frames[-1].set_index("silo")
    assert conn.loc["va", "state"] == "offline" and conn.loc["hungary", "state"] == "online"


def test_a_silo_never_seen_is_not_called_offline(state: Path, store: Store) -> None:
    """A silo row made by registration alone has no heartbeat: the page says it does not know."""
    store.register_silo("late-silo", key_fingerprint="fp-late")
    at = on(app("aud"), "views/silos.py")
    conn = at.dataframe[-1].value.set_index("silo")
    assert conn.loc["late-silo", "state"] == "not recorded" and conn.loc["va", "state"] == "offline"
    assert any("recorded no heartbeat" in c.value for c in at.caption)


# ----------------------------------------------------------------------------- rounds


def test_lead_approves_the_waiting_round(state: Path, store: Store) -> None:
    at = on(app("lead"), "views/rounds.py")
    assert any(m.value.startswith("Round **2** of 4 waits for a decision: the coordinator holds it") for m in at.markdown)
    assert any("Will take part" in m.value and "va (connection: offline)" in m.value for m in at.markdown)
    spend = next(d.value for d in at.dataframe if "after_next_round" in d.value.columns).set_index("silo")
    # cleveland spent 0.2 then 0.4: the lead sees 0.6 if the next round costs what the last did
    assert spend.loc["cleveland", "after_next_round"] == pytest.approx(0.6)
    at.text_area[0].input("metrics look fine").run()
    at.button(key="decide_approve").click().run()
    assert not at.exception and not at.error
    assert any("approve recorded by lead" in s.value for s in at.success)
    approval = store.approval_for(STUDY, 2)
    assert (approval.decision, approval.user, approval.note) == ("approve", "lead", "metrics look fine")
    assert store.is_round_approved(STUDY, 2)
    last = audit_actions(state)[-1]
    assert (last.action, last.actor, last.role) == ("round.approved", "lead", "lead")
    assert "metrics look fine" not in json.dumps(last.details), "free text stays in the store"
    assert store.audit_head("coordinator").hash == last.hash, "the store mirrors the coordinator's log"


def test_lead_can_hold_then_approve(state: Path, store: Store) -> None:
    at = on(app("lead"), "views/rounds.py")
    at.button(key="decide_hold").click().run()
    assert store.get_round(STUDY, 2).status == "held"
    assert any("Round **2**" in m.value for m in at.markdown), "a held round still waits"
    at.button(key="decide_approve").click().run()
    assert store.get_round(STUDY, 2).status == "approved"


def test_the_round_the_coordinator_waits_on_is_offered(tmp_path: Path) -> None:
    """Whatever the ServerApp asked the store to approve is what the page offers; ahead of that,
    only training rounds (the ServerApp gates rounds 1..N, not the statistics round 0)."""
    from ui import data

    with open_store(None, tmp_path) as store:
        store.create_study(_policy(), "lead")
        transition(store, STUDY, "open", "lead")
        for silo in SILOS[:3]:
            store.record_enrolment(STUDY, silo, "validated")
        transition(store, STUDY, "running", "lead")
        view = data.study_views(store, tmp_path)[0]
        assert data.offer(store, view) == (1, False), "a lead may decide the first training round ahead"
        store.record_approval(STUDY, 1, "approve", "lead")
        assert data.next_round_to_decide(store, view) is None, "one round at a time"
        store.record_round_start(STUDY, 1, list(SILOS[:3]))
        store.record_round_finish(STUDY, 1, list(SILOS[:3]), {})
        store.request_approval(STUDY, 2)  # what the ServerApp's gate does before round 2
        store.record_approval(STUDY, 2, "hold", "lead")
        assert data.offer(store, view) == (2, True), "a held round still waits at the gate"
        store.request_approval(STUDY, 0)  # a coordinator that gates the statistics round too
        assert data.next_round_to_decide(store, view) == 0


def test_auditor_cannot_approve_even_by_a_forced_click(state: Path, store: Store) -> None:
    at = on(app("aud"), "views/rounds.py")
    button = at.button(key="decide_approve")
    assert button.disabled, "the page offers an auditor no approve button"
    button.proto.disabled = False  # what a crafted websocket message does: the browser's flag is gone
    button.click().run()
    assert not at.exception
    assert store.approval_for(STUDY, 2) is None and not store.is_round_approved(STUDY, 2)
    # Streamlit 1.67 already drops a disabled widget's forged value; the handler is the second
    # line: called directly (as any other path to it would), it refuses and logs the attempt.
    with pytest.raises(actions.AccessDenied, match="refused"):
        actions.decide_round(store, state, "aud", STUDY, 1, 2, "approve", "forced")
    assert store.approval_for(STUDY, 2) is None
    last = audit_actions(state)[-1]
    assert (last.action, last.actor, last.role) == ("access.denied", "aud", "auditor")
    assert last.details == {"action": "round.approve", "needs": ["admin", "lead"]}


def test_action_handler_rechecks_the_role_in_the_store(state: Path, store: Store) -> None:
    with pytest.raises(actions.AccessDenied):
        actions.decide_round(store, state, "aud", STUDY, 1, 2, "approve")
    with pytest.raises(actions.AccessDenied):
        actions.decide_round(store, state, "ghost", STUDY, 1, 2, "approve")
    assert store.approval_for(STUDY, 2) is None
    assert [e.action for e in audit_actions(state)[-2:]] == ["access.denied", "access.denied"]


def test_live_view_lists_replies_and_refusals(state: Path) -> None:
    at = on(app("aud"), "views/rounds.py")
    assert any("round 2 waiting for approval" in m.value for m in at.markdown)
    rounds = next(d.value for d in at.dataframe if "refused" in d.value)
    assert rounds.set_index("round").loc[1, "refused"] == "va: privacy budget would be exceeded"


# ----------------------------------------------------------------------------- studies


def test_lead_creates_a_study_from_the_template(state: Path, store: Store) -> None:
    at = app("lead")
    at.text_input(key="new_study_id").input("heart-trial-2")
    at.selectbox(key="template").set_value("heart_disease")
    at.button(key="create_template").click().run()
    assert not at.exception and not at.error
    created = store.get_study("heart-trial-2")
    assert (created.version, created.status, created.created_by) == (1, "draft", "lead")
    assert any(created.policy_hash in s.value for s in at.success)
    assert at.session_state["study"] == "heart-trial-2@1", "the new study is selected"
    assert at.sidebar.selectbox[0].value == "heart-trial-2@1"
    assert audit_actions(state)[-1].action == "study.created"
    at.button(key="move_open").click().run()
    assert store.get_study("heart-trial-2").status == "open"


def test_uploaded_policy_errors_name_the_key(state: Path, store: Store) -> None:
    at = app("lead")
    bad = _policy().replace("rounds: 4", "rounds: lots")
    at.file_uploader(key="policy_upload").set_value(("bad.yaml", bad.encode(), "application/yaml"))
    at.run()
    assert at.error and "training.rounds" in at.error[0].value
    good = yaml.safe_load(_policy()) | {"id": "uploaded-study"}
    at.file_uploader(key="policy_upload").set_value(("good.yaml", yaml.safe_dump(good).encode(), "application/yaml"))
    at.run()
    at.button(key="create_upload").click().run()
    assert store.get_study("uploaded-study").status == "draft"


def test_settings_publish_a_new_version_once_the_study_is_open(state: Path, store: Store) -> None:
    at = app("lead")
    old = store.get_study(STUDY)
    at.number_input(key=f"rounds_{STUDY}@1").set_value(6)
    at.number_input(key=f"eps_{STUDY}@1").set_value(2.0)
    at.button[[b.label for b in at.button].index("Publish as new version")].click().run()
    assert not at.exception and not at.error
    new = store.get_study(STUDY)
    assert (new.version, new.status) == (2, "draft") and new.policy_hash != old.policy_hash
    assert new.spec.training.rounds == 6 and new.spec.dp.epsilon == 2.0
    assert any(new.policy_hash in s.value for s in at.success)
    assert store.get_study(STUDY, 1).policy_hash == old.policy_hash, "the open version never changes"


# ----------------------------------------------------------------------------- bad input: a clear message, nothing written


def store_snapshot(state: Path) -> tuple[list[str], bytes]:
    """Every row of the SQLite store and the coordinator's audit log, to show a refusal wrote nothing."""
    with closing(sqlite3.connect(state / "coordinator" / "fedcohort.db")) as db:
        rows = list(db.iterdump())
    return rows, (state / "coordinator" / "audit.jsonl").read_bytes()


def publish(at: AppTest) -> AppTest:
    return at.button[[b.label for b in at.button].index("Publish as new version")].click().run()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "", "Name: a study needs a name; it is empty."),
    ("name", "   ", "Name: a study needs a name; it is empty."),
    ("eps", 0.0, "Epsilon per silo: must be greater than 0 (got 0)"),
    ("eps", -1.5, "Epsilon per silo: must be greater than 0 (got -1.5)"),
])
def test_settings_form_refuses_bad_values_and_writes_nothing(state: Path, field: str, value: object,
                                                             message: str) -> None:
    before = store_snapshot(state)
    at = app("lead")
    widget = at.text_input(key=f"name_{STUDY}@1") if field == "name" else at.number_input(key=f"eps_{STUDY}@1")
    widget.set_value(value)
    publish(at)
    assert not at.exception
    assert any(e.value.startswith(message) for e in at.error), [e.value for e in at.error]
    assert any(c.value == "Nothing was saved." for c in at.caption)
    assert not at.success
    assert store_snapshot(state) == before
    # The handler refuses the same values on its own (any other path to it), still writing nothing.
    good = actions.StudySettings("Heart", 4, "fedyogi", "manual", 0, 3, 5, True, 1.0, 1e-5)
    bad = replace(good, name=value) if field == "name" else replace(good, epsilon=value)
    with open_store(None, state) as store, pytest.raises(PolicyError, match=re.escape(message)):
        actions.change_settings(store, state, "lead", STUDY, 1, bad)
    assert store_snapshot(state) == before


def _policy_with(**changes: object) -> str:
    data = yaml.safe_load(_policy()) | {"id": "uploaded-study"}
    data.update(changes)
    return yaml.safe_dump(data, sort_keys=False)


BAD_UPLOADS = {
    "unknown key": (_policy_with(sponsor="ACME"),
                    "sponsor: unknown key (not part of the study policy format)"),
    "alias": (_policy_with().replace("\nname: ", "\nname: &n ", 1).replace("retention: ", "retention: *n #", 1),
              "anchors and aliases are not allowed in study policies"),
    "empty name": (_policy_with(name=""), "name: a study needs a name; it is empty"),
    "over the size limit": (_policy_with() + "# padding\n" * 100_000,
                            "1,100,000 bytes is above the 1,000,000-byte limit for a study policy; refused"),
    "not UTF-8": (_policy_with().replace("Heart", "H\udcffeart", 1), "not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_refused_with_a_clear_message_and_write_nothing(state: Path, case: str) -> None:
    text, message = BAD_UPLOADS[case]
    raw = text.encode("utf-8", errors="surrogateescape")
    if case == "over the size limit":
        raw = raw + b" " * (1_100_000 - len(raw))
    before = store_snapshot(state)
    at = app("lead")
    at.file_uploader(key="policy_upload").set_value(("policy.yaml", raw, "application/yaml")).run()
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]
    assert at.button(key="create_upload").disabled, "nothing to create from a refused upload"
    assert store_snapshot(state) == before
    if case != "not UTF-8":  # the handler, reached without the page, parses and refuses the same text
        with open_store(None, state) as store, pytest.raises(PolicyError):
            actions.create_study(store, state, "lead", raw.decode("utf-8"))
        assert store_snapshot(state) == before


def test_policy_uploader_has_a_low_streamlit_limit(state: Path) -> None:
    """Streamlit refuses bigger files in the browser (its default is 200 MB); see the browser test."""
    from ui import UPLOAD_LIMIT_MB

    at = app("lead")
    assert UPLOAD_LIMIT_MB == 1
    assert at.file_uploader(key="policy_upload").proto.max_upload_size_mb == UPLOAD_LIMIT_MB


def test_auditor_cannot_create_studies(state: Path, store: Store) -> None:
    at = app("aud")
    assert at.button(key="create_template").disabled
    with pytest.raises(actions.AccessDenied):
        actions.create_study(store, state, "aud", shipped_study().read_text(), study_id="sneaky")
    assert [s.id for s in store.list_studies()] == [STUDY]


# ----------------------------------------------------------------------------- evaluations


def test_evaluations_show_suppressed_cells_references_and_csv(state: Path) -> None:
    at = on(app("aud"), "views/evaluations.py")
    table = at.dataframe[0].value
    va = table[table["silo"] == "switzerland"].iloc[0]
    assert va["tn"] == "suppressed" and va["specificity"] == "suppressed"
    assert any("bench/results/accuracy_heart.json" in c.value for c in at.caption)
    assert at.download_button(key="eval_csv")


def test_reference_lines_come_from_the_bench_file() -> None:
    from ui import data

    refs = {r.label: r.value for r in data.reference_lines()}
    assert refs["FLamby FedYogi (published, mean of 4 hospitals)"] == pytest.approx(0.7314)
    assert any(label.startswith("local-only hungary") for label in refs)


def test_store_empty_shows_the_summary_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCOHORT_STATE_DIR", str(tmp_path))
    with open_store(None, tmp_path) as st:
        users.add_user(st, "lead", "lead", PASSWORDS["lead"])
    (tmp_path / "coordinator" / "summary.json").write_text(json.dumps({
        "study_id": STUDY, "policy_hash": "0" * 64, "rounds": 1, "status": "completed",
        "history": [{"round": 1, "asked": ["1"], "replied": ["va"], "refused": {},
                     "pooled_entering_model": _metrics(0.5), "privacy": {}}],
        "final": {"pooled": _metrics(0.7), "per_silo": {"va": _silo_report("va")}, "mean_center_accuracy": 0.7}}))
    at = app("lead")
    assert any("read-only" in i.value for i in at.info)
    at = on(at, "views/evaluations.py")
    assert list(at.dataframe[0].value["round"]) == ["1"]  # the per-silo table, shown as text
    assert any("read-only" in i.value for i in at.info)
    on(at, "views/rounds.py")
    assert any("read-only" in c.value for c in at.caption)


# ----------------------------------------------------------------------------- audit


def test_verify_shows_ok_and_export_is_logged(state: Path) -> None:
    at = on(app("aud"), "views/audit.py")
    assert "user.login" not in set(at.dataframe[0].value["action"])  # signed in through session state
    at.button(key="audit_verify").click().run()
    assert at.success and ": OK," in at.success[0].value and "chain intact" in at.success[0].value
    at.button(key="audit_export_btn").click().run()
    download = at.download_button(key="audit_download")
    assert download.label.startswith("Download audit-export-coordinator-")
    last = audit_actions(state)[-1]
    assert (last.action, last.actor, last.details["party"]) == ("audit.exported", "aud", "coordinator")
    bundle = next((state / "exports" / "coordinator").glob("*.zip"))
    assert zipfile.is_zipfile(bundle) and verify_bundle(bundle).ok


def test_silo_logs_of_a_local_demo_are_listed_and_verified(state: Path) -> None:
    at = on(app("aud"), "views/audit.py")
    assert set(at.dataframe[0].value["party"]) == {"coordinator", "va"}
    at.selectbox(key="audit_party").set_value("va").run()
    at.button(key="audit_verify").click().run()
    assert at.success and at.success[0].value.startswith("va (audit.jsonl): OK, 2 entries")
    at.button(key="audit_export_btn").click().run()
    assert at.download_button(key="audit_download").label.startswith("Download audit-export-va-2")
    assert len(list(open_party_log(state / "silos" / "va", "va", "silo").entries())) == 2, \
        "the export is logged by the coordinator, never appended to a silo's own log"
    assert audit_actions(state)[-1].details["party"] == "va"


def test_launcher_makes_the_demo_lead_once_and_serves_with_safe_flags(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ui import __main__ as launcher

    calls: list = []
    monkeypatch.setattr(launcher.os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    launcher.main(["--state-dir", str(tmp_path), "--port", "8999"])
    argv, env = calls[0]
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("ui/app.py")
    flags = dict(zip(argv[5::2], argv[6::2]))
    assert flags == {"--server.headless": "true", "--server.address": "127.0.0.1", "--server.port": "8999",
                     "--browser.gatherUsageStats": "false", "--server.fileWatcherType": "none",
                     "--client.toolbarMode": "viewer", "--server.maxUploadSize": "1"}
    assert env["FEDCOHORT_STATE_DIR"] == str(tmp_path.resolve())
    secret = tmp_path / users.DEMO_PASSWORD_FILE
    password = secret.read_text().strip()
    assert oct(secret.stat().st_mode & 0o777) == "0o600"
    launcher.main(["--state-dir", str(tmp_path)])
    assert secret.read_text().strip() == password, "the second start makes no new account"


def test_verify_names_the_broken_entry(state: Path) -> None:
    path = state / "coordinator" / "audit.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"asked":4', '"asked":5')
    path.write_text("\n".join(lines) + "\n")
    at = on(app("aud"), "views/audit.py")
    at.button(key="audit_verify").click().run()
    assert at.error and "BROKEN" in at.error[0].value and "entry 2" in at.error[0].value


def test_audit_filters(state: Path) -> None:
    at = on(app("aud"), "views/audit.py")
    at.multiselect(key="f_action").set_value(["round.finished"]).run()
    assert set(at.dataframe[0].value["action"]) == {"round.finished"}


# ----------------------------------------------------------------------------- users


def test_admin_manages_users(state: Path, store: Store) -> None:
    at = on(app("root"), "views/users.py")
    at.text_input(key="new_user").input("nurse.lead")
    at.selectbox(key="new_role").set_value("lead")
    at.text_input(key="new_password").input("a long enough one")
    at.button[[b.label for b in at.button].index("Add user")].click().run()
    assert not at.error, [e.value for e in at.error]
    assert store.get_user("nurse.lead").role == "lead"
    for _ in range(users.MAX_FAILED_ATTEMPTS):
        users.authenticate(store, "nurse.lead", "wrong wrong wrong")
    assert store.get_user("nurse.lead").is_locked()
    at.selectbox(key="manage_user").set_value("nurse.lead").run()
    at.button(key="unlock_user").click().run()
    assert not store.get_user("nurse.lead").is_locked()
    assert [e.action for e in audit_actions(state) if e.actor == "root"] == ["user.added", "user.unlocked"]


def test_lead_cannot_manage_users(state: Path, store: Store) -> None:
    at = app("lead")
    with pytest.raises(ValueError, match="navigation page"):
        at.switch_page("views/users.py")
    # Reached anyway (the page script run on its own), the page itself refuses a non-admin.
    page = AppTest.from_file(str(ROOT / "ui" / "views" / "users.py"), default_timeout=60)
    page.session_state["user"] = "lead"
    page.run()
    assert page.error and page.error[0].value == "Only admins manage users."
    assert "Add user" not in [b.label for b in page.button]
    with pytest.raises(actions.AccessDenied):
        actions.add_user(store, state, "lead", "mallory", "admin", "a long enough one")
    with pytest.raises(actions.AccessDenied):
        actions.unlock_user(store, state, "lead", "aud")
    assert store.get_user("mallory") is None
    denied = [e for e in audit_actions(state) if e.action == "access.denied"]
    assert [e.details["action"] for e in denied] == ["user.add", "user.unlock"]
