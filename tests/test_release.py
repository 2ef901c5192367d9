"""Model release with silo consent, and the model card.

The slow test runs a 2-round CKKS + DP heart study over a real SuperLink and four real
`silo-node start` silos, then `coordinator study release` twice: first with too few
consents (nothing stored, failure recorded), then with one silo still refusing but the
minimum reached (released). The card is then loaded with the safetensors library alone
and scored on the heart test sets with plain numpy and scikit-learn's split.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from coordinator.demo import read_summary, sample_cohorts
from coordinator.runtime import LocalFederation, SiloSpec
from coordinator.store import open_store
from policies.errors import PolicyError
from policies.study import load_study, shipped_study
from tests.test_resume import _entries, _wait

STUDY_ID = "heart-disease"
ROUNDS = 2


# ---- fast: consent rules, the store's rules, agreement ------------------------------------------


def _approved(tmp_path: Path, release: str = "manual"):
    from silo_node.approval import approve

    study = load_study(shipped_study())
    approve(tmp_path, study, [], "it", release=release)
    return study


def test_consent_is_manual_by_default_auto_when_approved_so_and_refusal_wins(tmp_path):
    from policies.audit import open_party_log
    from silo_node.release import consent_for, record_consent

    log = open_party_log(tmp_path, "va", "silo")
    study = _approved(tmp_path)
    ok, why = consent_for(tmp_path, study.id, study.policy_hash())
    assert not ok and why.startswith("no consent") and f"silo-node release approve {study.id}" in why
    assert not consent_for(tmp_path, study.id, "0" * 64)[0]
    record_consent(tmp_path, study.id, "approve", "it-bob", log)
    ok, why = consent_for(tmp_path, study.id, study.policy_hash())
    assert ok and "it-bob" in why
    assert not consent_for(tmp_path, study.id, "0" * 64)[0], "consent is for the approved policy hash only"
    auto = tmp_path / "auto"
    _approved(auto, release="auto")
    assert consent_for(auto, study.id, study.policy_hash())[0]
    record_consent(auto, study.id, "refuse", "it-eve", open_party_log(auto, "x", "silo"))
    ok, why = consent_for(auto, study.id, study.policy_hash())
    assert not ok and "refused" in why and "it-eve" in why
    actions = [json.loads(line)["action"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert actions == ["release.consent_given"]


def test_consent_without_approval_or_with_a_bad_mode_changes_nothing(tmp_path):
    from policies.audit import open_party_log
    from silo_node.approval import approve
    from silo_node.release import record_consent

    with pytest.raises(PolicyError, match="not approved at this silo"):
        record_consent(tmp_path, STUDY_ID, "approve", "it", open_party_log(tmp_path, "va", "silo"))
    with pytest.raises(PolicyError, match="--release 'sometimes'"):
        approve(tmp_path, load_study(shipped_study()), [], "it", release="sometimes")
    assert not (tmp_path / "release_consent").exists() and not (tmp_path / "approvals").exists()
    assert not (tmp_path / "audit.jsonl").exists() or (tmp_path / "audit.jsonl").read_text() == ""


def test_store_releases_only_completed_studies_and_a_failure_keeps_no_model(tmp_path):
    from coordinator.lifecycle import transition

    store = open_store(None, tmp_path)
    text = shipped_study().read_text()
    store.create_study(text, "lead")
    with pytest.raises(PolicyError, match="draft: a model is released only after the last round"):
        store.request_release(STUDY_ID, "lead")
    assert store.get_release(STUDY_ID) is None
    transition(store, STUDY_ID, "open", "lead")
    for silo in ("cleveland", "hungary", "va"):
        store.record_enrolment(STUDY_ID, silo, "validated", {"ok": True, "rows": 100})
    transition(store, STUDY_ID, "running", "lead")
    with pytest.raises(PolicyError, match="running: a model is released only after"):
        store.request_release(STUDY_ID, "lead")
    transition(store, STUDY_ID, "completed", "lead")
    store.request_release(STUDY_ID, "lead")
    with pytest.raises(PolicyError, match="already requested"):
        store.request_release(STUDY_ID, "lead")
    with pytest.raises(PolicyError, match="stores neither"):
        store.finish_release(STUDY_ID, "failed", {}, "x", weights=b"w", model_card={})
    row = store.finish_release(STUDY_ID, "failed", {"va": "no consent"}, "too few")
    assert (row.status, row.weights, row.model_card, row.model_sha256) == ("failed", None, None, None)
    again = store.request_release(STUDY_ID, "lead")  # a failed attempt may be requested again
    assert again.status == "requested" and again.consents == {}
    store.close()


def test_models_that_differ_beyond_rounding_are_not_counted():
    from coordinator.release import CONSENTED, decide
    from coordinator.server_app import SiloAnswer
    from policies import messages as m
    from policies.model_card import model_bytes

    study = load_study(shipped_study())
    d = len(study.feature_names())
    w, mean, std = np.linspace(-1, 1, d + 1), np.arange(d, dtype=float), np.ones(d)
    same = model_bytes(w, mean, std, study)
    off = model_bytes(w + 1e-3, mean, std, study)

    def answer(silo: str, data: bytes | None, reason: str = "") -> SiloAnswer:
        reply = m.Reply(study_id=study.id, policy_hash=study.policy_hash(), round=ROUNDS, nonce="n", silo=silo,
                        status="ok" if data else "refused", reason=reason)
        return SiloAnswer(1, reply, {m.MODEL: np.frombuffer(data, dtype=np.uint8)} if data else {})

    outcome = decide(study, [answer("a", same), answer("b", same), answer("c", off), answer("d", None, "no consent")],
                     {"e": "no reply in time"})
    assert not outcome.released and outcome.agreeing == ["a", "b"]
    assert outcome.consents["c"].startswith("consented, but its model disagrees")
    assert outcome.consents["d"] == "no consent" and outcome.consents["e"] == "no reply in time"
    assert "minimum (min_silos) is 3" in outcome.reason
    outcome = decide(study, [answer(s, same) for s in "abc"], {})
    assert outcome.released and outcome.weights == same and set(outcome.consents.values()) == {CONSENTED}


# ---- slow: real processes -----------------------------------------------------------------------


def _run(*argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)


def _silo_cli(*argv: str) -> None:
    proc = _run("-m", "silo_node.cli", *argv, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _release(state: Path, fed: LocalFederation) -> subprocess.CompletedProcess:
    return _run("-m", "coordinator.cli", "study", "release", "--state-dir", str(state), "--superlink", fed.address,
                "--expected-silos", "4", "--user", "lead-alice", "--timeout", "600", "--insecure-local-demo")


def _score_card(card_dir: Path, study_yaml: Path) -> float:
    """Pooled accuracy of the released model on the four heart test sets, using only the card,
    the safetensors library, numpy, pandas and scikit-learn's split (no fedcohort code)."""
    from safetensors.numpy import load_file
    from sklearn.model_selection import train_test_split

    card = json.loads((card_dir / "model_card.json").read_text())
    tensors = load_file(str(card_dir / "model.safetensors"))
    t = card["feature_transform"]
    policy = yaml.safe_load(study_yaml.read_text())
    label, threshold = policy["cohort"]["label_column"], policy["features"]["label_threshold"]
    split = policy["split"]
    correct = total = 0
    for path in sample_cohorts().values():
        frame = pd.read_parquet(path)
        frame = frame[[*t["input_columns"], label]].dropna(axis=0, how="any")
        y = (frame[label].astype(float).to_numpy() > threshold).astype(int)
        stratify = y if split["stratify"] and (np.bincount(y, minlength=2) > 2).all() else None
        _, test = train_test_split(np.arange(len(y)), train_size=split["train_size"], test_size=1 - split["train_size"],
                                   random_state=split["seed"], shuffle=True, stratify=stratify)
        cols = [frame[t["numeric"]].astype(float).to_numpy()]
        for col, levels in t["one_hot"].items():
            values = frame[col].astype(float).to_numpy()
            cols.append(np.stack([(values == lvl).astype(float) for lvl in levels[1:]], axis=1))
        x = np.concatenate(cols, axis=1)[test]
        z = (x - tensors["feature_mean"]) / tensors["feature_std"]
        p = 1.0 / (1.0 + np.exp(-(z @ tensors["weight"].T + tensors["bias"]).ravel()))
        correct += int(np.sum((p >= t["threshold"]) == (y[test] == 1)))
        total += len(test)
    return correct / total


