"""What a silo costs a hospital's machine: memory of a running silo, and its health check.

Runs the shipped heart study (CKKS + DP) with 4 silos on 127.0.0.1 through the same
processes as `coordinator demo` (`silo-node start` = silo service + SuperNode, which
starts a ClientApp process per message) and samples every 0.5 s, per silo, the memory of
the `silo-node start` process (the silo service) and of its SuperNode's process tree.
RSS counts shared pages in every process; PSS shares them out, so PSS sums are what the
silo really adds. Then times `silo-node health` and `coordinator health` (the container
HEALTHCHECK commands) against a running silo. Writes bench/results/silo_footprint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.demo import run_local_study, sample_cohorts  # noqa: E402
from policies.study import load_study, shipped_study  # noqa: E402

MB = 1024 * 1024


def _tolerate_slow_flwr_ls() -> None:
    """On a machine shared by many jobs `flwr ls` can take over its 60-s timeout, which ends
    the demo's follow loop with an exception; here that only means "status unknown"."""
    from coordinator import runtime

    original = runtime.LocalFederation.run_status

    def run_status(self: runtime.LocalFederation, run_id: str) -> str:
        try:
            return original(self, run_id)
        except subprocess.TimeoutExpired:
            return "unknown"

    runtime.LocalFederation.run_status = run_status  # type: ignore[method-assign]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(text[text.rfind(")") + 2:].split()[1])
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _descendants(pid: int, tree: dict[int, list[int]]) -> list[int]:
    out, stack = [], list(tree.get(pid, []))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(tree.get(p, []))
    return out


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process; (0, 0) if it is gone."""
    try:
        rows = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except (OSError, ValueError):
        return 0, 0
    return int(rows["Rss"].split()[0]) * 1024, int(rows["Pss"].split()[0]) * 1024


def _silo_pids(state_root: Path) -> dict[str, int]:
    """name -> pid of each `silo-node start` whose state dir is under state_root/silos."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith(b"silo-node") or b"silo-node" in argv[0]:
            args = [a.decode(errors="replace") for a in argv]
            if "start" in args and "--name" in args and str(state_root) in " ".join(args):
                found[args[args.index("--name") + 1]] = int(entry.name)
    return found


class Sampler(threading.Thread):
    def __init__(self, state_root: Path) -> None:
        super().__init__(daemon=True)
        self.state_root, self.stop, self.peak = state_root, threading.Event(), {}
        self.samples = 0

    def run(self) -> None:
        while not self.stop.wait(0.5):
            tree = _children()
            for name, pid in _silo_pids(self.state_root).items():
                service = _memory(pid)
                node = [_memory(p) for p in _descendants(pid, tree)]
                row = {"service_rss": service[0], "service_pss": service[1],
                       "supernode_tree_rss": sum(r for r, _ in node), "supernode_tree_pss": sum(p for _, p in node),
                       "total_pss": service[1] + sum(p for _, p in node), "processes": 1 + len(node)}
                peak = self.peak.setdefault(name, {k: 0 for k in row})
                for key, value in row.items():
                    peak[key] = max(peak[key], value)
            self.samples += 1


def _time_command(argv: list[str], repeat: int) -> dict:
    """Median wall time and peak RSS of one command (its own rusage, from wait4)."""
    walls, peaks, out, code = [], [], "", 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - t0)
        peaks.append(usage.ru_maxrss / 1024)
        code = os.waitstatus_to_exitcode(status)
    return {"command": f"{Path(argv[0]).name} {argv[1]}", "exit_code": code, "output": out.strip(),
            "median_s": round(sorted(walls)[len(walls) // 2], 3), "peak_rss_mb": round(max(peaks), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "silo_footprint.json"))
    args = parser.parse_args()
    _tolerate_slow_flwr_ls()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        data = load_study(shipped_study()).model_dump(mode="json")
        data["training"]["rounds"] = args.rounds
        study = Path(tmp) / "study.yaml"
        study.write_text(yaml.safe_dump(data, sort_keys=False))
        state = Path(tmp) / "state"
        sampler = Sampler(state)
        sampler.start()
        health: dict = {}

        def probe_health() -> None:  # once the silos serve, time the HEALTHCHECK commands against one
            while not sampler.stop.is_set():
                silo_dir = state / "silos" / "cleveland"
                if (silo_dir / "run" / "silo.json").exists():
                    bin_dir = Path(sys.executable).parent
                    health["silo"] = _time_command([str(bin_dir / "silo-node"), "health", "--state-dir", str(silo_dir)], 5)
                    health["coordinator"] = _time_command(  # no `serve` in the local demo: its cost only
                        [str(bin_dir / "coordinator"), "health", "--state-dir", str(state)], 3)
                    health["coordinator"]["note"] = "the local demo runs no `coordinator serve`: answers unhealthy"
                    return
                time.sleep(1)

        prober = threading.Thread(target=probe_health, daemon=True)
        prober.start()
        try:
            summary = run_local_study(study, state, sample_cohorts(), timeout=1800)
        except Exception as exc:  # an overloaded machine: keep what was sampled, say how far it got
            summary = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300],
                       "history": [], "wall_seconds": 0.0}
        sampler.stop.set()
        sampler.join(5)
        prober.join(60)
    silos = {name: {k: (round(v / MB, 1) if k != "processes" else v) for k, v in peak.items()}
             for name, peak in sorted(sampler.peak.items())}
    result = {
        "benchmark": "silo_footprint", "study": data["id"], "rounds": args.rounds, "silos": len(silos),
        "study_status": summary.get("status"), "study_reason": summary.get("reason", ""),
        "rounds_completed": len(summary.get("history") or []),
        "wall_seconds": round(summary.get("wall_seconds", 0.0), 1), "samples": sampler.samples,
        "peak_mb_per_silo": silos, "health_checks": health,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "2 cores shared with other jobs; peaks are maxima of 0.5-s samples"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"Silo footprint, heart study, {args.rounds} rounds, 4 silos (peak MB per silo)")
    for col in ("silo", "service RSS", "service PSS", "SuperNode tree RSS", "SuperNode tree PSS", "total PSS", "procs"):
        table.add_column(col, justify="right")
    for name, row in silos.items():
        table.add_row(name, *(str(row[k]) for k in ("service_rss", "service_pss", "supernode_tree_rss",
                                                   "supernode_tree_pss", "total_pss", "processes")))
    console.print(table)
    for who, row in health.items():
        console.print(f"{who} health: median {row['median_s']:.2f} s, exit {row['exit_code']}: {row['output']}")
    console.print(f"study {summary.get('status')} {summary.get('reason', '')}; wrote {args.out}")


if __name__ == "__main__":
    main()
