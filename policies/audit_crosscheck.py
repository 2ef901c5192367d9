"""Cross-checking audit exports of different parties against each other (``audit verify --silo``).

Why: ``verify`` shows a log was not changed by anyone *without* its party's signing key. The
party itself can still rewrite, cut or roll back its log and re-sign it; that log verifies on
its own. What it cannot change is what other parties recorded about it: every round message
carries the coordinator's chain head, which the silo logs as ``audit.witnessed``, and every
reply carries the silo's head, which the coordinator logs the same way. Comparing those
witness entries with the other party's export catches a rewritten, truncated or rolled-back
log, up to the last exchange between the two (see docs/audit-format.md, "Cross-check").

Parties are named as the logs name them: ``coordinator``, and ``silo:NAME`` for the silo whose
export's manifest says ``party: NAME``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from policies.audit import WITNESS_ACTION, VerifiedExport, check_witnesses, describe, verify_export, witnessed_heads
from policies.errors import PolicyError

COORDINATOR = "coordinator"
SILO_PREFIX = "silo:"


def silo_party(name: str) -> str:
    """How the coordinator's witness entries name a silo (``silo:NAME``)."""
    return name if name.startswith(SILO_PREFIX) else SILO_PREFIX + name


def _pair(coordinator: VerifiedExport, silo: VerifiedExport) -> tuple[list[str], str]:
    """Findings for one coordinator/silo pair, and a summary line when there are none."""
    name = silo_party(silo.party)
    if coordinator.entries is None or silo.entries is None:
        unreadable = coordinator.source if coordinator.entries is None else silo.source
        return [f"{COORDINATOR} <-> {name}: cannot cross-check, {unreadable} has no readable audit.jsonl"], ""
    problems = check_witnesses(coordinator.entries, name, silo.entries, witness_party=COORDINATOR)
    problems += check_witnesses(silo.entries, COORDINATOR, coordinator.entries, witness_party=name)
    by_coordinator = len(witnessed_heads(coordinator.entries, name))
    by_silo = len(witnessed_heads(silo.entries, COORDINATOR))
    if by_coordinator + by_silo == 0:
        problems.append(
            f"{COORDINATOR} <-> {name}: neither log witnessed the other (wrong export, or the silo's "
            f"name differs from the one the coordinator knows it by?)"
        )
    summary = (
        f"{COORDINATOR} <-> {name}: OK, {by_coordinator} heads the coordinator witnessed and "
        f"{by_silo} the silo witnessed all match"
    )
    return problems, summary


def cross_check(coordinator: VerifiedExport, silos: Iterable[VerifiedExport]) -> tuple[bool, list[str]]:
    """Compare each silo's witnessed heads both ways; one line per finding or per clean pair.

    Silos the coordinator witnessed but no export was given for are listed as not checked
    (a note, not a failure: an auditor may check one hospital at a time).
    """
    lines: list[str] = []
    ok = True
    given = set()
    for silo in silos:
        given.add(silo_party(silo.party))
        problems, summary = _pair(coordinator, silo)
        ok = ok and not problems
        lines += [f"MISMATCH: {p}" for p in problems] or [summary]
    witnessed = {
        str(e.details.get("party")) for e in coordinator.entries or []
        if e.action == WITNESS_ACTION and str(e.details.get("party", "")).startswith(SILO_PREFIX)
    }
    for party in sorted(witnessed - given):
        lines.append(f"note: {party} was witnessed by the coordinator but no --silo export was given: not cross-checked")
    return ok, lines


def _one_coordinator(exports: list[VerifiedExport]) -> VerifiedExport:
    coordinators = [e for e in exports if e.party == COORDINATOR]
    if len(coordinators) != 1:
        parties = ", ".join(f"{e.source} ({e.party or 'unreadable manifest'})" for e in exports)
        raise PolicyError(f"--silo cross-checks against exactly one coordinator export; given: {parties}")
    return coordinators[0]


def _unique_silos(silos: list[VerifiedExport]) -> None:
    seen: dict[str, str] = {}
    for silo in silos:
        if not silo.party:
            raise PolicyError(f"{silo.source}: no readable manifest, so it cannot be matched to a silo")
        name = silo_party(silo.party)
        if silo.party == COORDINATOR:
            raise PolicyError(f"{silo.source}: this is the coordinator's export, not a silo's")
        if name in seen:
            raise PolicyError(f"{silo.source} and {seen[name]} are both exports of {name}: give one per silo")
        seen[name] = silo.source


def verify_bundles(
    paths: Iterable[str | Path], silos: Iterable[str | Path] = ()
) -> tuple[bool, list[str]]:
    """What `coordinator audit verify` and `silo-node audit verify` print: one line per bundle,
    then, with ``silos``, the cross-check of the one coordinator bundle against each of them."""
    exports = [verify_export(p) for p in paths]
    silo_exports = [verify_export(p) for p in silos]
    coordinator = _one_coordinator(exports) if silo_exports else None
    _unique_silos(silo_exports)
    lines = [describe(e.result, e.source) for e in [*exports, *silo_exports]]
    ok = all(e.result.ok for e in [*exports, *silo_exports])
    if coordinator is not None:
        crossed, cross_lines = cross_check(coordinator, silo_exports)
        ok, lines = ok and crossed, lines + cross_lines
    return ok, lines
