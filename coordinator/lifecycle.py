"""A study version's life: draft -> open -> running -> completed | stopped, nothing else.

Why a fixed table: silos enrol against one policy hash, so the policy may change only
while nobody has seen it (draft); a changed policy after that is a new version with a
new hash. A study that ended (completed or stopped) stays ended, so the audit trail can
say exactly which policy the released model was trained under.

`check_transition` is pure (no database) so the rules are easy to read and to test;
`transition` asks the store to apply it inside one transaction, where the store knows
the current status and how many silos validated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal, get_args

from policies.errors import PolicyError

if TYPE_CHECKING:  # the store imports this module; only the type flows back
    from coordinator.store import Store

StudyStatus = Literal["draft", "open", "running", "completed", "stopped"]
STATUSES: tuple[StudyStatus, ...] = get_args(StudyStatus)
FINAL: frozenset[StudyStatus] = frozenset({"completed", "stopped"})
ACTIVE: frozenset[StudyStatus] = frozenset({"open", "running"})

TRANSITIONS: Mapping[StudyStatus, frozenset[StudyStatus]] = {
    "draft": frozenset({"open", "stopped"}),
    "open": frozenset({"running", "stopped"}),
    "running": frozenset({"completed", "stopped"}),
    "completed": frozenset(),
    "stopped": frozenset(),
}

# "study X v1 is completed; it cannot be <verb>"
_ENDED_VERB: Mapping[StudyStatus, str] = {
    "draft": "turned back into a draft",
    "open": "reopened",
    "running": "run again",
    "completed": "completed again",
    "stopped": "stopped again",
}

# Why a legal-looking move is refused, for the moves people are likely to try.
_HINTS: Mapping[tuple[StudyStatus, StudyStatus], str] = {
    ("draft", "running"): "open it for enrolment first, so silos can validate against its policy",
    ("draft", "completed"): "it never ran",
    ("open", "draft"): "its policy is fixed once open; publish a changed policy as a new version",
    ("open", "completed"): "it never ran; stop it instead",
    ("running", "draft"): "its policy is fixed once open; publish a changed policy as a new version",
    ("running", "open"): "a running study cannot go back to enrolment; stop it and open a new version",
}


@dataclass(frozen=True)
class StatusChange:
    """What one transition did, for the caller to write to the audit log."""

    study_id: str
    version: int
    from_status: StudyStatus
    to_status: StudyStatus
    user: str
    reason: str
    at: datetime


def check_transition(
    label: str,
    current: StudyStatus,
    to: str,
    *,
    min_silos: int,
    validated_silos: int,
    other_active_versions: Sequence[int] = (),
    reason: str = "",
) -> StudyStatus:
    """Return `to` as a StudyStatus if `label` may move from `current` to it; else PolicyError.

    `other_active_versions`: other versions of the same study that are open or running;
    only one version of a study may take enrolments or run at a time, so silos and the
    ServerApp never have to guess which policy is meant.
    """
    if to not in STATUSES:
        raise PolicyError(f"'{to}' is not a study status; use one of: {', '.join(STATUSES)}")
    target: StudyStatus = to  # type: ignore[assignment]  # checked just above
    if current in FINAL:
        raise PolicyError(f"study {label} is {current}; it cannot be {_ENDED_VERB[target]}")
    if target == current:
        raise PolicyError(f"study {label} is already {current}")
    if target not in TRANSITIONS[current]:
        hint = _HINTS.get((current, target), f"allowed from {current}: {', '.join(sorted(TRANSITIONS[current]))}")
        raise PolicyError(f"study {label} is {current}; it cannot go to {target}: {hint}")
    if target == "stopped" and not reason.strip():
        raise PolicyError(f"study {label}: say why it is stopped (the reason goes to the audit trail)")
    if target == "open" and other_active_versions:
        others = ", ".join(f"v{v}" for v in other_active_versions)
        raise PolicyError(f"study {label} cannot open while {others} of the same study is open or running; stop it first")
    if target == "running" and validated_silos < min_silos:
        raise PolicyError(
            f"study {label} needs at least {min_silos} silos with a validated enrolment before it can run; "
            f"{validated_silos} so far"
        )
    return target


def check_editable(label: str, status: StudyStatus) -> None:
    """A policy may change in place only as a draft: once open, silos have validated against its hash."""
    if status != "draft":
        raise PolicyError(
            f"study {label} is {status}; its policy can no longer change in place: "
            "publish the changed policy as a new version (it gets a new hash)"
        )


def transition(store: Store, study_id: str, to: str, user: str, reason: str = "", *,
               version: int | None = None) -> StatusChange:
    """Move a study version (default: its latest) to `to`, checked and applied in one transaction."""
    return store.set_status(study_id, to, user, reason, version=version)
