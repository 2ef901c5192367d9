"""Which layout of the state directory this fedcohort reads, checked before a silo starts.

A hospital runs its node for years and upgrades it in place. A newer fedcohort may change
how ledgers, approvals or keys are stored; an older one started on that state (a rollback
of the package, a restored image) must not guess: it could miss a charge and spend the
budget twice. So the state directory says which format it is in (`state_format.json`),
and the versioned files inside it say theirs (each privacy ledger and the ledger index
carry `"format"`). `silo-node start` refuses, before it reads or writes anything else, a
format this version does not know, and names the file, the format found and the ones it
knows. Files that carry no version of their own (approvals, the outbox, the audit log,
whose entries are fixed by their hash chain) are covered by the directory's format.
"""

from __future__ import annotations

import json
from pathlib import Path

from policies.durable import write_atomic
from policies.errors import PolicyError

STATE_FORMAT = 1  # raise when a change to any file under the state directory needs a migration
KNOWN_FORMATS = frozenset({1})
MARKER = "state_format.json"
LEDGER_FORMATS = frozenset({1})  # silo_node.ledger.FORMAT values this version reads


def _format_of(path: Path, key: str) -> object:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PolicyError(f"{path}: cannot read its state format ({exc}); not starting, nothing was changed") from None
    return data.get(key) if isinstance(data, dict) else None


def _refuse(path: Path, found: object, known: frozenset[int]) -> PolicyError:
    newer = isinstance(found, int) and not isinstance(found, bool) and found > max(known)
    why = ("it was written by a newer fedcohort: install that version again (or a later one), or restore this "
           "state directory from a backup made by this version" if newer else
           "this is not a format any fedcohort wrote: the file was edited or damaged; restore it from a backup")
    return PolicyError(f"{path}: state format {found!r}, but this fedcohort reads format "
                       f"{', '.join(map(str, sorted(known)))} only; {why}. Not starting; nothing was changed")


def check_state_format(state_dir: Path) -> int:
    """Raise PolicyError naming the file if any versioned state is in a format not known here.

    A state directory without the marker (new, or made before the marker existed) is
    format 1; `mark_state_format` records it once the check has passed.
    """
    state_dir = Path(state_dir)
    marker = state_dir / MARKER
    found: object = _format_of(marker, "state_format") if marker.exists() else 1
    if found not in KNOWN_FORMATS or isinstance(found, bool):
        raise _refuse(marker, found, KNOWN_FORMATS)
    ledger_dir = state_dir / "ledger"
    for path in sorted(ledger_dir.glob("*.json")) if ledger_dir.is_dir() else []:
        if path.name == "silo_ceiling.json":  # one number, no format of its own
            continue
        fmt = _format_of(path, "format")
        if fmt not in LEDGER_FORMATS or isinstance(fmt, bool):
            raise _refuse(path, fmt, LEDGER_FORMATS)
    return int(found)  # type: ignore[arg-type]


def mark_state_format(state_dir: Path) -> None:
    """Record this version's format in a state directory that has no marker yet (never downgrades)."""
    marker = Path(state_dir) / MARKER
    if not marker.exists():
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"state_format": STATE_FORMAT}).encode(), replace=False, mode=0o644)
