"""What silo IT approved: the exact study (policy hash) and the peers it trusts.

The coordinator relays enrolment public keys, so it could substitute its own. Silo IT
pins the other hospitals' enrolment fingerprints, compared out of band (e.g. by phone),
and the key-holding silo seals the study key to pinned keys only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from policies.errors import PolicyError
from policies.study import StudySpec
from silo_node.ledger import write_durably

APPROVALS_DIR = "approvals"


@dataclass(frozen=True)
class Approval:
    study_id: str
    policy_hash: str
    pins: tuple[str, ...]  # enrolment fingerprints of peers; empty = trust on first use (demo only)
    approved_by: str
    approved_at: str


def _path(state_dir: Path, study_id: str) -> Path:
    return Path(state_dir) / APPROVALS_DIR / f"{study_id}.json"


def normalise_fingerprint(fp: str) -> str:
    return fp.replace(":", "").replace(" ", "").lower()


def approve(state_dir: Path, study: StudySpec, pins: list[str], by: str) -> Approval:
    """Record durably that this silo takes part in exactly this policy, trusting these peers."""
    approval = Approval(study.id, study.policy_hash(), tuple(sorted({normalise_fingerprint(p) for p in pins})),
                        by, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path = _path(state_dir, study.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, approval.__dict__ | {"pins": list(approval.pins)})
    return approval


def load_approval(state_dir: Path, study: StudySpec) -> Approval | None:
    path = _path(state_dir, study.id)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Approval(data["study_id"], data["policy_hash"], tuple(data["pins"]), data["approved_by"], data["approved_at"])


def require_approval(state_dir: Path, study: StudySpec) -> Approval:
    """The silo refuses any study policy silo IT has not approved, byte for byte (by hash)."""
    approval = load_approval(state_dir, study)
    if approval is None:
        raise PolicyError(f"study {study.id} (policy {study.policy_hash()[:12]}) is not approved at this silo; "
                          f"read it and run `silo-node approve --study ... --state-dir {state_dir}`")
    if approval.policy_hash != study.policy_hash():
        raise PolicyError(f"study {study.id}: this silo approved policy {approval.policy_hash[:12]}, not "
                          f"{study.policy_hash()[:12]}; a changed study must be approved again")
    return approval
