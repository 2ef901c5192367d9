"""The audit trail: hash chain, signatures, tamper findings, torn writes, locking and exports."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from policies.audit import (
    COLUMNS,
    GENESIS_HASH,
    AuditEntry,
    AuditLog,
    PartyKey,
    check_witnesses,
    entry_hash,
    export_bundle,
    verify,
    verify_bundle,
    witness_details,
)
from policies.errors import PolicyError

ACTIONS = [
    ("study.created", "heart-disease", {"version": 1}),
    ("silo.enrolled", "cleveland", {"rows": 303}),
    ("round.approved", "round-1", {"round": 1}),
    ("silo.refused", "va", {"round": 1, "reason": "too_few_rows"}),
    ("round.finished", "round-1", {"round": 1, "replied": 3}),
    ("privacy.charged", "round-1", {"epsilon": 0.5}),
]


@pytest.fixture()
def key(tmp_path: Path) -> PartyKey:
    return PartyKey.load_or_create(tmp_path / "keys" / "coordinator.pem")


@pytest.fixture()
def log(tmp_path: Path, key: PartyKey) -> AuditLog:
    audit = AuditLog(tmp_path / "coordinator.jsonl", key, party="coordinator", role="coordinator")
    for action, subject, details in ACTIONS:
        audit.append(action, subject, details)
    return audit


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="ascii").splitlines(keepends=True)


def write_lines(path: Path, content: list[str]) -> None:
    path.write_text("".join(content), encoding="ascii")


def resign(entry: dict, key: PartyKey) -> dict:
    """What a key holder (or a forger with another key) would write: a self-consistent entry."""
    entry = dict(entry)
    entry["hash"] = entry_hash(entry)
    entry["signature"] = base64.b64encode(key.sign(entry["hash"].encode())).decode()
    return entry


def as_line(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"


# --------------------------------------------------------------------------- happy path


def test_appends_chain_and_verify(log: AuditLog, key: PartyKey) -> None:
    entries = list(log.entries())
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    assert all(e.key_id == key.key_id and e.actor == "coordinator" for e in entries)
    assert log.head() == (6, entries[-1].hash)

    for source in (log.path, str(log.path), entries, log.entries()):
        result = verify(source, key.public_keys())
        assert result.ok, result.problem
        assert (result.entries, result.head, result.head_seq) == (6, entries[-1].hash, 6)
        assert result.first_bad_seq is None and result.problem == ""


def test_entry_hash_covers_exactly_the_chained_fields(log: AuditLog) -> None:
    entry = next(log.entries())
    fields = entry.model_dump()
    assert entry_hash(fields) == entry.hash
    assert entry_hash({k: fields[k] for k in reversed(list(fields))}) == entry.hash
    assert entry_hash({**fields, "signature": "x", "hash": "y", "key_id": "z"}) == entry.hash
    assert entry_hash({**fields, "details": {"version": 2}}) != entry.hash
    with pytest.raises(PolicyError, match="prev_hash"):
        entry_hash({k: v for k, v in fields.items() if k != "prev_hash"})


def test_returned_entry_equals_what_is_on_disk(tmp_path: Path, key: PartyKey) -> None:
    audit = AuditLog(tmp_path / "a.jsonl", key, "cleveland", "silo")
    entry = audit.append(
        "silo.enrolled", "cleveland", {"rows": 303, "ids": (1, 2)},
        actor="dr.x", role="lead", ts="2025-01-02T03:04:05+00:00",
    )
    assert entry.details == {"rows": 303, "ids": [1, 2]}
    assert list(audit.entries()) == [entry]
    assert entry.actor == "dr.x" and entry.role == "lead" and entry.ts == "2025-01-02T03:04:05+00:00"
    assert os.stat(audit.path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"role": "janitor"}, "role"),
        ({"action": "Round Approved"}, "action"),
        ({"details": {"x": float("nan")}}, "plain JSON"),
        ({"details": {"x": object()}}, "plain JSON"),
        ({"details": {"blob": "x" * 70_000}}, "counts and ids"),
        ({"ts": "2025-01-02T03:04:05+02:00"}, "UTC"),
        ({"ts": "yesterday"}, "ISO 8601"),
        ({"subject": 5}, "subject"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(
    tmp_path: Path, key: PartyKey, kwargs: dict, match: str
) -> None:
    audit = AuditLog(tmp_path / "a.jsonl", key, "coordinator", "coordinator")
    args = {"action": "round.approved", "subject": "round-1", "details": {}, **kwargs}
    with pytest.raises(PolicyError, match=match):
        audit.append(**args)
    assert not audit.path.exists()


# --------------------------------------------------------------------------- tampering


def test_edited_details_names_the_entry(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    entry = json.loads(content[2])
    entry["details"]["round"] = 2
    content[2] = as_line(entry)
    write_lines(log.path, content)

    result = verify(log.path, key.public_keys())
    assert not result.ok
    assert result.problem == "entry 3: hash does not match its content (edited?)"
    assert result.first_bad_seq == 3
    assert result.entries == 2 and result.head_seq == 2


def test_edit_with_recomputed_hash_needs_the_key(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    entry = json.loads(content[3])
    entry["details"]["reason"] = "none"
    entry["hash"] = entry_hash(entry)
    content[3] = as_line(entry)
    write_lines(log.path, content)

    result = verify(log.path, key.public_keys())
    assert result.problem == f"entry 4: signature invalid for key {key.key_id}"
    assert result.first_bad_seq == 4


def test_deleted_line_is_a_gap(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    del content[2]
    write_lines(log.path, content)

    result = verify(log.path, key.public_keys())
    assert result.problem == "entry 3: seq 4 follows seq 2 (gap)"
    assert result.first_bad_seq == 3 and result.entries == 2


def test_deleted_line_renumbered_by_key_holder_breaks_the_link(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    fourth = json.loads(content[3])
    fourth["seq"] = 3
    content[2:4] = [as_line(resign(fourth, key))]
    write_lines(log.path, content)

    result = verify(log.path, key.public_keys())
    assert result.problem == "entry 3: prev_hash does not match entry 2's hash (entry removed or reordered?)"
    assert result.first_bad_seq == 3


def test_reordered_lines_name_the_first_moved_entry(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    content[1], content[2] = content[2], content[1]
    write_lines(log.path, content)

    result = verify(log.path, key.public_keys())
    assert not result.ok
    assert result.problem.startswith("entry 2: seq 3 follows seq 1")
    assert result.first_bad_seq == 2


def test_duplicated_line_is_out_of_order(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    content.insert(3, content[2])
    write_lines(log.path, content)
    problem = verify(log.path, key.public_keys()).problem
    assert problem == "entry 4: seq 3 follows seq 3 (out of order or repeated)"


def test_signature_forged_with_another_key(log: AuditLog, key: PartyKey) -> None:
    forger = PartyKey.generate()
    content = lines(log.path)
    entry = json.loads(content[4])
    entry["details"]["replied"] = 4
    content[4] = as_line(resign(entry, forger))  # key_id still claims the real key
    write_lines(log.path, content)

    result = verify(log.path, key.public_keys())
    assert result.problem == f"entry 5: signature invalid for key {key.key_id}"
    assert result.first_bad_seq == 5


def test_unknown_signing_key(tmp_path: Path, log: AuditLog, key: PartyKey) -> None:
    assert verify(log.path, {}).problem == "entry 1: unknown signing key"

    rotated = PartyKey.load_or_create(tmp_path / "keys" / "coordinator-2.pem")
    rotated_log = AuditLog(log.path, rotated, "coordinator", "coordinator")
    rotated_log.append("model.released", "model-1", {"round": 1})
    result = verify(log.path, key.public_keys())
    assert result.problem == "entry 7: unknown signing key" and result.entries == 6
    assert verify(log.path, {**key.public_keys(), **rotated.public_keys()}).ok


def test_key_listed_under_the_wrong_id_is_refused(log: AuditLog, key: PartyKey) -> None:
    other = PartyKey.generate()
    result = verify(log.path, {key.key_id: other.public_bytes()})
    assert not result.ok and "keys and ids mixed up" in result.problem
    assert verify(log.path, {key.key_id: base64.b64encode(key.public_bytes()).decode()}).ok


def test_garbage_line_is_named(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    content[1] = "{not json\n"
    write_lines(log.path, content)
    result = verify(log.path, key.public_keys())
    assert result.problem.startswith("entry 2: not valid JSON") and result.first_bad_seq == 2
    with pytest.raises(PolicyError, match="line 2: not valid JSON"):
        list(log.entries())


def test_duplicate_json_keys_are_refused(log: AuditLog, key: PartyKey) -> None:
    content = lines(log.path)
    content[0] = content[0].replace('{"action"', '{"actor":"mallory","action"', 1)
    write_lines(log.path, content)
    assert "duplicate key 'actor'" in verify(log.path, key.public_keys()).problem


def signed_lines(key: PartyKey, count: int) -> list[str]:
    """A long, valid log written in memory (no fsync per entry), as the benchmark builds it."""
    prev, out = GENESIS_HASH, []
    for seq in range(1, count + 1):
        entry = resign({"seq": seq, "ts": "2026-11-23T00:00:00.000000Z", "actor": "coordinator",
                        "role": "coordinator", "action": "round.finished", "subject": f"round-{seq}",
                        "details": {"replied": 4}, "prev_hash": prev, "key_id": key.key_id}, key)
        out.append(as_line(entry))
        prev = entry["hash"]
    return out


def forged_signature(line: str, key: PartyKey) -> str:
    """The same entry signed over another hash: content, hash and links stay intact."""
    entry = json.loads(line)
    entry["signature"] = base64.b64encode(key.sign(b"0" * 64)).decode()
    return as_line(entry)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("bad", [1, 2047, 2048, 2049, 4500])
def test_bad_signature_anywhere_in_a_long_log_is_named(
    tmp_path: Path, key: PartyKey, bad: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Signatures are checked in batches on threads (inline on one CPU): the batch edges must
    not hide or misplace one."""
    monkeypatch.setattr("policies.audit._verify_threads", lambda: threads)
    content = signed_lines(key, 5000)
    content[bad - 1] = forged_signature(content[bad - 1], key)
    path = tmp_path / "long.jsonl"
    write_lines(path, content)
    result = verify(path, key.public_keys())
    assert result.problem == f"entry {bad}: signature invalid for key {key.key_id}"
    assert (result.first_bad_seq, result.entries, result.head_seq) == (bad, bad - 1, bad - 1)
    assert result.head == (json.loads(content[bad - 2])["hash"] if bad > 1 else GENESIS_HASH)


