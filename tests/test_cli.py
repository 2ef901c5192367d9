"""Bad input at the command line: one clear paragraph, non-zero exit, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from policies.study import shipped_study


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "silo_node.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def snapshot(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_validate_ok_on_real_cohort(tmp_path, sample_paths):
    proc = run("validate", "--study", str(shipped_study()), "--cohort", str(sample_paths["cleveland"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "OK: may join the study" in proc.stdout


@pytest.mark.parametrize("case", ["missing", "not_parquet", "wrong_type", "empty", "one_class", "unknown_key", "wrong_value"])
def test_bad_input(tmp_path, sample_paths, case):
    study = Path(shipped_study())
    cohort = tmp_path / "cohort.parquet"
    frame = pd.read_parquet(sample_paths["cleveland"])
    expect = {"missing": "not found", "not_parquet": "not a readable Parquet", "wrong_type": "column.age.type",
              "empty": "cohort.min_rows", "one_class": "cohort.label_classes", "unknown_key": "unknown key",
              "wrong_value": "training.rounds"}[case]
    if case == "not_parquet":
        cohort.write_text("age,sex\n63,1\n")
    elif case == "wrong_type":
        frame.assign(age=frame["age"].astype(str)).to_parquet(cohort)
    elif case == "empty":
        frame.iloc[:0].to_parquet(cohort)
    elif case == "one_class":
        frame[frame["num"] == 0].to_parquet(cohort)
    elif case in ("unknown_key", "wrong_value"):
        frame.to_parquet(cohort)
        text = study.read_text()
        text = text.replace("seed: 42", "seed: 42\ncolour: blue") if case == "unknown_key" else text.replace("rounds: 15", "rounds: -1")
        study = tmp_path / "study.yaml"
        study.write_text(text)
    before = snapshot(tmp_path)
    proc = run("validate", "--study", str(study), "--cohort", str(cohort), cwd=tmp_path)
    assert proc.returncode != 0
    assert expect in proc.stdout + proc.stderr
    if case in ("missing", "not_parquet", "unknown_key", "wrong_value"):
        assert str(cohort if case in ("missing", "not_parquet") else study) in proc.stderr
    assert snapshot(tmp_path) == before, "validation must not write anything"
    assert "Traceback" not in proc.stderr


def test_supernode_launcher_internals_still_there():
    """The short-poll launcher patches flwr internals: fail loudly if they move."""
    from silo_node.supernode_launcher import check_internals

    check_internals()


def test_approve_shows_the_study_and_records_its_hash(tmp_path):
    state = tmp_path / "state"
    proc = run("approve", "--study", str(shipped_study()), "--state-dir", str(state), "--yes",
               "--pin", "ab12 cd34", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Policy hash" in proc.stdout and "enrolment key fingerprint" in proc.stdout
    assert "epsilon 1" in proc.stdout
    from policies.study import load_study
    from silo_node.approval import require_approval

    approval = require_approval(state, load_study(shipped_study()))
    assert approval.pins == ("ab12cd34",)
    assert (state / "keys" / "enrolment.key").stat().st_mode & 0o077 == 0
