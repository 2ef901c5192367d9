"""Every write the UI makes, each re-checking the user's role in the store and audited.

Why here and not in the pages: a Streamlit button's `disabled` flag lives in the browser, and
a crafted websocket message can "click" it anyway. So each handler takes only the signed-in
user's name, reads that user's role from the store at the moment of the write, refuses (and
logs `access.denied`) if the role may not do it, and otherwise writes the store and the
coordinator's audit log. Pages call these; tests call them directly to force a click.

Audit details hold counts, ids and hashes only: a lead's free-text note stays in the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coordinator import users
from coordinator.lifecycle import StatusChange, transition
from coordinator.store import ApprovalRow, ModelReleaseRow, Store, StudyRow, UserRow
from policies.audit import AuditLog, VerifyResult, describe, export_bundle, verify
from policies.errors import PolicyError
from policies.study import load_study_text
from policies.yamlsafe import load_yaml_text
from ui.data import PartyLog, party_public_keys

WRITERS = frozenset({"lead", "admin"})  # may create, change and decide
READERS = frozenset({"lead", "auditor", "admin"})  # may read, verify and export the audit trail
ADMINS = frozenset({"admin"})
DECISION_ACTIONS = {"approve": "round.approved", "hold": "round.held", "reject": "round.rejected"}


class AccessDenied(PolicyError):
    """The signed-in user's role (as the store says now) may not do this; already audited."""


def coordinator_log(state: Path) -> AuditLog:
    return users.coordinator_log(state)


def _audit(state: Path, store: Store, action: str, subject: str, details: dict[str, Any], user: UserRow) -> None:
    coordinator_log(state).append(action, subject, details, actor=user.name, role=user.role)
    mirror_audit(store, state)


def mirror_audit(store: Store, state: Path) -> int:
    """Copy new coordinator log entries into the store's mirror (best effort; returns how many).

    The mirror lets a UI on another host show the trail; the signed file stays the original,
    so a mirror that disagrees with it is left alone and the Audit page reports the gap.
    """
    head = store.audit_head("coordinator")
    after = head.seq if head else 0
    copied = 0
    try:
        for entry in coordinator_log(state).entries():
            if entry.seq > after:
                store.append_audit_mirror(entry.model_dump(mode="json"), party="coordinator")
                copied += 1
    except PolicyError:
        pass
    return copied


def authorize(store: Store, state: Path, user: str, roles: Collection[str], action: str, subject: str) -> UserRow:
    """The user's current store row if their role is in `roles`; else log the refusal and raise."""
    row = store.get_user(user) if user else None
    if row is not None and row.role in roles and not row.is_locked():
        return row
    role = row.role if row is not None else "system"
    coordinator_log(state).append("access.denied", subject, {"action": action, "needs": sorted(roles)},
                                  actor=user or "anonymous", role=role)
    mirror_audit(store, state)
    needs = " or ".join(sorted(roles))
    raise AccessDenied(f"refused: {action} needs the role {needs}; {user or 'nobody'} is {row.role if row else 'not a user'}")


# ----------------------------------------------------------------------------- studies


def create_study(store: Store, state: Path, user: str, policy_yaml: str, *, study_id: str = "",
                 name: str = "") -> StudyRow:
    """Register a study (draft) from a template or an uploaded policy; id and name may be overridden."""
    who = authorize(store, state, user, WRITERS, "study.create", study_id or "new study")
    if study_id.strip() or name.strip():
        data = load_yaml_text(policy_yaml, "study policy")  # refuses aliases, like every policy read
        if isinstance(data, dict):
            data.update({k: v for k, v in (("id", study_id.strip()), ("name", name.strip())) if v})
            policy_yaml = yaml.safe_dump(data, sort_keys=False)
    check_name(load_study_text(policy_yaml, "study policy").name)
    row = store.create_study(policy_yaml, who.name)
    _audit(state, store, "study.created", row.label,
           {"version": row.version, "policy_hash": row.policy_hash}, who)
    return row


def check_name(name: str) -> None:
    """A study needs a name people can recognise it by (the policy format alone allows "")."""
    if not name.strip():
        raise PolicyError("name: a study needs a name; it is empty")


@dataclass(frozen=True)
class StudySettings:
    """The settings a lead may change from the form; everything else stays as in the policy."""

    name: str
    rounds: int
    strategy: str
    approval_mode: str
    auto_rounds: int
    min_silos: int
    small_cell_min: int
    dp: bool
    epsilon: float
    delta: float


def settings_problems(settings: StudySettings) -> list[str]:
    """What is wrong with the form's values, one message per field (empty: all fine).

    Checked before anything is written, so the form can show every problem at once in the
    field's own words; the policy schema checks the result again when it is stored.
    """
    problems = []
    if not settings.name.strip():
        problems.append("Name: a study needs a name; it is empty.")
    if settings.dp and not settings.epsilon > 0:
        problems.append(f"Epsilon per silo: must be greater than 0 (got {settings.epsilon:g}); "
                        "epsilon 0 would allow no training at all, and a negative budget means nothing.")
    if settings.dp and not 0 < settings.delta < 1:
        problems.append(f"Delta: must be between 0 and 1, exclusive (got {settings.delta:g}).")
    return problems  # the other fields are bounded by their widgets and checked by the policy schema


