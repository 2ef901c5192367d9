"""Scale: real studies with 4, 16 and 32 silo processes on this one (2-core) machine.

Each run is the shipped heart study (CKKS on, DP on, as shipped) over the same processes
as `coordinator demo`: one SuperLink and its ServerApp, and per silo `silo-node start`
(the silo service, which loads torch, tenseal and opacus once), its SuperNode and the
SuperNode's SuperExec, which starts a light ClientApp relay per message. Only what a
study must change for N silos is changed, and the JSON says so: `training.rounds`
(3 by default), `ckks.max_silos` (raised to N when N exceeds the shipped 16: the bound
each contribution must stay under shrinks with it) and `ckks.key_holder` (the first
Cleveland shard).

Cohorts: the four real hospital files, each split into disjoint shards (no row is in two
shards, no feature or row is made up). A hospital gets shards in proportion to its rows
(largest remainder, at least one each), so every shard keeps at least the study's
`cohort.min_rows` (20): for N = 32, Cleveland 11, Hungary 10, Switzerland 4, VA 7 shards
of 27-31 rows. Rows are dealt round-robin after ordering by label and completeness
(seeded shuffle within), so every shard sees both classes. N = 4 is the four files as is.

Measured per N: every training round's seconds (the ServerApp's own clock: push, wait,
screen, sum); time to the first round (processes started -> round 1 running); memory
of every process we started, sampled every second from /proc (RSS and PSS; PSS splits
shared pages, e.g. the libraries a forked process shares, so it adds up): the
coordinator (SuperLink, its SuperExec, ServerApp) and the silos (services, SuperNodes,
their SuperExecs, ClientApp relays); CPU seconds per role; the array bytes of each
training round's messages (ServerApp's count: history down to every silo, update and
evaluation ciphertexts up). Writes bench/results/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import HOSPITALS, SAMPLE_DATA, pyplot, save_figure, write_report  # noqa: E402
from coordinator.demo import run_local_study  # noqa: E402
from policies.study import load_study, shipped_study  # noqa: E402

OUT = ROOT / "bench" / "results" / "scale.json"
SHARD_SEED = 7
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
COORDINATOR_ROLES = ("superlink", "coordinator-superexec", "serverapp")


# ---- cohorts and study ---------------------------------------------------------------------
def shard_counts(n: int, rows: dict[str, int], min_rows: int) -> dict[str, int]:
    """Shards per hospital, in proportion to its rows (largest remainder, at least one each).

    Raises when some shard would fall below the study's `min_rows`: then N is too large
    for these four files and the harness says so instead of padding them.
    """
    if n < len(rows):
        raise ValueError(f"{n} silos: need at least one per hospital ({len(rows)})")
    total = sum(rows.values())
    quota = {h: n * r / total for h, r in rows.items()}
    counts = {h: max(1, int(q)) for h, q in quota.items()}
    for h in sorted(rows, key=lambda h: quota[h] - int(quota[h]), reverse=True):
        if sum(counts.values()) >= n:
            break
        counts[h] += 1
    while sum(counts.values()) > n:  # the at-least-one floor overshot: take from the largest
        counts[max(counts, key=lambda h: counts[h])] -= 1
    small = {h: rows[h] // c for h, c in counts.items() if rows[h] // c < min_rows}
    if small:
        raise ValueError(f"{n} silos: shards of {small} rows fall below the study's min_rows {min_rows}")
    return counts


def shard_cohorts(n: int, out_dir: Path, label: str, min_rows: int) -> dict[str, Path]:
    """Write N disjoint shards of the four hospital files; silo name -> Parquet path."""
    tables = {h: pq.read_table(SAMPLE_DATA / f"{h}.parquet") for h in HOSPITALS}
    if n == len(HOSPITALS):
        return {h: SAMPLE_DATA / f"{h}.parquet" for h in HOSPITALS}
    counts = shard_counts(n, {h: t.num_rows for h, t in tables.items()}, min_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SHARD_SEED)
    cohorts: dict[str, Path] = {}
    for h, table in tables.items():
        frame = table.to_pandas()
        order = rng.permutation(len(frame))
        positive = (frame[label].fillna(0).to_numpy() > 0)[order]
        complete = frame.notna().all(axis=1).to_numpy()[order]
        order = order[np.lexsort((complete, positive))]  # by label, then completeness; shuffled within
        for k in range(counts[h]):
            name = f"{h}-{k + 1:02d}"
            path = out_dir / f"{name}.parquet"
            pq.write_table(table.take(np.sort(order[k::counts[h]])), path)
            cohorts[name] = path
    return cohorts


def scale_study(n: int, rounds: int, key_holder: str, where: Path) -> tuple[Path, dict[str, Any]]:
    """The shipped study with N-silo settings; returns its path and what was changed."""
    data = load_study(shipped_study()).model_dump(mode="json")
    changed = {"training.rounds": rounds, "ckks.key_holder": key_holder,
               "ckks.max_silos": max(int(data["ckks"]["max_silos"]), n)}
    data["training"]["rounds"] = rounds
    data["ckks"]["key_holder"] = key_holder
    data["ckks"]["max_silos"] = changed["ckks.max_silos"]
    path = where / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_study(path)  # still a valid policy
    return path, changed


# ---- what the processes cost -----------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return out


def _role(cmd: str, ancestors: list[str]) -> str | None:
    """What a process is in the federation, from its command line (and its ancestors')."""
    if "flower-superlink" in cmd:
        return "superlink"
    if "flwr-serverapp" in cmd:
        return "serverapp"
    if "flwr-clientapp" in cmd:
        return "clientapp"
    if "flower-superexec" in cmd:
        return "coordinator-superexec" if any("flower-superlink" in a for a in ancestors) else "silo-superexec"
    if "supernode_launcher" in cmd or "flower-supernode" in cmd:
        return "supernode"
    if "silo-node" in cmd and " host " in cmd:  # the host, or a silo service forked from it
        return "silo-service" if any("silo-node" in a and " host " in a for a in ancestors) else "silo-host"
    if "silo-node" in cmd and " start " in cmd:
        return "silo-service"
    return None


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes from smaps_rollup."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sampler:
    """Samples every process below this one each `every` seconds, from a daemon thread."""

    every: float = 1.0
    peak_total: dict[str, dict[str, int]] = field(default_factory=dict)  # side -> rss/pss peak of the sum
    peak_one: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> largest single process
    peak_count: dict[str, int] = field(default_factory=dict)  # role -> most processes at once
    cpu: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (role, last CPU seconds seen)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Sampler":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        totals = {side: {"rss": 0, "pss": 0} for side in ("coordinator", "silos")}
        count: dict[str, int] = {}
        stack = [(c, [table[c][1]]) for c in children.get(os.getpid(), [])]
        while stack:
            pid, chain = stack.pop()
            stack += [(c, chain + [table[c][1]]) for c in children.get(pid, []) if c in table]
            role = _role(table[pid][1], chain[:-1])
            if role is None:
                continue
            try:
                rss, pss = _memory(pid)
                self.cpu[pid] = (role, _cpu_seconds(pid))
            except (OSError, IndexError, ValueError):
                continue  # it exited meanwhile
            side = "coordinator" if role in COORDINATOR_ROLES else "silos"
            totals[side]["rss"] += rss
            totals[side]["pss"] += pss
            one = self.peak_one.setdefault(role, {"rss": 0, "pss": 0})
            one["rss"], one["pss"] = max(one["rss"], rss), max(one["pss"], pss)
            count[role] = count.get(role, 0) + 1
        for side, t in totals.items():
            peak = self.peak_total.setdefault(side, {"rss": 0, "pss": 0})
            peak["rss"], peak["pss"] = max(peak["rss"], t["rss"]), max(peak["pss"], t["pss"])
        for role, c in count.items():
            self.peak_count[role] = max(self.peak_count.get(role, 0), c)
        self.samples += 1

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds per role (processes that exited between samples count what was last seen)."""
        out: dict[str, float] = {}
        for role, secs in self.cpu.values():
            out[role] = out.get(role, 0.0) + secs
        return {r: round(s, 1) for r, s in sorted(out.items())}


# ---- one run -------------------------------------------------------------------------------------
def run_scale(n: int, rounds: int, work: Path, layout: str = "host", timeout: float = 3600.0,
              node_poll: float = 0.25) -> dict[str, Any]:
    """One real study with N silos; the measurements, or raises if it did not complete.

    layout "host": the silos as one `silo-node host` (libraries imported once, a fork per
    silo); "separate": one `silo-node start` process each, as at real hospitals."""
    study = load_study(shipped_study())
    cohorts = shard_cohorts(n, work / "cohorts", study.cohort.label_column, study.cohort.min_rows)
    holder = next(name for name in cohorts if name.startswith("cleveland"))
    study_path, changed = scale_study(n, rounds, holder, work)
    seen: dict[str, float] = {}
    started = time.monotonic()

    def progress(summary: dict) -> None:
        seen.setdefault(str(summary.get("status")), round(time.monotonic() - started, 2))

    with Sampler() as sampler:
        summary = run_local_study(study_path, work / "state", cohorts, timeout=timeout, on_progress=progress,
                                  silo_host=layout == "host", node_poll=node_poll)
    if summary.get("status") != "completed":
        raise RuntimeError(f"{n} silos: study did not complete: {summary.get('status')}: {summary.get('reason')}")
    history = summary["history"]
    secs = [h["seconds"] for h in history]
    mib = 1 << 20
    return {
        "silos": n, "layout": layout, "node_poll_s": node_poll, "rounds": len(history), "study_changes": changed,
        "cohort_rows": {name: pq.read_metadata(p).num_rows for name, p in cohorts.items()},
        "contributed_per_round": [len(h["replied"]) for h in history],
        "refused_per_round": [h["refused"] for h in history],
        "round_seconds": [round(s, 2) for s in secs], "median_round_s": round(statistics.median(secs), 2),
        "time_to_first_round_s": seen.get("round 1 running"), "phases_first_seen_s": seen,
        "wall_s": round(summary["wall_seconds"], 1),
        "bytes_per_round": [h.get("bytes_down", 0) + h.get("bytes_up", 0) for h in history],
        "bytes_down_per_round": [h.get("bytes_down", 0) for h in history],
        "bytes_up_per_round": [h.get("bytes_up", 0) for h in history],
        "coordinator_peak_rss_mib": round(sampler.peak_total.get("coordinator", {}).get("rss", 0) / mib, 1),
        "silos_peak_rss_mib": round(sampler.peak_total.get("silos", {}).get("rss", 0) / mib, 1),
        "silos_peak_pss_mib": round(sampler.peak_total.get("silos", {}).get("pss", 0) / mib, 1),
        "per_process_peak_mib": {r: {k: round(v / mib, 1) for k, v in m.items()} for r, m in sorted(sampler.peak_one.items())},
        "most_processes_at_once": dict(sorted(sampler.peak_count.items())),
        "cpu_seconds_by_role": sampler.cpu_by_role(), "memory_samples": sampler.samples,
        "pooled_test_accuracy": (summary.get("final") or {}).get("pooled_test_accuracy"),
        "load_average_after": list(os.getloadavg()),
    }


def limit_threads(threads: int) -> None:
    """Every process we start inherits this: many silos share 2 cores, so one BLAS/OpenMP
    thread each instead of one per core per process."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)


def fit_growth(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Least-squares line through (silos, median round seconds): seconds per added silo."""
    if len(rows) < 2:
        return {}
    x = np.array([r["silos"] for r in rows], dtype=float)
    y = np.array([r["median_round_s"] for r in rows], dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    mem = np.polyfit(x, [r["silos_peak_pss_mib"] for r in rows], 1)[0]
    return {"round_s_per_added_silo": round(float(slope), 3), "round_s_intercept": round(float(intercept), 2),
            "silo_pss_mib_per_added_silo": round(float(mem), 1)}


def plot(rows: list[dict[str, Any]], growth: dict[str, float], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["layout"] == "separate":
            ax.plot([r["silos"]], [r["median_round_s"]], "s", color="tab:orange", label="one process per silo")
    rows = [r for r in rows if r["layout"] == "host"]
    x = [r["silos"] for r in rows]
    ax.plot(x, [r["median_round_s"] for r in rows], "o-", label="median round (silo host)")
    for r in rows:
        ax.scatter([r["silos"]] * len(r["round_seconds"]), r["round_seconds"], s=10, color="grey")
    if growth:
        xs = np.array([min(x), max(x)])
        ax.plot(xs, growth["round_s_intercept"] + growth["round_s_per_added_silo"] * xs, "--",
                label=f"fit: {growth['round_s_per_added_silo']:.2f} s per added silo")
    ax.set_xlabel("silo processes (each: service + SuperNode + SuperExec)")
    ax.set_ylabel("seconds per round")
    ax.set_title("Round time vs silos, one coordinator, 2 cores")
    ax.legend()
    return save_figure(fig, path)


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="Scale: the shipped heart study (CKKS + DP), real processes on 127.0.0.1")
    for col in ("silos", "layout", "median s/round", "first round at s", "coordinator RSS MiB", "silos RSS MiB",
                "silos PSS MiB", "PSS/silo MiB", "KB/round (down+up)", "contributed"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["silos"]), r["layout"], f"{r['median_round_s']:.1f}", f"{r['time_to_first_round_s']}",
                      f"{r['coordinator_peak_rss_mib']:.0f}", f"{r['silos_peak_rss_mib']:.0f}",
                      f"{r['silos_peak_pss_mib']:.0f}", f"{r['silos_peak_pss_mib'] / r['silos']:.0f}",
                      f"{statistics.median(r['bytes_per_round']) / 1000:.0f}",
                      "/".join(str(c) for c in r["contributed_per_round"]))
    console.print(table)


def mem_available_mib() -> int:
    """MemAvailable: what the other users of this shared machine left us."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return -1


def attempt(n: int, layout: str, rounds: int, node_poll: float) -> dict[str, Any]:
    """One N; a run that does not complete is kept as a row that says why (the others still count)."""
    free = mem_available_mib()
    with tempfile.TemporaryDirectory(prefix=f"fedcohort-scale-{n}-") as tmp:
        try:
            row = run_scale(n, rounds, Path(tmp), layout, node_poll=node_poll)
        except (RuntimeError, OSError) as exc:
            row = {"silos": n, "layout": layout, "status": "failed", "reason": str(exc)[:500]}
    return {"status": "completed", **row, "mem_available_mib_before": free}


def kept_rows(path: Path) -> list[dict[str, Any]]:
    """The completed runs of an earlier, interrupted invocation (each row has its own load average)."""
    try:
        rows = json.loads(path.read_text())["rows"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return [dict(r, resumed=True) for r in rows if r.get("status") == "completed"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--silos", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--separate", type=int, nargs="*", default=[4],
                    help="silo counts also run as one `silo-node start` process per silo (for comparison)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/BLAS threads per process")
    ap.add_argument("--node-poll", type=float, default=0.25,
                    help="SuperNode idle poll, s (shipped 0.25; many co-located silos poll less often)")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON path; the PNG goes next to it")
    ap.add_argument("--resume", action="store_true",
                    help="keep the completed runs already in --out and run only the missing ones (in the order given)")
    args = ap.parse_args(argv)
    began = time.perf_counter()
    console = Console()
    limit_threads(args.threads)
    load_before = list(os.getloadavg())
    import flwr
    import tenseal
    import torch

    versions = {"flwr": flwr.__version__, "torch": torch.__version__, "tenseal": tenseal.__version__}
    rows: list[dict[str, Any]] = kept_rows(args.out) if args.resume else []
    for n, layout in [(n, "host") for n in args.silos] + [(n, "separate") for n in args.separate]:
        if any((r["silos"], r["layout"]) == (n, layout) for r in rows):
            continue
        rows.append(attempt(n, layout, args.rounds, args.node_poll))
        r = rows[-1]
        console.print(f"{n} silos ({layout}): " + (
            f"median {r['median_round_s']:.1f} s/round, first round at {r['time_to_first_round_s']} s, "
            f"silos PSS {r['silos_peak_pss_mib']:.0f} MiB, load {r['load_average_after'][0]:.1f}"
            if r["status"] == "completed" else f"FAILED: {r['reason']}"))
        report = make_report(rows, args.threads, load_before)  # after every N: a late failure keeps the rest
        write_report(report, args.out, "bench/scale.py", began, **versions)
    done = [r for r in rows if r["status"] == "completed"]
    plotted = plot(done, report["growth"], args.out.with_suffix(".png"))
    print_table(done, console)
    if report["growth"]:
        g = report["growth"]
        console.print(f"growth: {g['round_s_per_added_silo']:.2f} s per added silo per round; "
                      f"silo memory {g['silo_pss_mib_per_added_silo']:.0f} MiB PSS per added silo")
    console.print(f"wrote {args.out}" + (f" and {args.out.with_suffix('.png')}" if plotted else ""))
    return 0 if len(done) == len(rows) else 1


def make_report(rows: list[dict[str, Any]], threads: int, load_before: list[float]) -> dict[str, Any]:
    return {
        "rows": rows, "growth": fit_growth([r for r in rows if r["layout"] == "host" and r["status"] == "completed"]),
        "growth_over": "layout host, completed runs", "threads_per_process": threads,
        "cohorts": "each hospital file split into disjoint shards in proportion to its rows (largest remainder, "
                   f"at least one each, every shard >= the study's min_rows), dealt round-robin by label and completeness "
                   f"after a seeded shuffle (seed {SHARD_SEED}); N=4 is the four files; no rows or features invented",
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "memory_gib": round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
            "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
            "shared": "shared with other users' jobs while measured: compare within one run"},
    }


if __name__ == "__main__":
    raise SystemExit(main())
