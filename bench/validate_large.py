"""Cohort validation of large files: wall time and peak memory of `silo-node validate`.

Each file is the Cleveland cohort repeated to N rows, written one 1M-row group at a time;
`silo-node validate --json` runs as its own process and its peak RSS comes from wait4 on
that process alone. Validation streams record batches row group by row group, so memory
should stay flat in N (Arrow holds at most one row group's pages); the heart study then
refuses anything above its declared largest cohort (`cohort.max_rows`, 1000 rows).
Writes bench/results/validate_large.json. tests/test_bad_input_cohort.py uses the same
file writer and measurement for its 10-million-row case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "validate_large.json"
CLEVELAND = ROOT / "sample_data" / "cleveland.parquet"


def write_big_cohort(path: Path, rows: int, chunk: int = 1_000_000, source: Path = CLEVELAND) -> Path:
    """`rows` rows of `source` repeated, written one row group per `chunk` rows."""
    base = pq.read_table(source)
    reps = -(-min(chunk, rows) // base.num_rows)
    block = pa.concat_tables([base] * reps).slice(0, min(chunk, rows)).combine_chunks()
    with pq.ParquetWriter(path, block.schema) as writer:
        written = 0
        while written < rows:
            take = min(chunk, rows - written)
            writer.write_table(block.slice(0, take), row_group_size=chunk)
            written += take
    return path


def validate_in_child(study: Path, cohort: Path, out_dir: Path) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run `silo-node validate --json` as its own process: (result, peak RSS in bytes, wall seconds).

    The RSS comes from wait4 on that one child, so no other process of the caller counts.
    """
    args = [sys.executable, "-m", "silo_node.cli", "validate", "--json", "--study", str(study), "--cohort", str(cohort)]
    with open(out_dir / "stdout", "w+") as out, open(out_dir / "stderr", "w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())
    return result, usage.ru_maxrss * 1024, seconds


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find common.py
    from rich.console import Console
    from rich.table import Table

    from common import write_report
    from policies.study import shipped_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[303, 1_000_000, 10_000_000])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            path = write_big_cohort(Path(tmp) / f"rows_{rows}.parquet", rows)
            proc, peak, seconds = validate_in_child(shipped_study(), path, Path(tmp))
            report = json.loads(proc.stdout)
            failed = sorted(r["rule"] for r in report["results"] if not r["passed"] and r["severity"] == "error")
            runs.append({"rows": rows, "file_bytes": path.stat().st_size, "exit_code": proc.returncode,
                         "seconds": round(seconds, 2), "peak_rss_mib": round(peak / 2**20, 1),
                         "columns_in_memory_mib": round(rows * len(report["missing_per_column"]) * 8 / 2**20, 1),
                         "failed_error_rules": failed})
            path.unlink()
    write_report({"what": "silo-node validate on the heart study, Cleveland rows repeated; peak RSS of the process",
                  "load_average_before": os.getloadavg()[0], "runs": runs}, args.out, "bench/validate_large.py", started,
                 pyarrow=pa.__version__)
    table = Table("rows", "file MB", "exit", "seconds", "peak RSS MiB", "columns in RAM MiB", "failed error rules")
    for r in runs:
        table.add_row(f"{r['rows']:,}", f"{r['file_bytes'] / 1e6:.1f}", str(r["exit_code"]), f"{r['seconds']:.1f}",
                      f"{r['peak_rss_mib']:.0f}", f"{r['columns_in_memory_mib']:.0f}", ", ".join(r["failed_error_rules"]) or "-")
    Console().print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