@pytest.mark.slow
def test_release_needs_the_minimum_of_consents_and_the_card_scores_as_reported(tmp_path):
    """cleveland consents automatically, hungary by silo IT's command, switzerland refuses,
    va has not decided. First release: 2 consents < min_silos 3, fails, nothing stored.
    va's IT then consents; second release: 3 consents, switzerland still refusing: released."""
    data = load_study(shipped_study()).model_dump(mode="json")
    data["training"].update(rounds=ROUNDS, local_steps=20)
    data["approval"] = {"mode": "auto", "auto_rounds": ROUNDS}
    study_path = tmp_path / "study.yaml"
    study_path.write_text(yaml.safe_dump(data, sort_keys=False))
    study = load_study(study_path)
    state, cohorts = tmp_path, sample_cohorts()
    silo_dirs = {name: state / "silos" / name for name in cohorts}
    _silo_cli("approve", "--study", str(study_path), "--state-dir", str(silo_dirs["cleveland"]), "--yes",
              "--release", "auto")
    for name in ("hungary", "switzerland", "va"):
        _silo_cli("approve", "--study", str(study_path), "--state-dir", str(silo_dirs[name]), "--yes")
    _silo_cli("release", "approve", STUDY_ID, "--state-dir", str(silo_dirs["hungary"]), "--by", "it-hungary")
    _silo_cli("release", "refuse", STUDY_ID, "--state-dir", str(silo_dirs["switzerland"]), "--by", "it-swiss")

    fed = LocalFederation(work_dir=state / "runtime" / "test")
    try:
        fed.start_superlink()
        for name, cohort in cohorts.items():
            fed.start_silo(SiloSpec(name, cohort, study_path, silo_dirs[name]))
        fed.submit({"study-path": str(study_path), "state-dir": str(state), "expected-silos": 4})
        summary_path = state / "coordinator" / "summary.json"
        _wait("the study to end", lambda: (read_summary(summary_path) or {}).get("status") in ("completed", "stopped"))
        summary = read_summary(summary_path)
        assert summary["status"] == "completed", summary.get("reason")

        first = _release(state, fed)
        assert first.returncode == 1, first.stdout + first.stderr
        assert "2 silo(s) consented with agreeing models, the study's minimum (min_silos) is 3" in first.stderr
        store = open_store(None, state)
        row = store.get_release(STUDY_ID)
        assert row.status == "failed" and row.weights is None and row.model_card is None and row.model_sha256 is None
        assert row.consents["cleveland"] == row.consents["hungary"] == "consented"
        assert row.consents["va"].startswith("no consent") and "refused consent" in row.consents["switzerland"]
        store.close()
        assert not (state / "coordinator" / "releases").exists() or not any((state / "coordinator" / "releases").iterdir())
        export = _run("-m", "coordinator.cli", "study", "export-model", "--state-dir", str(state),
                      "--out", str(tmp_path / "nothing"))
        assert export.returncode == 2 and "no released model to export (release failed" in export.stderr
        assert not (tmp_path / "nothing").exists()

        _silo_cli("release", "approve", STUDY_ID, "--state-dir", str(silo_dirs["va"]), "--by", "it-va")
        second = _release(state, fed)
        assert second.returncode == 0, second.stdout + second.stderr
    finally:
        fed.stop()

    store = open_store(None, state)
    row = store.get_release(STUDY_ID)
    assert row.status == "released" and "refused consent" in row.consents["switzerland"]
    assert {s for s, c in row.consents.items() if c == "consented"} == {"cleveland", "hungary", "va"}
    store.close()
    out = tmp_path / "exported"
    export = _run("-m", "coordinator.cli", "study", "export-model", "--state-dir", str(state), "--out", str(out))
    assert export.returncode == 0, export.stderr
    import hashlib

    weights = (out / "model.safetensors").read_bytes()
    card = json.loads((out / "model_card.json").read_text())
    digest = hashlib.sha256(weights).hexdigest()
    assert card["model"]["sha256"] == digest == row.model_sha256
    assert weights == (state / "coordinator" / "releases" / f"{STUDY_ID}-v1" / "model.safetensors").read_bytes()

    # the card: policy, rounds, who took part, spend, metrics with intervals, governance, transform
    assert card["study"]["policy_hash"] == study.policy_hash()
    assert card["training"]["rounds"] == ROUNDS
    assert card["training"]["participating_silos_per_round"] == {
        str(h["round"]): sorted(h["replied"]) for h in summary["history"]}
    spend = card["privacy"]["epsilon_spent_per_silo"]
    assert set(spend) == set(cohorts) and all(0 < s["epsilon_spent"] <= study.dp.epsilon + 1e-9 for s in spend.values())
    assert card["governance"] == study.governance.model_dump(mode="json")
    pooled = card["metrics"]["final_pooled"]
    assert pooled["accuracy"] == pytest.approx(summary["final"]["pooled"]["accuracy"], abs=1e-12)
    assert pooled["accuracy_ci_low"] < pooled["accuracy"] < pooled["accuracy_ci_high"]
    assert card["feature_transform"]["features"] == study.feature_names()

    # scored without fedcohort: the accuracy the study reported, to 1e-6
    assert _score_card(out, study_path) == pytest.approx(summary["final"]["pooled"]["accuracy"], abs=1e-6)

    # every party's audit log
    coordinator = _entries(state / "coordinator" / "audit.jsonl")
    actions = [e["action"] for e in coordinator]
    assert actions.count("release.requested") == 2 and actions.count("release.failed") == 1
    released = [e for e in coordinator if e["action"] == "release.released"]
    assert len(released) == 1 and released[0]["details"]["sha256"] == digest
    assert actions.index("release.failed") < actions.index("release.released")
    consents = [e["details"] for e in coordinator if e["action"] == "release.consent"]
    assert len(consents) == 8 and {c["silo"] for c in consents} == set(cohorts)
    assert next(e for e in coordinator if e["action"] == "release.requested")["actor"] == "lead-alice"
    for name in cohorts:
        entries = _entries(silo_dirs[name] / "audit.jsonl")
        sent = [e["details"]["sha256"] for e in entries if e["action"] == "release.model_sent"]
        refused = [e for e in entries if e["action"] == "release.consent_refused"]
        if name == "switzerland":
            assert sent == [] and len(refused) >= 3  # silo IT's refusal, then one per request
        elif name == "va":
            assert sent == [digest] and "no consent" in refused[0]["details"]["reason"]
            assert any(e["action"] == "release.consent_given" and e["actor"] == "it-va" for e in entries)
        elif name == "hungary":
            assert len(sent) == 2 and sent[-1] == digest  # sent at both requests; the first was not enough
        else:
            assert sent[-1] == digest


