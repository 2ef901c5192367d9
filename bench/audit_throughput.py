"""Audit log throughput: durable signed appends per second, and seconds to verify 100k entries.

Appends go through `AuditLog.append` (sign + one O_APPEND write + fsync per entry, as in
production). The 100k-entry log for verification is built in memory with the same
public pieces (`entry_hash`, `PartyKey.sign`, `AuditEntry.to_line`) and written once, since
100k fsyncs would measure the disk, not the verifier. Two verifications are timed: `verify`
of the log alone, and `verify_bundle` of its export (what `coordinator audit verify DIR` runs:
manifest, file hashes, chain, signatures, and the CSV and Parquet copies); the bar applies to
the bundle. The machine is shared, so each run records the load average before it and the
CPU seconds it used (which depend far less on how busy the other cores are than wall time);
the table shows the median of both.
Writes bench/results/audit_throughput.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies.audit import (  # noqa: E402
    GENESIS_HASH, AuditEntry, AuditLog, PartyKey, VerifyResult, entry_hash, export_bundle, verify, verify_bundle,
)

VERIFY_BAR_S = 10.0


def measure_appends(n: int, tmp: Path) -> float:
    log = AuditLog(tmp / "append.jsonl", PartyKey.generate(), "coordinator", "coordinator")
    t0 = time.perf_counter()
    for i in range(n):
        log.append("round.finished", f"study/round-{i}", {"replied": 4, "refused": 0})
    return n / (time.perf_counter() - t0)


def build_log(n: int, key: PartyKey, path: Path) -> None:
    prev, lines = GENESIS_HASH, []
    for seq in range(1, n + 1):
        body = {"seq": seq, "ts": "2026-11-23T00:00:00.000000Z", "actor": "coordinator", "role": "coordinator",
                "action": "round.finished", "subject": f"study/round-{seq}", "details": {"replied": 4},
                "prev_hash": prev}
        digest = entry_hash(body)
        signature = base64.b64encode(key.sign(digest.encode("ascii"))).decode("ascii")
        entry = AuditEntry.model_validate({**body, "hash": digest, "signature": signature, "key_id": key.key_id})
        lines.append(entry.to_line())
        prev = digest
    path.write_bytes(b"".join(lines))


def timed(check: Callable[[], VerifyResult], entries: int, repeats: int) -> dict[str, Any]:
    """Wall and CPU seconds of each run, with the 1-minute load average just before it."""
    runs = []
    for _ in range(repeats):
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        result = check()
        runs.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "load_before": load})
        assert result.ok and result.entries == entries, result.problem
    walls = [r["wall_s"] for r in runs]
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "stdev_s": statistics.stdev(walls) if len(walls) > 1 else 0.0,
            "cpu_median_s": statistics.median(r["cpu_s"] for r in runs),
            "load_before_median": statistics.median(r["load_before"] for r in runs), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "audit_throughput.json"))
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        appends_per_s = measure_appends(args.appends, tmp_path)
        key = PartyKey.generate()
        big = tmp_path / "big.jsonl"
        build_log(args.entries, key, big)
        export_bundle(big, tmp_path / "bundle", key.public_keys(), party="coordinator")
        log_runs = timed(lambda: verify(big, key.public_keys()), args.entries, args.repeats)
        bundle_runs = timed(lambda: verify_bundle(tmp_path / "bundle"), args.entries, args.repeats)
    verify_s = bundle_runs["median_s"]
    out = {
        "appends_per_second_durable_signed": appends_per_s, "appends": args.appends,
        "verify_entries": args.entries,
        "verify_bundle_seconds_median": verify_s, "verify_bundle": bundle_runs,
        "verify_log_seconds_median": log_runs["median_s"], "verify_log": log_runs,
        "bar": {"verify_100k_under_s": VERIFY_BAR_S, "measured": "verify_bundle median", "met": verify_s < VERIFY_BAR_S},
        "generated_by": "bench/audit_throughput.py", "cpus": os.cpu_count(), "machine": "2 cores, shared",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    table = Table(title="Audit log throughput")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("durable signed appends per second", f"{appends_per_s:.0f}")
    for name, runs in (("verify bundle (audit verify DIR)", bundle_runs), ("verify log only", log_runs)):
        table.add_row(f"{name}, {args.entries} entries: median wall s (min-max)",
                      f"{runs['median_s']:.2f} ({runs['min_s']:.2f}-{runs['max_s']:.2f})")
        table.add_row(f"{name}: median CPU s (load average before)",
                      f"{runs['cpu_median_s']:.2f} ({runs['load_before_median']:.1f})")
    table.add_row("bar: verify bundle under", f"{VERIFY_BAR_S:.0f} s: {'met' if verify_s < VERIFY_BAR_S else 'NOT met'}")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
