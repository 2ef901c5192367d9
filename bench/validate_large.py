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


# Run in the child: its own peak RSS (VmHWM) at exit. ru_maxrss from wait4 is no good here:
# Linux carries the parent's high-water mark into a (v)forked child across exec, so a child of a
# big process (pytest after the real-process tests) would report the parent's memory.
_PEAK_PROBE = """
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["FEDCOHORT_PEAK_FILE"], "w") as out:
        out.write(str(kb))
atexit.register(_peak)
sys.argv = ["silo-node", *sys.argv[1:]]
runpy.run_module("silo_node.cli", run_name="__main__")
"""


def validate_in_child(study: Path, cohort: Path, out_dir: Path) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run `silo-node validate --json` as its own process: (result, its peak RSS in bytes, wall seconds)."""
    args = [sys.executable, "-c", _PEAK_PROBE, "validate", "--json", "--study", str(study), "--cohort", str(cohort)]
    peak_file = out_dir / "peak_kb"
    env = dict(os.environ, FEDCOHORT_PEAK_FILE=str(peak_file))
    with open(out_dir / "stdout", "w+") as out, open(out_dir / "stderr", "w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.run(args, stdout=out, stderr=err, cwd=ROOT, env=env)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(args, proc.returncode, out.read(), err.read())
    return result, int(peak_file.read_text()) * 1024, seconds


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
