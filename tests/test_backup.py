"""Silo state backup and restore (`silo-node backup` / `silo-node restore`).

The fast tests build a silo state directory with the real pieces (enrolment and audit keys,
a privacy ledger with Opacus-accounted charges, an approval, an outbox reply, the SuperNode
key, a trusted CA) and check: backup, wipe, restore gives back the same spend and the same
audit chain; a wrong passphrase or key and an altered or truncated archive are refused with
nothing written; a non-empty state directory is replaced only with --force, and kept aside.

The slow test runs a real SuperLink and four `silo-node start` silos: one silo is backed up
after round 1, trains round 2, is stopped and restored from the older backup, and its next
round is refused (the coordinator witnessed the newer ledger), the reason in the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import stat
from pathlib import Path

import numpy as np
import pytest

from policies.audit import AUDIT_FILE, AUDIT_KEY_FILE, PartyKey, open_party_log, verify
from policies.errors import PolicyError
from policies.study import load_study, shipped_study
from silo_node import backup as bk
from silo_node.approval import approve
from silo_node.certs import request_node_key
from silo_node.cli import main as silo_cli
from silo_node.keys import EnrolmentKey, store_study_secret
from silo_node.ledger import PrivacyLedger
from silo_node.outbox import Outbox

PASSPHRASE = "correct horse battery staple"
STUDY = "heart-disease"


@pytest.fixture(scope="module")
def study():
    spec = load_study(shipped_study())
    assert spec.dp is not None
    return spec


def _silo_state(root: Path, study) -> Path:
    """A state directory as a silo that trained two rounds leaves it, plus what is not state."""
    state = root / "cleveland"
    EnrolmentKey.load_or_create(state)
    store_study_secret(state, STUDY, os.urandom(4096))
    request_node_key(state)
    approve(state, study, [], "silo-it")
    ledger = PrivacyLedger.load(state, STUDY, policy_hash=study.policy_hash(), privacy=study.dp)
    for r in (1, 2):
        ledger.charge(r, f"nonce-{r}", 2.0, 0.01, 10, release_digest=hashlib.sha256(bytes([r])).hexdigest())
    log = open_party_log(state, "cleveland", "silo")
    log.append("train.replied", f"{STUDY}/round-1", {"ledger_seq": 1})
    log.witness("coordinator", 7, "a" * 64)
    log.append("train.replied", f"{STUDY}/round-2", {"ledger_seq": 2})
    Outbox(state, durable=frozenset({"train"})).put(("train", 2, "nonce-2"), ({"status": "ok"}, {"u": np.arange(5)}))
    (state / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    # not state: the service's per-start key and socket, a lock, an export, and cohort data
    (state / "silo.key").write_text("per-start key")
    (state / "exports").mkdir()
    (state / "exports" / "audit.csv").write_text("seq\n1\n")
    (state / "cohort.parquet").write_bytes(b"PAR1 patient rows PAR1")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(state / "silo.sock"))
    listener.close()  # a stale socket file: no service answers
    return state


def _files(state: Path) -> dict[str, bytes]:
    return {p.relative_to(state).as_posix(): p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file()}


def _secret_file(tmp_path: Path, content: bytes, name: str = "pass") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def _audit_key(state: Path) -> dict[str, bytes]:
    return PartyKey.load_or_create(state / AUDIT_KEY_FILE).public_keys()


def _cli(*argv: str) -> int:
    return silo_cli([str(a) for a in argv])


def test_backup_wipe_restore_gives_the_same_spend_and_audit_chain(tmp_path, study, capsys):
    state = _silo_state(tmp_path, study)
    before = _files(state)
    spent = PrivacyLedger.load(state, STUDY).spent()
    head_at_backup = open_party_log(state, "cleveland", "silo").head()
    passfile = _secret_file(tmp_path, PASSPHRASE.encode() + b"\n")
    archive = tmp_path / "backups" / "cleveland-1.fcbk"
    archive.parent.mkdir()

    assert _cli("backup", "--state-dir", state, "--out", archive, "--passphrase-file", passfile) == 0
    out = capsys.readouterr().out
    assert "privacy ledger heart-disease: 2 charges" in out
    assert "not backed up: cohort.parquet (looks like cohort data" in out
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    blob = archive.read_bytes()
    for secret in (before["keys/enrolment.key"], before["keys/study-heart-disease.ckks-secret"][:64], b"PAR1 patient"):
        assert secret not in blob  # encrypted, and the cohort is not in it at all
    logged = list(open_party_log(state, "cleveland", "silo").entries())[-1]
    assert logged.action == bk.BACKUP_ACTION and logged.subject == archive.name
    assert logged.details["sha256"] == hashlib.sha256(blob).hexdigest() and logged.details["bytes"] == len(blob)
    assert logged.details["ledgers"] == {STUDY: 2} and logged.details["audit_head_seq"] == head_at_backup[0]

    shutil.rmtree(state)
    assert _cli("restore", "--in", archive, "--state-dir", state, "--passphrase-file", passfile) == 0
    restored = _files(state)
    kept = {k: v for k, v in before.items() if k not in ("silo.key", "ledger/.lock", "exports/audit.csv", "cohort.parquet")}
    assert {k: v for k, v in restored.items() if k != AUDIT_FILE} == {k: v for k, v in kept.items() if k != AUDIT_FILE}
    assert restored[AUDIT_FILE].startswith(before[AUDIT_FILE])  # same chain, plus the restore's own entry
    assert stat.S_IMODE((state / "keys").stat().st_mode) == 0o700
    assert all(stat.S_IMODE((state / rel).stat().st_mode) == 0o600 for rel in restored)

    ledger = PrivacyLedger.load(state, STUDY)
    assert ledger.spent() == spent and ledger.seq == 2
    entries = list(open_party_log(state, "cleveland", "silo").entries())
    assert (entries[-2].seq, entries[-2].hash) == head_at_backup
    assert entries[-1].action == bk.RESTORE_ACTION and entries[-1].prev_hash == head_at_backup[1]
    assert entries[-1].details["sha256"] == hashlib.sha256(blob).hexdigest()
    result = verify(state / AUDIT_FILE, _audit_key(state))
    assert result.ok and result.entries == head_at_backup[0] + 1, result.problem


def test_key_file_backup_and_wrong_key_kinds(tmp_path, study):
    state = _silo_state(tmp_path, study)
    key = _secret_file(tmp_path, os.urandom(32), "key")
    archive = tmp_path / "k.fcbk"
    bk.backup(state, archive, bk.key_from_file(key))
    hex_key = _secret_file(tmp_path, key.read_bytes().hex().encode() + b"\n", "key.hex")
    target = tmp_path / "restored"
    assert bk.restore(archive, target, bk.key_from_file(hex_key)).files > 0
    assert PrivacyLedger.load(target, STUDY).seq == 2

    with pytest.raises(PolicyError, match="made with a key file: restore it with --key-file"):
        bk.restore(archive, tmp_path / "other", bk.passphrase_from_text(PASSPHRASE))
    with pytest.raises(PolicyError, match="exactly 32 bytes"):
        bk.key_from_file(_secret_file(tmp_path, b"short", "bad.key"))
    loose = _secret_file(tmp_path, os.urandom(32), "loose.key")
    loose.chmod(0o644)
    with pytest.raises(PolicyError, match="readable by others"):
        bk.key_from_file(loose)
    with pytest.raises(PolicyError, match="at least 12"):
        bk.passphrase_from_text("short\n")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def test_wrong_passphrase_or_altered_archive_is_refused_and_writes_nothing(tmp_path, study, capsys):
    state = _silo_state(tmp_path, study)
    archive = tmp_path / "b.fcbk"
    bk.backup(state, archive, bk.passphrase_from_text(PASSPHRASE))
    blob = archive.read_bytes()
    header_end = len(bk.MAGIC) + 4 + int.from_bytes(blob[len(bk.MAGIC):len(bk.MAGIC) + 4], "big")
    target = tmp_path / "new-state"
    right = bk.passphrase_from_text(PASSPHRASE)

    with pytest.raises(PolicyError, match="wrong passphrase or key, or the archive was altered"):
        bk.restore(archive, target, bk.passphrase_from_text("not the passphrase at all"))
    cases = {
        "ciphertext byte": _flip(blob, len(blob) - 100),
        "header byte": blob.replace(b'"created_at":"', b'"created_at":"1', 1)[:-1] + blob[-1:],
        "truncated": blob[:-20],
    }
    for what, data in cases.items():
        archive.write_bytes(data)
        with pytest.raises(PolicyError, match="authentication failed|damaged header") as err:
            bk.restore(archive, target, right)
        assert "nothing was written" in str(err.value) or "damaged" in str(err.value), what
    archive.write_bytes(b"PK\x03\x04 a zip, not a backup")
    with pytest.raises(PolicyError, match="not a fedcohort silo backup"):
        bk.restore(archive, target, right)
    archive.write_bytes(blob.replace(b'"version":1', b'"version":9', 1))
    with pytest.raises(PolicyError, match="format version 9"):
        bk.restore(archive, target, right)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".new-state")) == []  # no staging left

    archive.write_bytes(_flip(blob, header_end + 5))  # through the CLI: exit 2, the reason, nothing written
    passfile = _secret_file(tmp_path, PASSPHRASE.encode())
    assert _cli("restore", "--in", archive, "--state-dir", target, "--passphrase-file", passfile) == 2
    assert "authentication failed" in capsys.readouterr().err and not target.exists()


def test_restore_into_a_used_state_dir_needs_force_and_keeps_the_old_state(tmp_path, study):
    state = _silo_state(tmp_path, study)
    archive = tmp_path / "b.fcbk"
    secret = bk.passphrase_from_text(PASSPHRASE)
    bk.backup(state, archive, secret)
    PrivacyLedger.load(state, STUDY).charge(3, "nonce-3", 2.0, 0.01, 10)  # the silo trains on after the backup
    before = _files(state)
    with pytest.raises(PolicyError, match="not empty; .* pass --force"):
        bk.restore(archive, state, secret)
    assert _files(state) == before

    result = bk.restore(archive, state, secret, force=True)
    assert result.replaced is not None and _files(result.replaced) == before  # the newer state is kept aside
    assert PrivacyLedger.load(state, STUDY).seq == 2 and PrivacyLedger.load(result.replaced, STUDY).seq == 3

    with pytest.raises(PolicyError, match="already exists"):
        bk.backup(state, archive, secret)
    with pytest.raises(PolicyError, match="outside the state directory"):
        bk.backup(state, state / "inside.fcbk", secret)


def test_restore_refuses_while_the_service_runs(tmp_path, study):
    state = _silo_state(tmp_path, study)
    archive = tmp_path / "b.fcbk"
    secret = bk.passphrase_from_text(PASSPHRASE)
    bk.backup(state, archive, secret)
    (state / "silo.sock").unlink()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(state / "silo.sock"))
        listener.listen(1)
        with pytest.raises(PolicyError, match="is running on this state directory; stop it first"):
            bk.restore(archive, state, secret, force=True)
    assert PrivacyLedger.load(state, STUDY).seq == 2


# ---- real processes: an older restore is refused ------------------------------------------------


def _supernode_ids(log: Path) -> list[str]:
    """Every node id the silo's SuperNode registered under (its log is appended across restarts)."""
    return [line.rsplit("SuperNode ID:", 1)[1].strip() for line in log.read_text(errors="replace").splitlines()
            if "SuperNode ID:" in line]


