"""DP-SGD cost (BENCHMARKS.md section 3): private local training against non-private, per 100 steps.

Why: a DP study must not make a round noticeably slower than a plain one; the bar is
<= 1.5x non-private local training. Opacus' engine (per-sample gradients by hooks) was
2.7-2.9x on the heart model; the vectorised engine uses the closed-form per-sample
gradient of logistic regression. All three methods run the project's own functions:
`silo_node.training.local_train`, and `silo_node.dp.dp_local_train` with each engine,
on the heart data (13 features, batch 4): all 740 rows as in section 3, and Cleveland's
199 training rows. Also timed, once per round or study: the ledger's decide + durable
charge, and the noise calibration.

    python bench/dp_cost.py [--repeats 15] [--out bench/results/dp_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find common.py

from common import ROOT, base_study, load_designs, pooled_design  # noqa: E402
from policies.privacy import PrivacyPolicy  # noqa: E402
from policies.study import StudySpec  # noqa: E402
from silo_node.dp import dp_local_train, noise_multiplier_for, plan_for_silo  # noqa: E402
from silo_node.features import moments, normalise, normaliser_from_moments  # noqa: E402
from silo_node.ledger import PrivacyLedger  # noqa: E402
from silo_node.training import derive_seed, init_weights, local_train  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "dp_cost.json"
BAR = 1.5  # DP-SGD may cost at most 1.5x non-private local training
PRIVACY = PrivacyPolicy(epsilon=1.0, delta=1e-3)  # FLamby's delta; the noise level does not change the cost
STEPS = 100


def datasets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (normalised x, y)}: all 740 heart rows, and Cleveland's training rows."""
    designs = load_designs(base_study())
    pooled = pooled_design(designs)
    cleveland = designs["cleveland"]
    out = {}
    for name, x, y in (("heart_all_740", pooled.x, pooled.y), ("cleveland_train", cleveland.x_train, cleveland.y_train)):
        mean, std = normaliser_from_moments(moments(x))
        out[name] = (normalise(x, mean, std), y)
    return out


def methods(study: StudySpec, sigma: float) -> dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]]:
    """The three ways to run STEPS local steps from weights w; each takes (w, x, y, seed)."""
    t = study.training
    return {
        "nonprivate_local_train": lambda w, x, y, s: local_train(w, x, y, study, s),
        "dp_opacus_engine": lambda w, x, y, s: dp_local_train(w, x, y, t, PRIVACY, sigma, s, engine="opacus"),
        "dp_vectorised": lambda w, x, y, s: dp_local_train(w, x, y, t, PRIVACY, sigma, s, engine="vectorised"),
    }


def time_method(fn: Callable, w: np.ndarray, x: np.ndarray, y: np.ndarray, repeats: int) -> list[float]:
    """Seconds per call (= per STEPS steps), after one warm-up call (imports, allocator)."""
    fn(w, x, y, 0)
    out = []
    for r in range(repeats):
        start = time.perf_counter()
        fn(w, x, y, derive_seed("dp_cost", r))
        out.append(time.perf_counter() - start)
    return out


def ledger_round_seconds(sigma: float, q: float, rounds: int) -> float:
    """Median seconds of decide + durable charge per round, on a real temporary ledger."""
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.load(tmp, "bench", policy_hash="bench", privacy=PrivacyPolicy(epsilon=1e6, delta=1e-3))
        secs = []
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            ledger.decide(sigma, q, STEPS, round=r)
            ledger.charge(r, f"nonce-{r}", sigma, q, STEPS)
            secs.append(time.perf_counter() - start)
    return statistics.median(secs)


def calibration_seconds(study: StudySpec, n_train: int) -> float:
    noise_multiplier_for.cache_clear()
    start = time.perf_counter()
    plan_for_silo(study.training, PRIVACY, n_train)
    return time.perf_counter() - start


def measure(repeats: int) -> dict:
    import torch

    torch.set_num_threads(1)  # as bench/accuracy_heart.py: a 14-parameter model gains nothing from threads
    base = base_study()
    study = base.model_copy(update={"training": base.training.model_copy(update={"local_steps": STEPS})})
    rows = []
    for name, (x, y) in datasets().items():
        plan = plan_for_silo(study.training, PRIVACY, len(y))
        w = init_weights(study, x.shape[1])
        secs = {m: time_method(fn, w, x, y, repeats) for m, fn in methods(study, plan.noise_multiplier).items()}
        nonprivate = statistics.median(secs["nonprivate_local_train"])
        for m, s in secs.items():
            med = statistics.median(s)
            rows.append({
                "method": m, "data": name, "rows": len(y), "batch_size": study.training.batch_size,
                "noise_multiplier": None if m.startswith("nonprivate") else plan.noise_multiplier,
                "seconds_per_100_steps": med, "seconds_per_epoch": med * len(y) / study.training.batch_size / STEPS,
                "ratio_to_nonprivate": med / nonprivate, "meets_bar": med / nonprivate <= BAR, "seconds_all": s,
            })
    cleveland_rows = next(r["rows"] for r in rows if r["data"] == "cleveland_train")
    plan = plan_for_silo(study.training, PRIVACY, cleveland_rows)
    return {
        "rows": rows,
        "bar_ratio_to_nonprivate": BAR,
        "overheads": {
            "ledger_decide_and_charge_s_per_round": ledger_round_seconds(plan.noise_multiplier, plan.sample_rate, 15),
            "noise_calibration_s_once_per_study": calibration_seconds(study, cleveland_rows),
        },
        "repeats": repeats,
        "generated_by": "bench/dp_cost.py",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": __import__("opacus").__version__,
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_1min_after": os.getloadavg()[0],  # timings are noisy on a shared, loaded machine
    }


def show(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"DP-SGD cost per {STEPS} steps (batch 4, 13 features; bar <= {BAR}x non-private)")
    for col in ("data", "method", "ms / 100 steps", "ms / epoch", "x non-private", "bar"):
        table.add_column(col)
    for r in report["rows"]:
        table.add_row(f"{r['data']} ({r['rows']})", r["method"], f"{1e3 * r['seconds_per_100_steps']:.2f}",
                      f"{1e3 * r['seconds_per_epoch']:.2f}", f"{r['ratio_to_nonprivate']:.2f}",
                      "ok" if r["meets_bar"] else "MISSED")
    console = Console(width=110)
    console.print(table)
    o = report["overheads"]
    console.print(f"ledger decide + durable charge: {1e3 * o['ledger_decide_and_charge_s_per_round']:.1f} ms per round; "
                  f"noise calibration: {o['noise_calibration_s_once_per_study']:.2f} s once per study")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    report = measure(args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    show(report)
    vectorised = [r for r in report["rows"] if r["method"] == "dp_vectorised"]
    return 0 if all(r["meets_bar"] for r in vectorised) else 1


if __name__ == "__main__":
    sys.exit(main())
