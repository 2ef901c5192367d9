"""Rebuild the sample Parquet cohorts from the UCI Heart Disease source files.

Usage: python sample_data/build.py [SOURCE_DIR]
(default SOURCE_DIR: ../shared/data/uci_heart_disease next to the project).

Each hospital becomes one Parquet file with typed columns and missing values as
nulls; nothing is imputed or dropped here, because deciding what to drop is the
study's feature pipeline's job, not the data's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]
# Integer-coded columns keep integer type (nullable); the rest are measurements.
INTEGER_COLUMNS = {"age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
                   "thalach", "exang", "slope", "ca", "thal", "num"}
FILES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
HERE = Path(__file__).resolve().parent


def arrow_schema() -> pa.Schema:
    return pa.schema([
        pa.field(c, pa.int64() if c in INTEGER_COLUMNS else pa.float64()) for c in COLUMNS
    ])


def convert(source: Path, dest: Path) -> int:
    frame = pd.read_csv(source, header=None, names=COLUMNS, na_values="?")
    for col in INTEGER_COLUMNS:
        frame[col] = frame[col].astype("Int64")
    table = pa.Table.from_pandas(frame, schema=arrow_schema(), preserve_index=False)
    pq.write_table(table, dest, row_group_size=128)
    return table.num_rows


def main(argv: list[str]) -> int:
    source_dir = Path(argv[1]) if len(argv) > 1 else HERE.parent.parent / "shared" / "data" / "uci_heart_disease"
    for silo, name in FILES.items():
        rows = convert(source_dir / name, HERE / f"{silo}.parquet")
        print(f"{silo:12s} {rows:4d} rows -> sample_data/{silo}.parquet")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
