"""Round latency over the real Flower runtime: Flower's stock setup against ours.

Each setup runs the heart study with 4 silos on 127.0.0.1 through the same processes
as `coordinator demo` (SuperLink, ServerApp, `silo-node start` x4 with torch and tenseal
loaded) and records the median seconds per training round (round 1 excluded: it also
waits for the silos to connect). Writes bench/results/round_latency.json.

Setups:
  flower-default  ServerApp uses grid.send_and_receive (3-s tick); stock SuperNode
                  (3-s idle sleep, 0.5-s reply wait, launcher poll 1 s).
  push-pull       ServerApp pushes and pulls every 0.25 s (public API only); stock SuperNode.
  short-poll      push-pull plus the SuperNode launcher's 0.25-s idle poll (patches
                  flwr internals, flwr pinned to 1.41.0, guarded by a test): the chosen setup.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.demo import run_local_study, sample_cohorts  # noqa: E402
from policies.study import load_study, shipped_study  # noqa: E402

SETUPS = {
    "flower-default": {"transport": "send-and-receive", "node_poll": 3.0},
    "push-pull": {"transport": "push-pull", "node_poll": 3.0},
    "short-poll": {"transport": "push-pull", "node_poll": 0.25},
}
CHOSEN = "short-poll"


def study_with_rounds(rounds: int, where: Path) -> Path:
    data = load_study(shipped_study()).model_dump(mode="json")
    data["training"]["rounds"] = rounds
    out = where / "study.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def measure(name: str, rounds: int, console: Console) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        study = study_with_rounds(rounds, Path(tmp))
        summary = run_local_study(study, Path(tmp) / "state", sample_cohorts(), timeout=1200, **SETUPS[name])
    if summary.get("status") != "completed":
        raise RuntimeError(f"{name}: study did not complete: {summary.get('reason')}")
    secs = [h["seconds"] for h in summary["history"]][1:]
    row = {"setup": name, "silos": 4, "rounds": rounds, "median_round_s": statistics.median(secs),
           "round_seconds": secs, "wall_s": summary["wall_seconds"], **SETUPS[name]}
    console.print(f"{name:15s} median {row['median_round_s']:.2f} s/round over {len(secs)} rounds, wall {row['wall_s']:.1f} s")
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "round_latency.json"))
    args = parser.parse_args()
    console = Console()
    rows = [measure(name, args.rounds, console) for name in SETUPS]
    with tempfile.TemporaryDirectory() as tmp:
        full = run_local_study(shipped_study(), Path(tmp) / "state", sample_cohorts(), timeout=1800, **SETUPS[CHOSEN])
    result = {
        "chosen": CHOSEN, "rows": rows, "demo_wall_s": full["wall_seconds"],
        "demo_rounds": full.get("rounds"), "demo_status": full.get("status"),
        "machine": {"cores": 2, "python": platform.python_version()},
        "generated_by": "bench/round_latency.py", "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    table = Table(title="Round latency, 4 silos, train+evaluate per round (median s)")
    for col in ("setup", "median s/round", "wall s", "transport", "node idle poll s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["setup"] + (" (chosen)" if r["setup"] == CHOSEN else ""), f"{r['median_round_s']:.2f}",
                      f"{r['wall_s']:.1f}", r["transport"], str(r["node_poll"]))
    console.print(table)
    console.print(f"full demo ({full.get('rounds')} rounds, chosen setup): {full['wall_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
