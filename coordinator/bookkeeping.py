"""What the ServerApp writes to the coordinator's store as a study runs.

The store is the coordinator's memory and what the web UI reads: the study and its
lifecycle, who enrolled, each round's approval, who replied or refused and why, pooled
metrics, and each silo's privacy spend. Every write here is also in the audit log.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.lifecycle import transition
from coordinator.rounds import RoundRecord
from coordinator.store import CheckpointRow, Store, StudyRow, open_store
from policies.audit import AuditLog
from policies.errors import PolicyError
from policies.study import StudySpec

ACTOR = "coordinator"


def ensure_study(store: Store, spec: StudySpec, yaml_text: str) -> StudyRow:
    """The store's row for exactly this policy (id, version and hash), created if new."""
    known = [r for r in store.list_studies(all_versions=True) if r.id == spec.id]
    if not known:
        return store.create_study(yaml_text, created_by=ACTOR)
    if spec.version not in {r.version for r in known}:
        return store.new_version(spec.id, yaml_text, ACTOR)
    row = store.get_study(spec.id, version=spec.version)
    if row.policy_hash != spec.policy_hash():
        raise PolicyError(
            f"the store already holds {row.label} with policy {row.policy_hash[:12]}, not {spec.policy_hash()[:12]}: "
            "a changed study needs a new version number"
        )
    return row


class StudyBook:
    """Records one running study version; `approve(round)` is the approval gate."""

    def __init__(self, state_dir: Path, spec: StudySpec, yaml_text: str, audit: AuditLog, db_url: str | None = None):
        self.spec, self.audit = spec, audit
        self.fingerprints: dict[str, str] = {}  # the runner's view of enrolment keys (silo -> sha256)
        self.validations: dict[str, dict] = {}  # silo -> counts-only validation report it sent
        self.store = open_store(db_url, state_dir)
        self.row = ensure_study(self.store, spec, yaml_text)
        if self.row.status in ("completed", "stopped"):
            raise PolicyError(f"study {self.row.label} is already {self.row.status}; run a new version")

    def _move(self, to: str, reason: str = "") -> None:
        change = transition(self.store, self.spec.id, to, ACTOR, reason, version=self.spec.version)
        self.audit.append("study.status", self.row.label, {"from": change.from_status, "to": change.to_status,
                                                            "reason": reason[:500]})

    def start(self, silos: dict[str, int]) -> None:
        """Enrol the silos that answered (name -> Flower node id; each validated its cohort before joining) and run."""
        status = self.store.get_study(self.spec.id, version=self.spec.version).status
        if status == "draft":
            self._move("open")
        for silo, node in silos.items():
            self.enrol(silo, node, self.fingerprints.get(silo))
        if self.store.get_study(self.spec.id, version=self.spec.version).status == "open":
            self._move("running")

    def enrol(self, silo: str, node_id: int | None = None, fingerprint: str | None = None) -> None:
        """A silo is in: it validated its cohort before joining and (under CKKS) opened the study key.

        What the Silos page shows comes from here: the enrolment, the key ceremony, the node
        id it connected under and when it was last seen. A silo whose enrolment key differs
        from the one on record is still enrolled (its peers' pins decide whom they trust), but
        the mismatch goes to the audit log for the study lead and auditors to see.
        """
        ceremony = "done" if self.spec.encryption == "ckks" else None
        self.store.record_enrolment(self.spec.id, silo, "validated", self.validations.get(silo), key_ceremony=ceremony,
                                    version=self.spec.version)
        try:
            self.store.register_silo(silo, key_fingerprint=fingerprint)
        except PolicyError as exc:
            self.audit.append("silo.key_mismatch", silo, {"reason": str(exc)[:500]})
        self.store.mark_silo_seen(silo, online=True, node_id=node_id)

    def revoked(self) -> dict[int, str]:
        """Node id -> name of every revoked silo (`coordinator silo revoke`), read fresh each time."""
        from coordinator.revocation import revoked_nodes

        return revoked_nodes(self.store)

    def withdrawn(self, silo: str) -> None:
        """The silo said it withdrew: its enrolment ends (the audit entry is the runner's)."""
        try:
            self.store.record_enrolment(self.spec.id, silo, "withdrawn", version=self.spec.version)
        except PolicyError as exc:  # e.g. the study is no longer active: the audit log still has it
            self.audit.append("silo.withdrawal_not_stored", silo, {"reason": str(exc)[:300]})

    def seen(self, silos: list[str]) -> None:
        """Silos that answered a round (replied or refused) are online now."""
        for silo in silos:
            self.store.mark_silo_seen(silo, online=True)

    def approve(self, round_no: int, poll: float = 1.0) -> None:
        """Wait (cheaply) until the round is approved; a rejection stops the study."""
        decision = self.store.wait_for_approval(self.spec.id, round_no, poll=poll, version=self.spec.version)
        if decision == "reject":
            raise PolicyError(f"round {round_no} was rejected by the study lead; study stopped")

    def round_started(self, round_no: int, asked: list[str], run_id: int | None = None) -> None:
        self.store.record_round_start(self.spec.id, round_no, asked, run_id, version=self.spec.version)

    def round_finished(self, record: RoundRecord) -> None:
        refused = {k: v for k, v in record.refused.items() if k not in record.replied}
        self.store.record_round_finish(self.spec.id, record.round, record.replied, refused, version=self.spec.version)
        self.seen(sorted({*record.replied, *refused}))
        for silo, spend in record.privacy.items():
            self.store.record_privacy_spend(self.spec.id, silo, record.round, spend["epsilon_spent"],
                                            spend["epsilon_budget"], spend.get("rounds_left"), version=self.spec.version)

    def checkpoint(self, round_no: int, blob: bytes, silos_in: list[str]) -> None:
        """Keep what a new run needs to continue after `round_no` (sums and public bookkeeping only)."""
        self.store.save_checkpoint(self.spec.id, round_no, blob, silos_in, version=self.spec.version)

    def last_checkpoint(self) -> CheckpointRow | None:
        return self.store.load_last_checkpoint(self.spec.id, version=self.spec.version)

    def reopen_after(self, round_no: int) -> list[int]:
        """Rounds after the checkpoint that a dead run started or finished: they run again."""
        return self.store.reopen_rounds_after(self.spec.id, round_no, version=self.spec.version)

    def evaluation(self, model_round: int, scope: str, metrics: dict) -> None:
        self.store.record_evaluation(self.spec.id, model_round, scope, metrics, version=self.spec.version)

    def finish(self, status: str, reason: str = "") -> None:
        current = self.store.get_study(self.spec.id, version=self.spec.version).status
        if current in ("completed", "stopped"):
            return
        if status == "completed" and current != "running":
            status, reason = "stopped", reason or f"ended while {current}"
        self._move(status, reason if status == "stopped" else "")
