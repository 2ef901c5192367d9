"""Shared helpers for the benchmarks: study variants and an in-process federation.

Benchmarks must measure the code a hospital runs, so everything here only wires the
project's own `Silo` (silo_node.worker) and `StudyState` (coordinator.rounds) together,
exactly as the Flower apps do, minus the transport. Nothing here trains or aggregates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar

import numpy as np

from coordinator.rounds import StudyState
from policies.metrics import metrics_from_counts
from policies.privacy import PrivacyPolicy
from policies.study import StudySpec, load_study, shipped_study
from policies.update import sum_vectors
from silo_node.cohort import read_cohort
from silo_node.features import Design, build_design
from silo_node.worker import Silo

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = ROOT / "sample_data"
HOSPITALS: tuple[str, ...] = ("cleveland", "hungary", "switzerland", "va")
FLAMBY_SEEDS: tuple[int, ...] = (42, 43, 44, 45, 46)

Normalisation = Literal["pooled", "local", "none"]


def base_study() -> StudySpec:
    """The shipped heart-disease study, validated once; variants are copies of it."""
    return load_study(shipped_study("heart_disease"))


def study_variant(
    base: StudySpec, *, seed: int, normalisation: Normalisation | None = None,
    min_silos: int | None = None, private: bool = False, privacy: PrivacyPolicy | None = None, **training: Any,
) -> StudySpec:
    """Copy of `base` with a seed, optional normalisation/min_silos and training overrides.

    `private` keeps the shipped DP budget; `privacy` replaces it with another one. Encryption
    is off (accuracy does not depend on it, see he_precision.py, which turns it back on).

    `model_copy(update=...)` skips validation on these frozen models; that is acceptable
    for a benchmark, and `policy_hash()` of the copy still identifies the variant.
    """
    update: dict[str, Any] = {"seed": seed, "training": base.training.model_copy(update=training), "encryption": "none"}
    if privacy is not None:
        update["privacy"] = privacy
    elif not private:
        update["privacy"] = "none"
    if normalisation is not None:
        update["features"] = base.features.model_copy(update={"normalisation": normalisation})
    if min_silos is not None:
        update["min_silos"] = min_silos
    return base.model_copy(update=update)


def load_designs(study: StudySpec, names: tuple[str, ...] = HOSPITALS) -> dict[str, Design]:
    """Each hospital's design (features, labels, FLamby split), built once.

    The design depends only on the feature pipeline and split, not on seed, training or
    normalisation, so the benchmark reads each Parquet file once and reuses it per run.
    """
    return {n: build_design(read_cohort(SAMPLE_DATA / f"{n}.parquet"), study) for n in names}


def pooled_design(designs: dict[str, Design]) -> Design:
    """All hospitals' rows as one design: union of train rows, union of test rows."""
    xs, ys, train, test, offset = [], [], [], [], 0
    for d in designs.values():
        xs.append(d.x)
        ys.append(d.y)
        train.append(d.train_idx + offset)
        test.append(d.test_idx + offset)
        offset += len(d.y)
    return Design(x=np.concatenate(xs), y=np.concatenate(ys),
                  train_idx=np.concatenate(train), test_idx=np.concatenate(test))


def silos_for(study: StudySpec, designs: dict[str, Design]) -> list[Silo]:
    """Silos for one run; a DP study gets fresh ledgers in a temporary state directory."""
    root = Path(tempfile.mkdtemp(prefix="fedcohort-bench-")) if study.dp else None
    return [Silo(name=n, study=study, design=d, state_dir=root / n if root else None) for n, d in designs.items()]


def federate(study: StudySpec, silos: list[Silo]) -> StudyState:
    """Statistics round, then `rounds` training rounds: the coordinator only sums."""
    st = StudyState(study.id, study.policy_hash())
    st.add_stats([s.stats_contribution(nonce="bench-stats") for s in silos])
    for r in range(1, study.training.rounds + 1):
        st.add_round([s.train(r, st.stats_sum, st.aggregates, nonce=f"bench-{r}").update for s in silos])
    return st


def accuracies(per_silo_counts: dict[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy per hospital, metrics of the pooled test set) from evaluation counts."""
    centre = {n: metrics_from_counts(c)["accuracy"] for n, c in per_silo_counts.items()}
    return centre, metrics_from_counts(sum_vectors(list(per_silo_counts.values())))


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def seeds_and_out(doc: str, default_out: Path, argv: list[str] | None, jobs: bool = False) -> argparse.Namespace:
    """The accuracy benchmarks' command line: --seeds (FLamby's by default), --out, optionally --jobs."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(FLAMBY_SEEDS), help="default: FLamby's 42..46")
    ap.add_argument("--out", type=Path, default=default_out, help="JSON path; the PNG goes next to it")
    if jobs:
        ap.add_argument("--jobs", type=int, default=1, help="independent runs in this many processes")
    return ap.parse_args(argv)


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Callable[[str], None]]:
    """A progress bar over `total` runs; yields done(description), called after each run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("runs", total=total)

        def done(description: str) -> None:
            bar.update(task, description=description)
            bar.advance(task)

        yield done


def save_figure(fig: Any, path: Path) -> bool:
    """Lay out, write as PNG and close a matplotlib figure; True, for `wrote ... and <png>`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out: Path, script: str, started: float, **versions: str) -> None:
    """Add provenance (script, Python and library versions, seconds since `started`) and write the JSON."""
    report.update({"generated_by": script, "python": platform.python_version(), **versions,
                   "seconds": round(time.perf_counter() - started, 2)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


Task = TypeVar("Task")
Outcome = TypeVar("Outcome")


def run_all(fn: Callable[[Task], Outcome], tasks: list[Task], labels: list[str], jobs: int,
            done: Callable[[str], None]) -> list[Outcome]:
    """fn over the tasks, in order, in `jobs` forked processes (1: this process).

    For independent runs (own ledgers, own noise): parallelism changes wall time only.
    `fn` must be a module-level function so the pool can send it.
    """
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(multiprocessing.get_context("fork").Pool(jobs)) if jobs > 1 else None
        outcomes = pool.imap(fn, tasks) if pool else map(fn, tasks)
        out = []
        for label, outcome in zip(labels, outcomes):
            out.append(outcome)
            done(label)
        return out
