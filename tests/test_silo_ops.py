"""Silo operations: status, health, log rotation and the state-format check at start.

(The running-silo half of status and health is exercised over real processes in
tests/test_containers.py, through the exact commands the containers run.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from policies.audit import open_party_log
from silo_node.ledger import PrivacyLedger, SiloBudget
from silo_node.state_format import MARKER, STATE_FORMAT, check_state_format
from silo_node.status import RUN_FILE, collect_status, health

ROOT = Path(__file__).resolve().parent.parent
SILO = [sys.executable, "-m", "silo_node.cli"]
STUDY = ROOT / "policies" / "studies" / "heart_disease.yaml"


def _silo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.run([*SILO, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, cwd=ROOT)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _start_argv(state: Path, sample_paths: dict[str, Path]) -> list[str]:
    return ["start", "--study", str(STUDY), "--cohort", str(sample_paths["cleveland"]), "--state-dir", str(state),
            "--superlink", "127.0.0.1:9", "--name", "cleveland", "--insecure-local-demo"]


# ---------------------------------------------------------------------------- state format


def test_start_refuses_a_state_format_from_a_newer_version_and_changes_nothing(tmp_path: Path, sample_paths) -> None:
    state = tmp_path / "silo"
    state.mkdir()
    (state / MARKER).write_text(json.dumps({"state_format": STATE_FORMAT + 1}))
    (state / "audit.jsonl").write_bytes(b"")
    before = _snapshot(state)
    proc = _silo(*_start_argv(state, sample_paths))
    assert proc.returncode == 2, proc.stderr
    assert f"state format {STATE_FORMAT + 1}" in proc.stderr and str(state / MARKER) in proc.stderr
    assert "newer fedcohort" in proc.stderr and f"reads format {STATE_FORMAT} only" in proc.stderr
    assert _snapshot(state) == before


def test_start_refuses_a_ledger_in_an_unknown_format_naming_the_file(tmp_path: Path, sample_paths) -> None:
    state = tmp_path / "silo"
    ledger = state / "ledger" / "heart_disease.json"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"format": "two", "study_id": "heart_disease"}))
    before = _snapshot(state)
    proc = _silo(*_start_argv(state, sample_paths))
    assert proc.returncode == 2
    assert str(ledger) in proc.stderr and "state format 'two'" in proc.stderr and "edited or damaged" in proc.stderr
    assert _snapshot(state) == before


def test_an_unmarked_state_dir_is_format_one_and_a_broken_marker_is_refused(tmp_path: Path) -> None:
    assert check_state_format(tmp_path) == 1
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(Exception, match="cannot read its state format"):
        check_state_format(tmp_path)
    (tmp_path / MARKER).write_text(json.dumps({"state_format": True}))
    with pytest.raises(Exception, match="state format True"):
        check_state_format(tmp_path)


# ---------------------------------------------------------------------------- log rotation

_ROTATE = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from silo_node.logs import RotatedOutput
    log = RotatedOutput(Path(sys.argv[1]), max_bytes=2048, keep=3).start()
    for i in range(400):
        print(f"parent line {i:04d}")
    subprocess.run(["sh", "-c", "i=0; while [ $i -lt 300 ]; do echo child line $i; i=$((i+1)); done"], check=True)
    print("stderr too", file=sys.stderr)
    print("last line")
    log.stop()
    print("after stop goes to the real stdout")
""")


