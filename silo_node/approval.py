"""What silo IT approved: the exact study (policy hash) and the peers it trusts.

The coordinator relays enrolment public keys, so it could substitute its own. Silo IT
pins the other hospitals' enrolment fingerprints, compared out of band (e.g. by phone):
the key-holding silo seals the study key to pinned keys only, and every other silo opens
a sealed key only when the pinned key of the holder the policy names sealed it. A pin may
carry the peer's name (`cleveland=ab12...`), which is how a silo knows the holder's key.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from policies.errors import PolicyError
from policies.study import StudySpec
from silo_node.ledger import write_durably

APPROVALS_DIR = "approvals"
RELEASE_MODES = ("manual", "auto")


@dataclass(frozen=True)
class Approval:
    study_id: str
    policy_hash: str
    pins: tuple[str, ...]  # enrolment fingerprints of peers; empty = trust on first use (demo only)
    approved_by: str
    approved_at: str
    named: tuple[tuple[str, str], ...] = ()  # (peer name, fingerprint) for pins given as NAME=FINGERPRINT
    release: str = "manual"  # model release consent: "auto" or "manual" (`silo-node release approve`)

    def pin_for(self, peer: str) -> str | None:
        return dict(self.named).get(peer)


def _path(state_dir: Path, study_id: str) -> Path:
    return Path(state_dir) / APPROVALS_DIR / f"{study_id}.json"


def normalise_fingerprint(fp: str) -> str:
    return fp.replace(":", "").replace(" ", "").lower()


def parse_pin(text: str) -> tuple[str | None, str]:
    """`FINGERPRINT` or `NAME=FINGERPRINT` -> (name or None, normalised fingerprint)."""
    name, sep, fp = text.rpartition("=")
    fp = normalise_fingerprint(fp)
    if not re.fullmatch(r"[0-9a-f]+", fp) or (sep and not name.strip()):
        raise PolicyError(f"pin {text!r} is not FINGERPRINT or NAME=FINGERPRINT (hex, spaces and colons allowed)")
    return (name.strip() if sep else None), fp


def parse_pins(pins: list[str]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """All pinned fingerprints, and (name, fingerprint) for the named ones; PolicyError on a
    malformed pin or a name pinned twice, before anything is recorded."""
    parsed = [parse_pin(p) for p in pins]
    named: dict[str, str] = {}
    for name, fp in parsed:
        if name is not None and named.setdefault(name, fp) != fp:
            raise PolicyError(f"peer {name!r} is pinned to two different fingerprints; pin each peer once")
    return tuple(sorted({fp for _, fp in parsed})), tuple(sorted(named.items()))


def approve(state_dir: Path, study: StudySpec, pins: list[str], by: str, release: str = "manual") -> Approval:
    """Record durably that this silo takes part in exactly this policy, trusting these peers,
    and whether it consents to releasing the final model automatically or only when silo IT says so."""
    fingerprints, named = parse_pins(pins)
    if release not in RELEASE_MODES:
        raise PolicyError(f"--release {release!r}: use one of {', '.join(RELEASE_MODES)}")
    approval = Approval(study.id, study.policy_hash(), fingerprints,
                        by, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), named, release)
    path = _path(state_dir, study.id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, approval.__dict__ | {"pins": list(approval.pins), "named": dict(approval.named)})
    return approval


def load_approval(state_dir: Path, study: StudySpec) -> Approval | None:
    return load_approval_by_id(state_dir, study.id)


def load_approval_by_id(state_dir: Path, study_id: str) -> Approval | None:
    """The approval recorded for a study id (silo IT's commands name the study by id)."""
    path = _path(state_dir, study_id)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return Approval(data["study_id"], data["policy_hash"], tuple(data["pins"]), data["approved_by"], data["approved_at"],
                    tuple(sorted(data.get("named", {}).items())), data.get("release", "manual"))


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


def key_holder_pins(approval: Approval | None, study: StudySpec) -> tuple[str, ...] | None:
    """Fingerprints a sealed study key must come from; None = trust on first use (no pins).

    When the policy names the key holder, only that peer's pin counts, so neither the
    coordinator nor another pinned hospital can hand this silo a key of its own making.
    A silo that pinned peers but not the named holder refuses rather than guess.
    """
    if approval is None or not approval.pins:
        return None
    holder = study.ckks.key_holder
    if holder is None:
        return approval.pins
    pin = approval.pin_for(holder)
    if pin is None:
        raise PolicyError(f"the policy names '{holder}' as key holder but this silo pinned no fingerprint for it: "
                          f"re-approve with --pin {holder}=FINGERPRINT (compared with {holder} out of band)")
    return (pin,)