def _stop(proc) -> None:
    """Stop `silo-node start` as silo IT would (SIGTERM to its session: service and SuperNode)."""
    try:
        os.killpg(proc.popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    proc.popen.wait(timeout=120)


def _round_finished(state: Path, round_no: int) -> bool:
    from coordinator.store import open_store

    try:
        store = open_store(None, state)
        try:
            return any(r.round_no == round_no and r.status == "finished" for r in store.list_rounds(STUDY))
        finally:
            store.close()
    except PolicyError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(2400)  # real processes, 3 CKKS + DP rounds and a silo restart on 2 shared cores
def test_restoring_an_older_backup_is_refused_at_the_next_round(tmp_path, sample_paths):
    """CKKS + DP study, 3 rounds, rounds 2 and 3 wait for the lead. va is backed up after
    round 1 (while it runs), trains round 2, is stopped and restored from that backup, and
    started again (a new SuperNode id). Its ledger now holds fewer charges than the
    coordinator witnessed, so round 3 is refused at va with that reason in the store, va is
    not charged, and the study completes with the other three."""
    import yaml

    from coordinator.demo import read_summary, sample_cohorts
    from coordinator.runtime import LocalFederation, SiloSpec
    from coordinator.store import open_store
    from tests.test_resume import _checkpointed, _entries, _small_study, _wait

    study_path = _small_study(tmp_path, private=True, auto_rounds=1)
    data = yaml.safe_load(study_path.read_text())
    data["training"]["rounds"] = 3
    study_path.write_text(yaml.safe_dump(data, sort_keys=False))
    state, cohorts = tmp_path, sample_cohorts()
    va_dir = state / "silos" / "va"
    summary_path = state / "coordinator" / "summary.json"
    passfile = _secret_file(tmp_path, PASSPHRASE.encode(), "backup-pass")
    archive = tmp_path / "va-after-round-1.fcbk"
    fed = LocalFederation(work_dir=state / "runtime" / "test")

    def status() -> str:
        return (read_summary(summary_path) or {}).get("status", "")

    def approve_round(r: int) -> None:
        store = open_store(None, state)
        store.record_approval(STUDY, r, "approve", "lead-alice", f"round {r}")
        store.close()

    try:
        fed.start_superlink()
        specs = {name: SiloSpec(name, cohort, study_path, state / "silos" / name) for name, cohort in cohorts.items()}
        silos = {name: fed.start_silo(spec) for name, spec in specs.items()}
        fed.submit({"study-path": str(study_path), "state-dir": str(state), "expected-silos": 4,
                    "reply-timeout": 180})
        _wait("round 1 checkpointed, round 2 at the gate",
              lambda: _checkpointed(state) == 1 and status() == "round 2 waiting for approval", 1200)
        assert _cli("backup", "--state-dir", va_dir, "--out", archive, "--passphrase-file", passfile) == 0
        backed_up = PrivacyLedger.load(va_dir, STUDY).seq
        approve_round(2)
        _wait("round 2 checkpointed, round 3 at the gate",
              lambda: _checkpointed(state) == 2 and status() == "round 3 waiting for approval", 1200)
        witnessed = PrivacyLedger.load(va_dir, STUDY).seq
        assert witnessed == backed_up + 1  # round 2's charge, which the coordinator saw in va's reply

        _stop(silos["va"])
        assert _cli("restore", "--in", archive, "--state-dir", va_dir, "--passphrase-file", passfile) == 2
        assert _cli("restore", "--in", archive, "--state-dir", va_dir, "--passphrase-file", passfile, "--force") == 0
        assert PrivacyLedger.load(va_dir, STUDY).seq == backed_up
        silos["va"] = fed.start_silo(specs["va"])
        _wait("va's new SuperNode to register", lambda: len(_supernode_ids(silos["va"].log)) >= 2, 600)
        approve_round(3)
        _wait("round 3 to finish", lambda: _round_finished(state, 3), 1500)
    finally:
        fed.stop()

    store = open_store(None, state)
    rounds = {r.round_no: r for r in store.list_rounds(STUDY)}
    store.close()
    reason = rounds[3].refused.get("va", "")
    assert "restored from an older backup or rolled back" in reason, rounds[3].refused
    assert f"holds {backed_up} charges but the coordinator witnessed {witnessed}" in reason
    assert "va" not in rounds[3].replied and len(rounds[3].replied) == 3
    ledger = PrivacyLedger.load(va_dir, STUDY)
    assert ledger.seq == backed_up  # refused before anything was charged: the spend did not move
    silo_log = _entries(va_dir / AUDIT_FILE)
    assert [e["action"] for e in silo_log].count(bk.RESTORE_ACTION) == 1
    assert any(e["action"] == "train.refused" and e["subject"] == f"{STUDY}/round-3" for e in silo_log)
    coordinator_log = _entries(state / "coordinator" / AUDIT_FILE)
    finished = [e for e in coordinator_log if e["action"] == "round.finished" and e["subject"].endswith("round-3")]
    assert "restored from an older backup" in finished[-1]["details"]["refused"]["va"]
