"""Reading the silo's Parquet cohort with errors a silo IT person can act on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from policies.errors import PolicyError


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """Open a cohort file, turning missing or non-Parquet files into clear errors."""
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"{path}: cohort file not found")
    if not path.is_file():
        raise PolicyError(f"{path}: cohort path is not a file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PolicyError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None


def read_cohort(path: str | Path) -> pd.DataFrame:
    """Load the whole cohort for training (validation streams instead; see policies.validation)."""
    return open_parquet(path).read().to_pandas()
