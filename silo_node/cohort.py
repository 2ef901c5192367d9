"""Reading the silo's Parquet cohort for training (validation streams; see policies.validation)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from policies.validation import open_parquet


def read_cohort(path: str | Path) -> pd.DataFrame:
    return open_parquet(path).read().to_pandas()