# ---- the web UI's request button -------------------------------------------------------------------


def test_ui_lead_requests_the_release_others_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """The Evaluations page offers the lead (only) the button; the handler re-checks the role in
    the store, so an auditor's or admin's forced request is refused, logged, and writes nothing."""
    from tests.test_ui_apptest import app, build_state, on
    from ui import actions

    monkeypatch.setenv("FEDCOHORT_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("FEDCOHORT_DB_URL", raising=False)
    store = build_state(tmp_path)
    at = on(app("aud"), "views/evaluations.py")
    assert not [b for b in at.button if b.key == "release_request"]
    for user in ("aud", "root"):
        with pytest.raises(actions.AccessDenied, match="needs the role lead"):
            actions.request_release(store, tmp_path, user, STUDY_ID, 1)
    assert store.get_release(STUDY_ID) is None
    at = on(app("lead"), "views/evaluations.py")
    at.button(key="release_request").click().run()
    assert not at.exception, [e.value for e in at.exception]
    row = store.get_release(STUDY_ID)
    assert (row.status, row.requested_by) == ("requested", "lead")
    entries = list(actions.coordinator_log(tmp_path).entries())
    assert (entries[-1].action, entries[-1].actor, entries[-1].role) == ("release.requested", "lead", "lead")
    assert [e.action for e in entries[-3:-1]] == ["access.denied", "access.denied"]
    assert any("delivered when its run ends" in c.value for c in on(app("lead"), "views/evaluations.py").caption)
    store.close()


# ---- in one process: the same flow over the real silo handlers -------------------------------------

from tests.test_closing_exchange import LoopbackGrid, flower_task  # noqa: E402,F401  (autouse fixture)


def test_release_flow_over_real_silo_handlers_in_one_process(tmp_path):
    """The ServerApp's release mode (`serve_release`) against the real silo request handler,
    with Flower replaced by a loopback grid: a plaintext 2-round study, a failed release with
    two consents (nothing stored), then a released one with switzerland refusing; the card
    scores as the study reported."""
    from coordinator.bookkeeping import StudyBook
    from coordinator.release import request_release, serve_release
    from coordinator.server_app import StudyRunner
    from policies.audit import open_party_log
    from policies.study import load_study_text
    from silo_node.approval import approve
    from silo_node.release import record_consent
    from silo_node.worker import Silo

    data = load_study(shipped_study()).model_dump(mode="json")
    data.update(encryption="none", privacy="none")
    data["training"].update(rounds=ROUNDS, local_steps=10)
    data["approval"] = {"mode": "auto", "auto_rounds": ROUNDS}
    text = yaml.safe_dump(data, sort_keys=False)
    study_path = tmp_path / "study.yaml"
    study_path.write_text(text)
    study = load_study_text(text)
    silos = {}
    for node, (name, cohort) in enumerate(sample_cohorts().items(), start=11):
        silo = Silo.from_cohort(name, study, cohort, state_dir=tmp_path / name)
        silo.audit = open_party_log(tmp_path / name, name, "silo")
        approve(tmp_path / name, study, [], "it", release="auto" if name == "cleveland" else "manual")
        silos[node] = (silo, silo.audit)
    record_consent(tmp_path / "hungary", study.id, "approve", "it-h", silos[12][1])
    record_consent(tmp_path / "switzerland", study.id, "refuse", "it-s", silos[13][1])
    grid = LoopbackGrid(silos)

    def runner() -> StudyRunner:
        r = StudyRunner(grid, study, tmp_path / "coordinator", timeout=5, poll=0.01, expected=4)
        r.book = StudyBook(tmp_path, study, text, r.audit) if r.book is None and not released_mode[0] else None
        return r

    released_mode = [False]
    first = runner()
    first.run()
    summary = json.loads((tmp_path / "coordinator" / "summary.json").read_text())
    assert summary["status"] == "completed", summary["reason"]
    released_mode[0] = True
    store = first.book.store
    request_release(store, first.audit, study.id, "lead")
    serve_release(runner(), store)
    row = store.get_release(study.id)
    assert row.status == "failed" and row.weights is None and row.model_card is None
    assert "2 silo(s) consented" in row.reason and row.consents["va"].startswith("no consent")
    assert not (tmp_path / "coordinator" / "releases").exists()

    record_consent(tmp_path / "va", study.id, "approve", "it-v", silos[14][1])
    request_release(store, first.audit, study.id, "lead")
    serve_release(runner(), store)
    row = store.get_release(study.id)
    assert row.status == "released", row.reason
    assert "refused consent" in row.consents["switzerland"]
    card_dir = tmp_path / "coordinator" / "releases" / f"{study.id}-v{study.version}"
    card = json.loads((card_dir / "model_card.json").read_text())
    assert card["model"]["sha256"] == row.model_sha256
    assert card["training"]["participating_silos_per_round"] == {"1": sorted(cohorts_names()), "2": sorted(cohorts_names())}
    assert card["privacy"]["epsilon_spent_per_silo"] == {} and card["privacy"]["mechanism"] == "none"
    assert _score_card(card_dir, study_path) == pytest.approx(summary["final"]["pooled"]["accuracy"], abs=1e-6)
    sent = [e["details"]["sha256"] for e in _entries(tmp_path / "va" / "audit.jsonl") if e["action"] == "release.model_sent"]
    assert sent == [row.model_sha256]
    store.close()


def cohorts_names() -> list[str]:
    return list(sample_cohorts())