def test_the_earlier_of_a_bad_signature_and_a_broken_link_is_reported(tmp_path: Path, key: PartyKey) -> None:
    content = signed_lines(key, 5000)
    content[3000] = forged_signature(content[3000], key)  # entry 3001
    del content[4000]  # entry 4001: a gap, found by the in-order walk long after 3001 was queued
    path = tmp_path / "long.jsonl"
    write_lines(path, content)
    assert verify(path, key.public_keys()).first_bad_seq == 3001
    content[3000] = signed_lines(key, 5000)[3000]  # repair the signature: now the gap is first
    write_lines(path, content)
    assert verify(path, key.public_keys()).problem == "entry 4001: seq 4002 follows seq 4000 (gap)"


# --------------------------------------------------------------------------- torn writes


def test_truncated_last_line_is_refused_clearly(log: AuditLog, key: PartyKey) -> None:
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-25])
    torn = log.path.read_bytes()

    fresh = AuditLog(log.path, key, "coordinator", "coordinator")
    attempts = (lambda: list(fresh.entries()), fresh.head, lambda: fresh.append("user.login", "alice", {}))
    for action in attempts:
        with pytest.raises(PolicyError, match=r"line 6 is incomplete .*nothing was truncated"):
            action()
    assert log.path.read_bytes() == torn

    result = verify(log.path, key.public_keys())
    assert result.problem == "entry 6: incomplete last line (write cut off?)"
    assert result.entries == 5
    with pytest.raises(PolicyError, match="line 6 is incomplete"):
        export_bundle(log.path, log.path.parent / "export", key.public_keys())


