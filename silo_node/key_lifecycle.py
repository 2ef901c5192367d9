"""The end of a study's key material at a silo: destroy, withdraw, and the refusals after.

A study's CKKS secret keys (one per key epoch: the first ceremony is epoch 0, each re-key
after a revocation adds one) live in `STATE/keys/study-ID*.ckks-secret`. They are
destroyed when the study is stopped (the closing exchange says so), after the model
release is answered (the release flow calls `destroy_study_secret`), when silo IT runs
`silo-node keys destroy STUDY`, or when the silo withdraws. Destroying overwrites each
file with zeros, fsyncs and unlinks it (best effort: SSDs and copy-on-write filesystems
may keep old blocks), and records in the silo's audit log what was destroyed: file
names, sizes and sha256 of the contents before (never the key). A record in
`STATE/key_lifecycle/ID.json` makes every later request that needs the key, and every
request at all once withdrawn, a clear refusal rather than a "file not found".
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from policies.audit import open_party_log
from policies.durable import write_atomic
from policies.errors import PolicyError
from policies.messages import WITHDRAWN_PREFIX

LIFECYCLE_DIR = "key_lifecycle"
_HEX = re.compile(r"^[0-9a-f]{12,64}$")


@dataclass(frozen=True)
class Destruction:
    study_id: str
    files: list[dict]  # {"file", "bytes", "sha256_before"} per destroyed key file
    reason: str
    at: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _record_path(state_dir: Path, study_id: str) -> Path:
    return Path(state_dir) / LIFECYCLE_DIR / f"{study_id}.json"


def lifecycle_record(state_dir: Path, study_id: str) -> dict:
    """What happened to this study's keys and participation here ({} while it is live)."""
    path = _record_path(state_dir, study_id)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyError(f"{path}: unreadable key lifecycle record ({exc}); refusing until silo IT checks it") from None


def _write_record(state_dir: Path, study_id: str, record: dict) -> None:
    path = _record_path(state_dir, study_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=2, sort_keys=True).encode(), replace=True, mode=0o644)


def resolve_study(state_dir: Path, study: str) -> str:
    """A study id, given its id or its policy hash (a prefix of 12+ hex digits), from what
    this silo approved or holds keys for. PolicyError naming the candidates otherwise."""
    from silo_node.keys import study_ids_with_secrets

    state_dir = Path(state_dir)
    approvals = {}
    for path in sorted((state_dir / "approvals").glob("*.json")):
        try:
            approvals[path.stem] = str(json.loads(path.read_text()).get("policy_hash", ""))
        except (OSError, ValueError):
            continue
    known = set(approvals) | set(study_ids_with_secrets(state_dir))
    if study in known:
        return study
    wanted = study.lower()
    if _HEX.match(wanted):
        hits = sorted(sid for sid, h in approvals.items() if h.startswith(wanted))
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise PolicyError(f"policy hash prefix {study} matches studies {', '.join(hits)}: give more digits")
    raise PolicyError(f"{state_dir}: no study {study!r} approved or keyed at this silo "
                      f"(known: {', '.join(sorted(known)) or 'none'})")


def destroy_study_secret(state_dir: Path, study_hash: str, reason: str, *, party: str | None = None,
                         actor: str | None = None) -> Destruction:
    """Destroy every key epoch's secret of a study at this silo and record it (audit + record).

    `study_hash`: the study's policy hash (or a 12+ digit prefix) or its id. Idempotent:
    a second call destroys nothing more and says so in the log. The audit entry is
    written after the files are gone, so it never claims a destruction that did not happen;
    the record is written last and makes later key requests fail clearly.
    """
    from silo_node.keys import shred_file, study_secret_files

    if not reason.strip():
        raise PolicyError("destroying a study's keys needs a reason (it goes into the audit log)")
    state_dir = Path(state_dir).resolve()
    study_id = resolve_study(state_dir, study_hash)
    files = [f for p in study_secret_files(state_dir, study_id) if (f := shred_file(p)) is not None]
    at = _now()
    log = open_party_log(state_dir, party or state_dir.name, "silo")
    log.append("key.destroyed", study_id, {"files": files, "reason": reason[:500], "nothing_left": True},
               actor=actor)
    record = lifecycle_record(state_dir, study_id)
    record["destroyed"] = [*record.get("destroyed", []), {"at": at, "reason": reason[:500], "files": files}]
    _write_record(state_dir, study_id, record)
    return Destruction(study_id, files, reason, at)


def withdraw(state_dir: Path, study: str, reason: str = "", *, party: str | None = None,
             actor: str | None = None) -> Destruction:
    """Stop taking part in a study: record the withdrawal (from now on every request for it is
    refused with reason "withdrawn: ..."), then destroy its key material.

    The withdrawal is recorded first, so a crash in between leaves a silo that refuses
    everything and still has keys to destroy (run it again), never one that still answers.
    """
    state_dir = Path(state_dir).resolve()
    study_id = resolve_study(state_dir, study)
    record = lifecycle_record(state_dir, study_id)
    if "withdrawn" in record:
        raise PolicyError(f"this silo already withdrew from study {study_id} at {record['withdrawn']['at']}")
    why = reason.strip() or "silo IT withdrew this silo"
    record["withdrawn"] = {"at": _now(), "reason": why[:500]}
    _write_record(state_dir, study_id, record)
    open_party_log(state_dir, party or state_dir.name, "silo").append(
        "study.withdrawn", study_id, {"reason": why[:500]}, actor=actor)
    return destroy_study_secret(state_dir, study_id, f"withdrawn: {why}", party=party, actor=actor)


def refuse_if_withdrawn(state_dir: Path | None, study_id: str) -> None:
    """Every request of a study this silo withdrew from is refused, naming the withdrawal."""
    if state_dir is None:
        return
    withdrawn = lifecycle_record(state_dir, study_id).get("withdrawn")
    if withdrawn:
        raise PolicyError(f"{WITHDRAWN_PREFIX} this silo withdrew from study {study_id} at {withdrawn['at']} "
                          f"({withdrawn['reason']}); it takes no further part")


def refuse_if_destroyed(state_dir: Path | None, study_id: str) -> None:
    """A request needing a key destroyed here is refused, saying when and why it was destroyed."""
    if state_dir is None:
        return
    destroyed = lifecycle_record(state_dir, study_id).get("destroyed")
    if destroyed:
        last = destroyed[-1]
        raise PolicyError(f"study {study_id}: this silo destroyed its key material at {last['at']} "
                          f"({last['reason']}); requests that need the key are refused")