def test_log_rotation_keeps_no_more_than_n_files_each_under_the_size(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "silo.log"
    proc = subprocess.run([sys.executable, "-c", _ROTATE, str(log)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "after stop goes to the real stdout\n"  # nothing else leaked past the log
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["silo.log", "silo.log.1", "silo.log.2", "silo.log.3"]  # keep=3: older ones deleted
    assert all((log.parent / f).stat().st_size <= 2048 for f in files)
    newest = log.read_text().splitlines()
    assert newest[-2:] == ["stderr too", "last line"]
    kept = "".join((log.parent / f).read_text() for f in reversed(files)).splitlines()
    assert "child line 299" in kept and "parent line 0000" not in kept  # the child's output is rotated too
    assert kept == sorted(kept, key=kept.index)  # and in order: .3 is oldest, the live file newest
    assert kept.index("child line 0") < kept.index("child line 299") < kept.index("last line")


def test_start_refuses_a_log_rotation_it_cannot_do(tmp_path: Path, sample_paths) -> None:
    proc = _silo(*_start_argv(tmp_path / "silo", sample_paths), "--log-file", str(tmp_path / "s.log"),
                 "--log-keep", "0", timeout=300)
    assert proc.returncode == 2 and "--log-keep >= 1" in proc.stderr


# ---------------------------------------------------------------------------- status and health

def test_status_reports_spend_ceilings_and_last_rounds_counts_only(tmp_path: Path, heart_study) -> None:
    state = tmp_path / "silo"
    proc = _silo("approve", "--study", str(STUDY), "--state-dir", str(state), "--yes", "--epsilon-ceiling", "0.5",
                 "--silo-total-epsilon", "3")
    assert proc.returncode == 0, proc.stderr
    ledger = PrivacyLedger.load(state, heart_study.id, policy_hash=heart_study.policy_hash(), privacy=heart_study.dp)
    charge = ledger.charge(1, "nonce-1", 4.0, 0.01, 10)
    log = open_party_log(state, "cleveland", "silo")
    log.append("train.replied", f"{heart_study.id}/round-1", {"epsilon_spent": charge.epsilon_after, "nonce": "n1"})
    log.append("train.refused", f"{heart_study.id}/round-2", {"reason": "round 2 would bring epsilon to 0.61 above"})

    status = collect_status(state, probe_superlink=False)
    (study,) = status["studies"]
    assert study["study_id"] == heart_study.id and study["approved"]
    assert study["policy_hash"] == heart_study.policy_hash()
    privacy = study["privacy"]
    assert privacy["epsilon_spent"] == pytest.approx(ledger.spent(), rel=1e-9) and privacy["epsilon_spent"] > 0
    assert privacy["budget"] == 0.5 and privacy["silo_ceiling"] == 0.5 and privacy["study_epsilon"] == heart_study.dp.epsilon
    assert privacy["charges"] == 1 and privacy["last_charged_round"] == 1
    assert status["silo_total_epsilon"] == {"ceiling": 3.0, "committed": heart_study.dp.epsilon}
    assert status["last_round"]["trained"]["subject"] == f"{heart_study.id}/round-1"
    assert status["last_round"]["refused"]["reason"].startswith("round 2 would bring")
    assert status["connection"]["running"] is False and status["cohort"] is None

    text = _silo("status", "--state-dir", str(state), "--no-probe")
    assert text.returncode == 0, text.stderr
    assert f"epsilon spent {privacy['epsilon_spent']:.4g} of 0.5" in text.stdout and "this silo's ceiling 0.5" in text.stdout
    assert "running     : no" in text.stdout and "last refused: heart" in text.stdout.replace(heart_study.id, "heart")
    as_json = json.loads(_silo("status", "--state-dir", str(state), "--json", "--no-probe").stdout)
    assert as_json["studies"] == status["studies"]


def test_status_shows_a_corrupted_ledger_instead_of_failing(tmp_path: Path, heart_study) -> None:
    state = tmp_path / "silo"
    SiloBudget(state).reserve(heart_study.id, heart_study.dp, heart_study.policy_hash())
    ledger = PrivacyLedger.load(state, heart_study.id, policy_hash=heart_study.policy_hash(), privacy=heart_study.dp)
    ledger.charge(1, "n", 4.0, 0.01, 10)
    path = PrivacyLedger.path_for(state, heart_study.id)
    path.write_text(path.read_text().replace('"round": 1', '"round": 7'))
    (study,) = collect_status(state, probe_superlink=False)["studies"]
    assert "corrupted" in study["privacy"]["error"] and "breaks the hash chain" in study["privacy"]["error"]


def test_health_fails_with_one_line_when_nothing_runs_or_the_run_file_is_stale(tmp_path: Path) -> None:
    ok, line = health(tmp_path)
    assert not ok and "no running silo here" in line
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / RUN_FILE).parent.mkdir()
    (tmp_path / RUN_FILE).write_text(json.dumps({"pid": int(dead.stdout), "name": "x", "superlink": "127.0.0.1:9"}))
    proc = _silo("health", "--state-dir", str(tmp_path))
    assert proc.returncode == 1 and proc.stdout.count("\n") == 1
    assert f"pid {int(dead.stdout)}) is not running" in proc.stdout
    (tmp_path / MARKER).write_text(json.dumps({"state_format": 99}))
    ok, line = health(tmp_path)
    assert not ok and "state format 99" in line


def test_health_imports_neither_torch_nor_pandas(tmp_path: Path) -> None:
    code = ("import json, os, sys; from pathlib import Path; from silo_node.cli import main; "
            "run = Path(sys.argv[1], 'run', 'silo.json'); run.parent.mkdir(); "
            "run.write_text(json.dumps({'pid': os.getpid(), 'superlink': '127.0.0.1:9'})); "  # alive: probes the socket
            "rc = main(['health', '--state-dir', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'pandas', 'tenseal', 'opacus', 'flwr') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    lines = proc.stdout.strip().splitlines()
    assert "does not accept connections on its socket" in lines[0] and lines[-1] == "[]", proc.stdout + proc.stderr


def test_health_probes_the_socket_the_service_listens_on(tmp_path: Path) -> None:
    from silo_node.service import socket_path
    from silo_node.status import SERVICE_SOCKET

    assert socket_path(tmp_path) == tmp_path / SERVICE_SOCKET