def test_write_error_leaves_file_intact(
    log: AuditLog, key: PartyKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = log.path.read_bytes()

    def no_space(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", no_space)
        with pytest.raises(PolicyError, match="No space left on device.*left as it was"):
            log.append("round.approved", "round-2", {"round": 2})
    assert log.path.read_bytes() == before

    entry = log.append("round.approved", "round-2", {"round": 2})
    assert entry.seq == 7
    assert verify(log.path, key.public_keys()).ok


def test_short_write_and_fsync_failure_are_rolled_back(
    log: AuditLog, key: PartyKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = log.path.read_bytes()
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[: len(data) // 2])

    def fsync_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    for name, fake in (("write", half_write), ("fsync", fsync_fails)):
        with monkeypatch.context() as m:
            m.setattr(os, name, fake)
            with pytest.raises(PolicyError, match="nothing was recorded"):
                log.append("round.approved", "round-2", {"round": 2})
        assert log.path.read_bytes() == before, name

    assert log.append("round.approved", "round-2", {}).seq == 7
    assert verify(log.path, key.public_keys()).ok


# --------------------------------------------------------------------------- keys


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "silo.pem"
    key = PartyKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["silo.pem"]  # no temp file left

    again = PartyKey.load_or_create(path)
    assert again.key_id == key.key_id and again.public_bytes() == key.public_bytes()
    assert len(key.key_id) == 16 and len(key.public_bytes()) == 32
    assert PartyKey.generate().key_id != key.key_id


def test_key_readable_by_others_or_not_ed25519_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "silo.pem"
    PartyKey.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(PolicyError, match="chmod 600"):
        PartyKey.load_or_create(path)
    os.chmod(path, 0o600)
    path.write_text("not a key")
    with pytest.raises(PolicyError, match="not an unencrypted PEM"):
        PartyKey.load_or_create(path)


# --------------------------------------------------------------------------- concurrency


def test_two_writers_on_one_file_continue_the_chain(tmp_path: Path, key: PartyKey) -> None:
    path = tmp_path / "coordinator.jsonl"
    first = AuditLog(path, key, "coordinator", "coordinator")
    second = AuditLog(path, key, "coordinator", "coordinator")
    seqs = [
        first.append("user.login", "alice", {}).seq,
        second.append("user.login", "bob", {}).seq,
        first.append("round.approved", "round-1", {"round": 1}).seq,
        second.append("round.finished", "round-1", {"round": 1}).seq,
    ]
    assert seqs == [1, 2, 3, 4]
    assert first.head() == second.head()
    assert verify(path, key.public_keys()).ok


def _append_many(path: str, key_path: str, who: str, count: int) -> None:
    audit = AuditLog(path, PartyKey.load_or_create(key_path), "coordinator", "coordinator")
    for i in range(count):
        audit.append("user.login", who, {"i": i})


def test_two_processes_do_not_interleave(tmp_path: Path, key: PartyKey) -> None:
    path, key_path = tmp_path / "coordinator.jsonl", tmp_path / "keys" / "coordinator.pem"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), str(key_path), who, 25)) for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    result = verify(path, key.public_keys())
    assert result.ok, result.problem
    assert result.entries == 50 and result.head_seq == 50


# --------------------------------------------------------------------------- witnessing


def test_witnessed_heads_catch_a_rewritten_history(tmp_path: Path, log: AuditLog, key: PartyKey) -> None:
    silo_key = PartyKey.load_or_create(tmp_path / "keys" / "cleveland.pem")
    silo = AuditLog(tmp_path / "cleveland.jsonl", silo_key, "cleveland", "silo")
    silo.append("silo.enrolled", "heart-disease", {"rows": 303})

    seq, head = log.head()
    silo.witness("coordinator", seq, head)
    witnessed = list(silo.entries())[-1]
    assert witnessed.details == witness_details("coordinator", seq, head) == {
        "party": "coordinator", "seq": seq, "head": head
    }
    assert check_witnesses(silo.entries(), "coordinator", log.entries()) == []

    # the coordinator rewrites its own history with its own key: its chain verifies alone ...
    rewritten = tmp_path / "rewritten.jsonl"
    forged = AuditLog(rewritten, key, "coordinator", "coordinator")
    for action, subject, details in ACTIONS:
        forged.append(action, subject, {**details, "rewritten": True})
    assert verify(rewritten, key.public_keys()).ok
    # ... but not against what the silo saw
    problems = check_witnesses(silo.entries(), "coordinator", forged.entries(), witness_party="silo:cleveland")
    assert problems == [
        f"silo:cleveland entry 2 witnessed coordinator at seq 6 with hash {head[:16]}..., but coordinator's "
        f"entry 6 has hash {forged.head()[1][:16]}... (rewritten?)"
    ]
    assert check_witnesses(silo.entries(), "coordinator", list(log.entries())[:3]) == [
        "witness entry 2 witnessed coordinator at seq 6, but coordinator's log ends at seq 3 (truncated or rolled back?)"
    ]

    with pytest.raises(PolicyError, match="64-character"):
        witness_details("coordinator", 1, "abc")


# --------------------------------------------------------------------------- export


def test_export_bundle_and_verify(tmp_path: Path, log: AuditLog, key: PartyKey) -> None:
    out = tmp_path / "export"
    bundle = export_bundle(log.path, out, key.public_keys(), party="coordinator")
    assert bundle == out / "audit-export-coordinator-6.zip"
    with zipfile.ZipFile(bundle) as zf:
        assert sorted(zf.namelist()) == ["audit.csv", "audit.jsonl", "audit.parquet", "manifest.json"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["party"] == "coordinator"
    assert manifest["head_seq"] == 6 and manifest["head_hash"] == log.head()[1]
    assert manifest["entries"] == 6 and manifest["actions"]["round.finished"] == 1
    assert manifest["public_keys"] == [
        {"key_id": key.key_id, "public_key": base64.b64encode(key.public_bytes()).decode()}
    ]
    assert manifest["chain_ok"] is True
    assert (out / "audit.jsonl").read_bytes() == log.path.read_bytes()

    import pandas as pd

    frame = pd.read_parquet(out / "audit.parquet")
    assert list(frame["seq"]) == [1, 2, 3, 4, 5, 6]
    assert json.loads(frame["details"][1]) == {"rows": 303}
    assert list(pd.read_csv(out / "audit.csv")["hash"]) == [e.hash for e in log.entries()]

    for target in (bundle, out):
        result = verify_bundle(target)
        assert result.ok, result.problem
        assert result.entries == 6 and result.head == log.head()[1]
    assert verify_bundle(bundle, trusted_keys=PartyKey.generate().public_keys()).problem == (
        "entry 1: unknown signing key"
    )


def test_flat_rows_keep_the_column_order(log: AuditLog) -> None:
    """CSV and Parquet copies are built from flat() in COLUMNS order."""
    for entry in log.entries():
        assert tuple(entry.flat()) == COLUMNS
        assert json.loads(entry.flat()["details"]) == entry.details


def test_log_export_records_itself(tmp_path: Path, log: AuditLog, key: PartyKey) -> None:
    bundle = log.export(tmp_path / "export", actor="auditor.ann")
    last = list(log.entries())[-1]
    assert (last.action, last.subject, last.actor) == ("audit.exported", bundle.name, "auditor.ann")
    assert last.seq == 7
    assert last.details["head_seq"] == 6 and len(last.details["bundle_sha256"]) == 64
    assert verify_bundle(bundle).ok


def _rewrite_zip(bundle: Path, name: str, edit) -> None:
    with zipfile.ZipFile(bundle) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[name] = edit(members[name])
    with zipfile.ZipFile(bundle, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)


def test_tampered_csv_in_bundle_is_reported(tmp_path: Path, log: AuditLog, key: PartyKey) -> None:
    bundle = export_bundle(log.path, tmp_path / "export", key.public_keys(), party="coordinator")
    _rewrite_zip(bundle, "audit.csv", lambda b: b.replace(b"too_few_rows", b"site_offline"))

    result = verify_bundle(bundle)
    assert not result.ok
    assert "audit.csv: sha256 does not match the manifest (file changed after export?)" in result.problem
    assert "audit.csv: row 4 differs from audit.jsonl" in result.problem
    assert result.entries == 6  # the signed JSONL itself is intact

    # same edit with the manifest hash "fixed": the copy still disagrees with the signed log
    def fix_manifest(raw: bytes) -> bytes:
        manifest = json.loads(raw)
        with zipfile.ZipFile(bundle) as zf:
            manifest["files"]["audit.csv"] = hashlib.sha256(zf.read("audit.csv")).hexdigest()
        return json.dumps(manifest).encode()

    _rewrite_zip(bundle, "manifest.json", fix_manifest)
    assert verify_bundle(bundle).problem == "audit.csv: row 4 differs from audit.jsonl"


def test_tampered_files_in_export_dir_are_reported(tmp_path: Path, log: AuditLog, key: PartyKey) -> None:
    out = tmp_path / "export"
    export_bundle(log.path, out, key.public_keys())
    (out / "audit.parquet").write_bytes((out / "audit.parquet").read_bytes()[:-10])
    content = lines(out / "audit.jsonl")
    entry = json.loads(content[1])
    entry["details"]["rows"] = 999
    content[1] = as_line(entry)
    write_lines(out / "audit.jsonl", content)

    problem = verify_bundle(out).problem
    assert "audit.jsonl: sha256 does not match the manifest" in problem
    assert "audit.parquet: sha256 does not match the manifest" in problem
    assert "entry 2: hash does not match its content (edited?)" in problem

    (out / "manifest.json").unlink()
    assert verify_bundle(out).problem == "manifest.json: missing from the bundle"


def test_empty_log_exports_and_verifies(tmp_path: Path, key: PartyKey) -> None:
    path = tmp_path / "silo.jsonl"
    path.touch()
    assert AuditLog(path, key, "silo", "silo").head() == (0, GENESIS_HASH)
    assert verify(path, key.public_keys()).ok
    bundle = export_bundle(path, tmp_path / "export", key.public_keys())
    assert bundle.name == "audit-export-silo-0.zip"
    assert verify_bundle(bundle).ok


def test_policies_audit_imports_no_runtime_packages() -> None:
    code = (
        "import sys, policies.audit; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'flwr', 'silo_node', 'coordinator'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_audit_entry_is_frozen(log: AuditLog) -> None:
    entry = next(log.entries())
    with pytest.raises(Exception):
        entry.seq = 5  # type: ignore[misc]
    assert isinstance(entry, AuditEntry)
