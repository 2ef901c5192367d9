"""Audit log throughput: durable signed appends per second, and seconds to verify 100k entries.

Appends go through `AuditLog.append` (sign + one O_APPEND write + fsync per entry, as in
production). The 100k-entry log for verification is built in memory with the same
public pieces (`entry_hash`, `PartyKey.sign`, `AuditEntry.to_line`) and written once, since
100k fsyncs would measure the disk, not the verifier. Writes bench/results/audit_throughput.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies.audit import GENESIS_HASH, AuditEntry, AuditLog, PartyKey, entry_hash, verify  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=500)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "audit_throughput.json"))
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        appends_per_s = measure_appends(args.appends, tmp_path)
        key = PartyKey.generate()
        big = tmp_path / "big.jsonl"
        build_log(args.entries, key, big)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = verify(big, key.public_keys())
            times.append(time.perf_counter() - t0)
            assert result.ok and result.entries == args.entries, result.problem
    verify_s = statistics.median(times)
    out = {
        "appends_per_second_durable_signed": appends_per_s, "appends": args.appends,
        "verify_entries": args.entries, "verify_seconds_median": verify_s, "verify_seconds_all": times,
        "bar": {"verify_100k_under_s": VERIFY_BAR_S, "met": verify_s < VERIFY_BAR_S},
        "generated_by": "bench/audit_throughput.py", "machine": "2 cores, shared",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    table = Table(title="Audit log throughput")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("durable signed appends per second", f"{appends_per_s:.0f}")
    table.add_row(f"verify {args.entries} entries (median s)", f"{verify_s:.2f} (bar < {VERIFY_BAR_S:.0f})")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
