from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"
SILOS = ("cleveland", "hungary", "switzerland", "va")

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(scope="session")
def heart_study():
    from policies.study import load_study, shipped_study

    return load_study(shipped_study("heart_disease"))


@pytest.fixture(scope="session")
def sample_paths() -> dict[str, Path]:
    return {s: SAMPLE / f"{s}.parquet" for s in SILOS}
