"""`coordinator start`: run a study, or continue the one a crash interrupted, over a SuperLink.

The store says what is unfinished (a study version that is open or running, with a
checkpoint); the ServerApp itself resumes from the last checkpoint in a new Flower run.
This module only decides which study, makes sure a SuperLink is there, and submits:

- SuperLink alive (only the ServerApp died): submit a new run to it; the silos'
  SuperNodes never noticed.
- SuperLink dead: start a fresh one on the same address; each silo's `silo-node start`
  restarts its SuperNode, which registers again (new node id), and the ServerApp
  recognises each silo by its enrolment key.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.certs import SuperLinkTls
from coordinator.demo import ProgressFn, end_unfinished_serverapp, follow_run
from coordinator.lifecycle import ACTIVE, FINAL
from coordinator.runtime import LocalFederation
from coordinator.runlock import LOCK_FILE, hold_study_lock
from coordinator.store import DEFAULT_DB, Store, StudyRow, open_store
from policies.errors import PolicyError
from policies.study import StudySpec, load_study

STUDIES_DIR = "studies"  # STATE/coordinator/studies/<id>-v<version>.yaml: the policy a resumed run loads


@dataclass(frozen=True)
class StartPlan:
    study_path: Path
    label: str
    resume_after: int | None  # last checkpointed round, or None for a fresh start


def plan_start(state_dir: Path, study: Path | None, db_url: str | None = None) -> StartPlan:
    """Which study to run: the given policy, else the one unfinished study in the store."""
    if study is None and db_url is None and not (Path(state_dir) / DEFAULT_DB).exists():
        raise PolicyError(f"no coordinator store under {state_dir} (no {DEFAULT_DB}): nothing to resume; "
                          "give the policy with --study")
    spec = load_study(study) if study is not None else None  # a bad policy is refused before the store is made
    store = open_store(db_url, state_dir)
    try:
        if study is not None and spec is not None:
            rows = [r for r in store.list_studies(all_versions=True) if (r.id, r.version) == (spec.id, spec.version)]
            if rows and rows[0].status in FINAL:
                raise PolicyError(f"study {rows[0].label} is already {rows[0].status}; run a new version")
            return StartPlan(Path(study).resolve(), f"{spec.id} v{spec.version}", _resumable(store, rows[0] if rows else None))
        unfinished = [r for r in store.list_studies(all_versions=True) if _resumable(store, r) is not None]
        if not unfinished:
            raise PolicyError(f"no unfinished study in the store at {store.url}; give the policy with --study")
        if len(unfinished) > 1:
            raise PolicyError("several unfinished studies in the store (" + ", ".join(r.label for r in unfinished)
                              + "); name one with --study")
        row = unfinished[0]
        return StartPlan(_policy_file(state_dir, row), row.label, _resumable(store, row))
    finally:
        store.close()


def interrupted_round(state_dir: Path, spec: StudySpec) -> int | None:
    """The last checkpointed round of exactly this policy if it is unfinished in the default store."""
    if not (Path(state_dir) / DEFAULT_DB).exists():
        return None
    store = open_store(None, state_dir)
    try:
        rows = [r for r in store.list_studies(all_versions=True)
                if (r.id, r.version, r.policy_hash) == (spec.id, spec.version, spec.policy_hash())]
        return _resumable(store, rows[0]) if rows else None
    finally:
        store.close()


def _resumable(store: Store, row: StudyRow | None) -> int | None:
    """Last checkpointed round of an open or running study, else None."""
    if row is None or row.status not in ACTIVE:
        return None
    checkpoint = store.load_last_checkpoint(row.id, version=row.version)
    return None if checkpoint is None else checkpoint.round_no


def _policy_file(state_dir: Path, row: StudyRow) -> Path:
    """The exact policy text the store holds (its hash is what the silos approved)."""
    path = Path(state_dir).resolve() / "coordinator" / STUDIES_DIR / f"{row.id}-v{row.version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(row.policy_yaml)
    if load_study(path).policy_hash() != row.policy_hash:
        raise PolicyError(f"{path}: the stored policy of {row.label} no longer hashes to {row.policy_hash[:12]}")
    return path


def _lock_released(coordinator_dir: Path, wait: float) -> bool:
    """Is no ServerApp running here? Waits up to `wait` s for one that is on its way out."""
    deadline = time.monotonic() + wait
    while True:
        fd = hold_study_lock(coordinator_dir)
        if fd is not None:
            os.close(fd)  # only a probe: the ServerApp takes the lock for its own life
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def start_study(state_dir: Path, plan: StartPlan, address: str, *, expected_silos: int, db_url: str | None = None,
                timeout: float = 3600.0, lock_wait: float = 90.0, on_progress: ProgressFn | None = None,
                tls: SuperLinkTls | None = None, extra_config: dict[str, object] | None = None,
                summary_name: str = "summary.json") -> dict:
    """Submit the study as a new Flower run (starting a SuperLink if none listens); follow it to its end.

    With `tls`, the run is submitted over TLS to the study CA (the SuperLink `coordinator
    serve` runs, or one started here with SuperNode authentication). `extra_config` and
    `summary_name` serve other ServerApp modes over the same machinery (the model release:
    `mode=release`, followed through its own summary file)."""
    state_dir = Path(state_dir).resolve()
    coordinator_dir = state_dir / "coordinator"
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise PolicyError(f"--superlink {address}: studies are submitted on the coordinator's own machine; "
                          "use 127.0.0.1:PORT (silos connect to the SuperLink's public address)")
    fed = LocalFederation(work_dir=state_dir / "runtime" / "coordinator", port=int(port), tls=tls)
    started_superlink = not fed.superlink_reachable()
    try:
        if started_superlink:
            fed.start_superlink()
        else:
            fed.write_connection()
        # After the SuperLink is up: a ServerApp orphaned by a crashed SuperLink retries until
        # a SuperLink answers, is refused there (its run is unknown) and exits, freeing the lock.
        if not _lock_released(coordinator_dir, lock_wait):
            raise PolicyError(f"a ServerApp is still running a study in {state_dir} ({coordinator_dir / LOCK_FILE} "
                              f"held for {lock_wait:g} s); stop it first or wait for it to finish")
        summary_path = coordinator_dir / summary_name
        summary_path.unlink(missing_ok=True)
        run_id = fed.submit({"study-path": str(plan.study_path), "state-dir": str(state_dir),
                             "expected-silos": expected_silos, "db-url": db_url or ""} | (extra_config or {}))
        try:
            summary = follow_run(fed, run_id, summary_path, time.time() + timeout, on_progress)
        finally:
            end_unfinished_serverapp(summary_path)
    finally:
        fed.stop()  # only what this command started (a SuperLink it brought up); never the silos
    return summary | {"flower_run_id": run_id, "started_superlink": started_superlink}
