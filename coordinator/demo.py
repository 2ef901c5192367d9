"""Run a whole study on this machine: SuperLink, ServerApp and one silo per cohort.

Used by `coordinator demo`, the integration tests and the latency benchmark, so all
three exercise the same processes a real deployment runs (over 127.0.0.1, no TLS).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from coordinator.runtime import LocalFederation, SiloSpec, end_serverapp, local_federation

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
SAMPLE_SILOS = ("cleveland", "hungary", "switzerland", "va")
FINAL_STATES = ("completed", "stopped")

ProgressFn = Callable[[dict], None]


def sample_cohorts() -> dict[str, Path]:
    return {s: SAMPLE_DIR / f"{s}.parquet" for s in SAMPLE_SILOS}


def read_summary(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_local_study(
    study_path: Path,
    state_dir: Path,
    cohorts: dict[str, Path],
    *,
    node_poll: float = 0.25,
    transport: str = "push-pull",
    timeout: float = 1800.0,
    on_progress: ProgressFn | None = None,
    silo_host: bool = False,
) -> dict:
    """Start everything, run the study to its end, stop every process; return the summary.

    `silo_host`: start the silos as one `silo-node host` (libraries imported once, one fork
    per silo) instead of one `silo-node start` each: for many silos on one machine."""
    state_dir = Path(state_dir).resolve()
    runtime_dir = state_dir / "runtime"
    shutil.rmtree(runtime_dir, ignore_errors=True)  # logs and FLWR_HOME of a previous run only
    summary_path = state_dir / "coordinator" / "summary.json"
    summary_path.unlink(missing_ok=True)
    started = time.time()
    with local_federation(runtime_dir) as fed:
        fed.start_superlink()
        silos = [SiloSpec(name, Path(cohort).resolve(), Path(study_path).resolve(), state_dir / "silos" / name)
                 for name, cohort in cohorts.items()]
        if silo_host:
            fed.start_silo_host(silos, node_poll)
        else:
            for silo in silos:
                fed.start_silo(silo, node_poll)
        run_id = fed.submit({
            "study-path": str(Path(study_path).resolve()), "state-dir": str(state_dir),
            "expected-silos": len(cohorts), "transport": transport,
        })
        try:
            summary = follow_run(fed, run_id, summary_path, started + timeout, on_progress)
        finally:
            end_unfinished_serverapp(summary_path)
    summary["flower_run_id"] = run_id
    summary["wall_seconds"] = time.time() - started
    return summary


def end_unfinished_serverapp(summary_path: Path) -> None:
    """Interrupted (Ctrl-C, timeout, SuperLink gone): end the ServerApp too, so the study
    stays resumable and the next run can take its lock. A finished one has exited already."""
    summary = read_summary(summary_path) or {}
    if summary.get("status") not in FINAL_STATES and summary.get("pid"):
        end_serverapp(int(summary["pid"]))


def follow_run(fed: LocalFederation, run_id: str, summary_path: Path, deadline: float,
               on_progress: ProgressFn | None) -> dict:
    """Watch the ServerApp's summary until the study ends, the run dies or the SuperLink goes."""
    last_check = 0.0
    while True:
        summary = read_summary(summary_path) or {"status": "starting"}
        if on_progress:
            on_progress(summary)
        if summary.get("status") in FINAL_STATES:
            return summary
        if time.time() > deadline:
            return summary | {"status": "stopped", "reason": "demo timed out"}
        if time.time() - last_check > 10:
            last_check = time.time()
            status = fed.run_status(run_id)
            if status.startswith("finished") and not (read_summary(summary_path) or {}).get("status") in FINAL_STATES:
                return summary | {"status": "stopped", "reason": f"Flower run ended ({status}); see {fed.work_dir / 'logs'}"}
        dead = [p.name for p in fed.processes if not p.alive()]
        if "superlink" in dead or (time.time() - last_check < 0.5 and not fed.superlink_reachable()):
            return summary | {"status": "stopped", "reason": "the SuperLink exited"}
        time.sleep(0.5)
