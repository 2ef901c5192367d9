"""Key lifecycle in one process: destroy, withdraw, revoke and re-key with real TenSEAL keys,
a real SQLite store and the real silo request handler (Flower's transport replaced by the
loopback grid of tests/test_closing_exchange.py). The same over real SuperLink and
SuperNode processes is in tests/test_key_lifecycle.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.bookkeeping import StudyBook
from coordinator.demo import sample_cohorts
from coordinator.rounds import StudyState
from coordinator.server_app import StudyRunner
from coordinator.store import open_store
from policies import messages as m
from policies.audit import open_party_log
from policies.ckks import load_context
from policies.errors import PolicyError
from policies.study import load_study, shipped_study
from policies.update import unpack_sum
from silo_node import keys
from silo_node.approval import approve
from silo_node.codec import CkksCodec
from silo_node.key_lifecycle import destroy_study_secret, lifecycle_record, withdraw
from silo_node.worker import Silo
from tests.test_closing_exchange import LoopbackGrid, flower_task  # noqa: F401  (fixture)

SILO_CLI = [sys.executable, "-m", "silo_node.cli"]
COORDINATOR_CLI = [sys.executable, "-m", "coordinator.cli"]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def _holds(directory: Path, secret: bytes) -> list[str]:
    """Files under `directory` holding the secret, or any 64-byte piece of it."""
    pieces = [secret[i:i + 64] for i in range(0, len(secret) - 64, max(1, len(secret) // 16))]
    return [name for name, data in _files(directory).items() if secret in data or any(p in data for p in pieces)]


def _study(rounds: int = 3):
    base = load_study(shipped_study())
    return base.model_copy(update={"privacy": "none", "min_silos": 2,
                                   "training": base.training.model_copy(update={"rounds": rounds})})


# ---------------------------------------------------------------------------- destroy, withdraw


def _keyed_silo(tmp_path: Path, study) -> tuple[Silo, bytes, bytes]:
    """A silo holding two key epochs of the study (as after one re-key)."""
    silo = Silo.from_cohort("cleveland", study, sample_cohorts()["cleveland"], state_dir=tmp_path / "cleveland")
    approve(silo.state_dir, study, [], "silo-it")
    silo.make_study_key({})
    silo.make_study_key({}, epoch=1)
    first = keys.load_study_secret(silo.state_dir, study.id)
    second = keys.load_study_secret(silo.state_dir, study.id, 1)
    return silo, first, second


def test_destroy_overwrites_every_epoch_logs_hashes_and_refuses_later_use(tmp_path):
    import hashlib

    study = _study()
    silo, first, second = _keyed_silo(tmp_path, study)
    assert first != second and len(keys.study_secret_files(silo.state_dir, study.id)) == 2
    done = destroy_study_secret(silo.state_dir, study.policy_hash()[:16], "release answered", party="cleveland")
    assert done.study_id == study.id
    assert sorted(f["sha256_before"] for f in done.files) == sorted(hashlib.sha256(s).hexdigest() for s in (first, second))
    assert keys.study_secret_files(silo.state_dir, study.id) == []
    assert _holds(silo.state_dir, first) == [] and _holds(silo.state_dir, second) == []
    entry = _log(silo.state_dir / "audit.jsonl")[-1]
    assert entry["action"] == "key.destroyed" and entry["details"]["reason"] == "release answered"
    assert first.hex()[:64] not in json.dumps(entry)  # hashes of the files, never the key
    req = m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=1, nonce=m.new_nonce())
    silo.check(req)  # destroyed, not withdrawn: a request that needs no key is still answered
    with pytest.raises(PolicyError, match=r"destroyed its key material at .* \(release answered\)"):
        silo.encode_eval(np.zeros(6))
    again = destroy_study_secret(silo.state_dir, study.id, "second look", party="cleveland")
    assert again.files == [] and len(lifecycle_record(silo.state_dir, study.id)["destroyed"]) == 2


def test_destroy_refuses_bad_input_and_changes_nothing(tmp_path):
    study = _study()
    silo, _, _ = _keyed_silo(tmp_path, study)
    before = _files(silo.state_dir)
    with pytest.raises(PolicyError, match="needs a reason"):
        destroy_study_secret(silo.state_dir, study.id, "  ")
    with pytest.raises(PolicyError, match=r"no study 'other-study' approved or keyed at this silo \(known: heart"):
        destroy_study_secret(silo.state_dir, "other-study", "x")
    proc = subprocess.run([*SILO_CLI, "keys", "destroy", "0000000000000000", "--state-dir", str(silo.state_dir),
                           "--reason", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no study '0000000000000000'" in proc.stderr
    assert _files(silo.state_dir) == before


def test_withdraw_refuses_every_later_request_and_destroys_the_keys(tmp_path):
    study = _study()
    silo, first, _ = _keyed_silo(tmp_path, study)
    proc = subprocess.run([*SILO_CLI, "withdraw", study.id, "--state-dir", str(silo.state_dir), "--reason",
                           "ethics approval lapsed", "--name", "cleveland"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "destroyed study-heart-disease.ckks-secret" in proc.stdout
    assert _holds(silo.state_dir, first) == []
    req = m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=2, nonce=m.new_nonce())
    with pytest.raises(PolicyError, match=r"^withdrawn: this silo withdrew from study heart-disease .*ethics approval"):
        silo.check(req)
    actions = [e["action"] for e in _log(silo.state_dir / "audit.jsonl")]
    assert actions[-2:] == ["study.withdrawn", "key.destroyed"]
    with pytest.raises(PolicyError, match="already withdrew"):
        withdraw(silo.state_dir, study.id)


# ---------------------------------------------------------------------------- revoke + re-key, in process


def test_revocation_rekeys_and_withdrawal_stops_sampling(tmp_path):
    """Round 1 with four silos; before round 2 va is revoked (store) and hungary withdraws.
    Round 2 re-keys among the rest; hungary says it withdrew at the re-key and is never asked
    again; va's old key cannot read what is aggregated after the re-key."""
    study = _study()
    cohorts = sample_cohorts()
    silos: dict[int, tuple[Silo, object]] = {}
    for node, name in enumerate(("cleveland", "hungary", "switzerland", "va"), start=101):
        silo = Silo.from_cohort(name, study, cohorts[name], state_dir=tmp_path / name)
        silo.audit = open_party_log(tmp_path / name, name, "silo")
        silos[node] = (silo, silo.audit)
    by_name = {s.name: s for s, _ in silos.values()}
    runner = StudyRunner(LoopbackGrid(silos), study, tmp_path / "coordinator", timeout=5, poll=0.01, expected=4)
    runner.book = StudyBook(tmp_path, study, shipped_study().read_text(), runner.audit)
    first_keys: dict[str, bytes] = {}
    approve = runner.book.approve

    def before_round(round_no: int, poll: float = 1.0) -> None:
        if round_no == 2:
            first_keys.update({n: keys.load_study_secret(tmp_path / n, study.id) for n in by_name})
            runner.book.store.revoke_silo("va", "laptop with the node key stolen")
            withdraw(tmp_path / "hungary", study.id, "ethics approval lapsed", party="hungary")
        approve(round_no, poll=0.01)

    runner.book.approve = before_round
    runner.run()

    summary = json.loads((tmp_path / "coordinator" / "summary.json").read_text())
    assert summary["status"] == "completed", summary.get("reason")
    with open_store(None, tmp_path) as store:
        rounds = {r.round_no: r for r in store.list_rounds(study.id)}
        enrolments = {e.silo: e.status for e in store.list_enrolments(study.id)}
        state, _, meta = StudyState.from_checkpoint(store.load_last_checkpoint(study.id).encrypted_state,
                                                    study.id, study.policy_hash())
    assert sorted(rounds[1].asked) == ["cleveland", "hungary", "switzerland", "va"]
    assert sorted(rounds[2].asked) == sorted(rounds[3].asked) == ["cleveland", "switzerland"]
    assert enrolments["va"] == "revoked" and enrolments["hungary"] == "withdrawn"
    audit = _log(tmp_path / "coordinator" / "audit.jsonl")
    rekeyed = [e for e in audit if e["action"] == "key.rekeyed"]
    assert len(rekeyed) == 1 and rekeyed[0]["details"]["sealed_to"] == ["switzerland"]
    assert rekeyed[0]["details"]["revoked"] == ["va"] and rekeyed[0]["details"]["from_round"] == 2
    assert [e["subject"] for e in audit if e["action"] == "silo.withdrew"] == ["hungary"]
    assert meta["key_epoch"] == 1 and meta["epoch_starts"] == {"1": 2}

    # the revoked silo never received the new key, and its old one does not open what came after
    assert not (tmp_path / "va" / "keys" / f"study-{study.id}.e1.ckks-secret").exists()
    assert all(e["details"].get("key_epoch", 0) == 0 for e in _log(tmp_path / "va" / "audit.jsonl")
               if e["action"] == "key.received")
    new_key = CkksCodec(load_context(keys.load_study_secret(tmp_path / "switzerland", study.id, 1), study.ckks), study.ckks)
    old_key = CkksCodec(load_context(first_keys["va"], study.ckks), study.ckks)
    after = state.aggregates[-1]
    assert unpack_sum(new_key.decode(after)).contributors == 2
    try:
        garbage = unpack_sum(old_key.decode(after))
        assert garbage.contributors != 2 or not np.allclose(garbage.mean, unpack_sum(new_key.decode(after)).mean,
                                                             atol=1e-3)
    except (PolicyError, ValueError):
        pass  # refused outright: as good
    # the remaining silos replay the history across the key change to the same model
    history = m.history_arrays(state.stats_sum, state.aggregates) | runner._key_arrays()
    for name in ("cleveland", "switzerland"):
        by_name[name].use_key_epochs(history)
    w = [by_name[n].global_weights(state.aggregates) for n in ("cleveland", "switzerland")]
    np.testing.assert_allclose(w[0], w[1], atol=1e-12)
    # the withdrawn silo destroyed what it had; a reply under the revoked silo's name is rejected
    assert _holds(tmp_path / "hungary", first_keys["hungary"]) == []
    req = m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=3, nonce=m.new_nonce())
    with pytest.raises(ValueError, match="'va' .* was revoked"):
        runner.check_identity(104, "va")
    with pytest.raises(PolicyError, match="^withdrawn:"):
        by_name["hungary"].check(req)