def apply_settings(policy_yaml: str, settings: StudySettings, version: int) -> str:
    """The policy with the form's settings applied, as YAML for the given version."""
    data = load_study_text(policy_yaml).model_dump(mode="json")
    data["version"] = version
    data["name"] = settings.name.strip()
    data["training"].update(rounds=settings.rounds, strategy=settings.strategy)
    data["approval"] = {"mode": settings.approval_mode, "auto_rounds": settings.auto_rounds}
    data.update(min_silos=settings.min_silos, small_cell_min=settings.small_cell_min)
    if settings.dp:
        privacy = data["privacy"] if isinstance(data["privacy"], dict) else {}
        data["privacy"] = {**privacy, "epsilon": settings.epsilon, "delta": settings.delta}
    else:
        data["privacy"] = "none"
    return yaml.safe_dump(data, sort_keys=False)


def change_settings(store: Store, state: Path, user: str, study_id: str, version: int,
                    settings: StudySettings) -> StudyRow:
    """A draft changes in place (new hash); once open, the change is published as the next version."""
    who = authorize(store, state, user, WRITERS, "study.change", f"{study_id} v{version}")
    problems = settings_problems(settings)
    if problems:
        raise PolicyError(" ".join(problems))
    current = store.get_study(study_id, version)
    if current.status == "draft":
        row = store.edit_draft(study_id, apply_settings(current.policy_yaml, settings, version), who.name,
                               version=version)
        action = "study.changed"
    else:
        latest = store.get_study(study_id)
        row = store.new_version(study_id, apply_settings(current.policy_yaml, settings, latest.version + 1), who.name)
        action = "study.version_published"
    _audit(state, store, action, row.label,
           {"version": row.version, "policy_hash": row.policy_hash, "previous_hash": current.policy_hash}, who)
    return row


def change_status(store: Store, state: Path, user: str, study_id: str, version: int, to: str,
                  reason: str = "") -> StatusChange:
    """A lifecycle move (open for enrolment, start, complete, stop), checked by the lifecycle rules."""
    who = authorize(store, state, user, WRITERS, f"study.{to}", f"{study_id} v{version}")
    change = transition(store, study_id, to, who.name, reason, version=version)
    row = store.get_study(study_id, version)
    _audit(state, store, "study.status_changed", row.label,
           {"from": change.from_status, "to": change.to_status, "policy_hash": row.policy_hash,
            "reason": reason.strip()[:500]}, who)  # lifecycle: the stop reason goes to the audit trail
    return change


# ----------------------------------------------------------------------------- rounds


def decide_round(store: Store, state: Path, user: str, study_id: str, version: int, round_no: int,
                 decision: str, note: str = "") -> ApprovalRow:
    """Approve, hold or reject one round; the approval is bound to the study's policy hash."""
    if decision not in DECISION_ACTIONS:
        raise PolicyError(f"'{decision}' is not a decision; use approve, hold or reject")
    who = authorize(store, state, user, WRITERS, f"round.{decision}", f"{study_id} v{version}/round-{round_no}")
    row = store.record_approval(study_id, round_no, decision, who.name, note, version=version)
    _audit(state, store, DECISION_ACTIONS[decision], f"{study_id} v{version}/round-{round_no}",
           {"round": round_no, "policy_hash": row.policy_hash, "approval_id": row.id, "note_chars": len(note)}, who)
    return row


# ----------------------------------------------------------------------------- audit


def verify_log(store: Store, state: Path, user: str, log: PartyLog) -> tuple[VerifyResult, str]:
    """Run the same check as `audit verify` on a party's log, with that party's own public key."""
    authorize(store, state, user, READERS, "audit.verify", log.party)
    keys = party_public_keys(log)
    result = verify(log.path, keys)
    return result, describe(result, f"{log.party} ({log.path.name})")


def export_log(store: Store, state: Path, user: str, log: PartyLog) -> tuple[str, bytes]:
    """Export a party's log as a bundle (JSONL, CSV, Parquet, manifest, zip) and log the export.

    The export is recorded in the coordinator's log, never appended to a silo's own log.
    """
    who = authorize(store, state, user, READERS, "audit.export", log.party)
    out = state / "exports" / log.party
    bundle = export_bundle(log.path, out, party_public_keys(log), party=log.party)
    data = bundle.read_bytes()
    _audit(state, store, "audit.exported", bundle.name,
           {"party": log.party, "bundle_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, who)
    return bundle.name, data


# ----------------------------------------------------------------------------- users


def add_user(store: Store, state: Path, user: str, name: str, role: str, password: str) -> UserRow:
    who = authorize(store, state, user, ADMINS, "user.add", name)
    row = users.add_user(store, name, role, password, by=who.name, audit_log=coordinator_log(state))
    mirror_audit(store, state)
    return row


def unlock_user(store: Store, state: Path, user: str, name: str) -> UserRow:
    who = authorize(store, state, user, ADMINS, "user.unlock", name)
    row = users.unlock(store, who.name, name, audit_log=coordinator_log(state))
    mirror_audit(store, state)
    return row


def reset_password(store: Store, state: Path, user: str, name: str, password: str) -> UserRow:
    who = authorize(store, state, user, ADMINS, "user.reset_password", name)
    row = users.reset_password(store, who.name, name, password, audit_log=coordinator_log(state))
    mirror_audit(store, state)
    return row


# ----------------------------------------------------------------------------- model release

RELEASERS = frozenset({"lead"})  # only a study lead asks the silos for the model


def request_release(store: Store, state: Path, user: str, study_id: str, version: int) -> ModelReleaseRow:
    """The lead's release request; a running study's is delivered when its run ends, a completed
    one's by `coordinator study release` (coordinator/release.py says why)."""
    from coordinator.release import request_release as record_request

    who = authorize(store, state, user, RELEASERS, "release.request", f"{study_id} v{version}")
    row = record_request(store, coordinator_log(state), study_id, who.name, version=version, allow_running=True,
                         role=who.role)
    mirror_audit(store, state)
    return row