def test_revoke_cli_refuses_unknown_or_twice_and_changes_nothing(tmp_path):
    with open_store(None, tmp_path) as store:
        store.register_silo("va")
    proc = subprocess.run([*COORDINATOR_CLI, "silo", "revoke", "nobody", "--state-dir", str(tmp_path), "--reason", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no silo named 'nobody'" in proc.stderr
    assert not (tmp_path / "coordinator" / "audit.jsonl").exists()
    proc = subprocess.run([*COORDINATOR_CLI, "silo", "revoke", "va", "--state-dir", str(tmp_path), "--reason",
                           "left the consortium"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # no node key registered: nothing to unregister at a SuperLink
    assert "revoked silo va (no node id on record" in proc.stdout
    again = subprocess.run([*COORDINATOR_CLI, "silo", "revoke", "va", "--state-dir", str(tmp_path), "--reason", "y"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already revoked" in again.stderr and "left the consortium" in again.stderr
    entries = _log(tmp_path / "coordinator" / "audit.jsonl")
    assert [(e["action"], e["subject"]) for e in entries] == [("silo.revoked", "va")]
    with open_store(None, tmp_path) as store:
        assert store.get_silo("va").revoked_reason == "left the consortium"


@pytest.mark.parametrize("outcome, kept", [("completed", True), ("stopped", False)])
def test_closing_a_stopped_study_destroys_the_keys_a_completed_one_keeps_them(tmp_path, outcome, kept):
    from silo_node.service import handle

    study = _study()
    silo, first, _ = _keyed_silo(tmp_path, study)
    log = open_party_log(silo.state_dir, silo.name, "silo")
    silo.audit = log
    req = m.Request(study_id=study.id, policy_hash=study.policy_hash(), round=3, nonce=m.new_nonce(), audit_seq=7,
                    audit_head="ab" * 32)
    reply, _ = handle(silo, log, m.CLOSE, req.model_dump(), {m.OUTCOME: np.frombuffer(outcome.encode(), np.uint8)})
    assert reply["status"] == "ok"
    assert bool(keys.study_secret_files(silo.state_dir, study.id)) is kept
    assert (_holds(silo.state_dir, first) == []) is not kept
    destroyed = [e for e in _log(silo.state_dir / "audit.jsonl") if e["action"] == "key.destroyed"]
    assert len(destroyed) == (0 if kept else 1)
