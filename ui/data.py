"""Everything the pages read, in one place: the store, summary.json, audit logs, bench numbers.

Why one module: every page shows the same study from the same sources, and the rules for
combining them live here once. The store is the source of truth; a finished demo that has
not written the store yet still has `STATE/coordinator/summary.json`, so when the store has
nothing for a study the pages fall back to that file, read-only, and say so. Numbers from
summary.json are used only when its study id and policy hash match the study shown.

Functions here return plain values and pandas frames so tests can call them without a browser.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from coordinator.store import SiloRow, Store, StudyRow, needs_manual_approval, open_store
from policies.audit import AUDIT_FILE, AUDIT_KEY_FILE, PartyKey
from policies.errors import PolicyError
from policies.study import STUDIES_DIR, StudySpec, load_study, load_study_text
from policies.yamlsafe import MAX_POLICY_BYTES

STATE_ENV = "FEDCOHORT_STATE_DIR"
DB_ENV = "FEDCOHORT_DB_URL"
ROOT = Path(__file__).resolve().parent.parent
BENCH_FILE = ROOT / "bench" / "results" / "accuracy_heart.json"
BENCH_LABEL = "from bench/results/accuracy_heart.json"
HEART_STUDY = "heart-disease"
SUMMARY_FILES = ("summary.json", "demo_summary.json")  # the ServerApp's, then the demo CLI's copy
METRICS = ("accuracy", "sensitivity", "specificity", "auroc", "loss")
SILO_COLUMNS = ("n", "accuracy", "sensitivity", "specificity", "tp", "fp", "tn", "fn")
SUPPRESSED = "suppressed"


# ----------------------------------------------------------------------------- where things are


def state_dir() -> Path:
    """The coordinator's state dir, from FEDCOHORT_STATE_DIR (`coordinator ui` sets it)."""
    return Path(os.environ.get(STATE_ENV) or ".fedcohort").resolve()


def db_url() -> str | None:
    return os.environ.get(DB_ENV) or None


@st.cache_resource(show_spinner=False)
def _cached_store(url: str | None, state: str) -> Store:
    """One Store per process and URL: Streamlit sessions are threads, and a Store is thread-safe."""
    return open_store(url, Path(state))


def get_store() -> Store:
    return _cached_store(db_url(), str(state_dir()))


# ----------------------------------------------------------------------------- studies


@dataclass(frozen=True)
class StudyView:
    """A study version as the pages show it, from the store or (read-only) from summary.json."""

    id: str
    version: int
    name: str
    status: str
    policy_hash: str
    spec: StudySpec | None
    in_store: bool
    created_by: str = ""
    updated_at: datetime | None = None

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def label(self) -> str:
        return f"{self.id} v{self.version}" + ("" if self.in_store else " (summary.json, read-only)")


def _view(row: StudyRow) -> StudyView:
    try:
        spec = row.spec
    except PolicyError:  # a policy this release cannot parse: still listed, not usable
        spec = None
    return StudyView(row.id, row.version, row.name, row.status, row.policy_hash, spec, True, row.created_by,
                     row.updated_at)


def read_summary(state: Path) -> dict[str, Any] | None:
    """The coordinator's study summary (per-round history, final metrics), if a run wrote one."""
    for name in SUMMARY_FILES:
        try:
            data = json.loads((state / "coordinator" / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("study_id"):
            return data
    return None


def _spec_with_hash(state: Path, policy_hash: str) -> StudySpec | None:
    """The policy a summary was made under: the demo's STATE/study.yaml or a shipped template."""
    for path in [state / "study.yaml", *sorted(STUDIES_DIR.glob("*.yaml"))]:
        try:
            spec = load_study(path)
        except PolicyError:
            continue
        if spec.policy_hash() == policy_hash:
            return spec
    return None


def summary_view(state: Path, summary: Mapping[str, Any]) -> StudyView:
    spec = _spec_with_hash(state, str(summary.get("policy_hash", "")))
    return StudyView(str(summary["study_id"]), spec.version if spec else 1, spec.name if spec else str(summary["study_id"]),
                     str(summary.get("status", "unknown")), str(summary.get("policy_hash", "")), spec, False)


def study_views(store: Store, state: Path) -> list[StudyView]:
    """All study versions in the store (newest first per study); else the summary's study."""
    views = [_view(r) for r in store.list_studies(all_versions=True)]
    views.sort(key=lambda v: (v.id, -v.version))
    if views:
        return views
    summary = read_summary(state)
    return [summary_view(state, summary)] if summary else []


def find_view(views: Iterable[StudyView], key: str | None) -> StudyView | None:
    views = list(views)
    return next((v for v in views if v.key == key), views[0] if views else None)


def templates() -> dict[str, Path]:
    """Shipped study policies (policies/studies/*.yaml) by file stem."""
    return {p.stem: p for p in sorted(STUDIES_DIR.glob("*.yaml"))}


def parse_policy(text: str, source: str) -> StudySpec:
    return load_study_text(text, source)


def upload_text(name: str, raw: bytes) -> str:
    """An uploaded policy as text, refused (before any decoding or parsing) when too big or not UTF-8."""
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{name}: {len(raw):,} bytes is above the {MAX_POLICY_BYTES:,}-byte limit for a study "
                          "policy; refused (nothing was read or stored)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{name}: not UTF-8 text (byte {exc.start}); a study policy is a YAML text file") from None


def summary_for(state: Path, study: StudyView) -> dict[str, Any] | None:
    """summary.json if it belongs to exactly this study version (same id and policy hash)."""
    summary = read_summary(state)
    if summary and summary.get("study_id") == study.id and summary.get("policy_hash") == study.policy_hash:
        return summary
    return None


# ----------------------------------------------------------------------------- metrics


def _metric_row(round_no: int, metrics: Mapping[str, Any], source: str) -> dict[str, Any]:
    row: dict[str, Any] = {"round": round_no, "source": source}
    for name in (*METRICS, "n"):
        row[name] = metrics.get(name)
    for name in ("accuracy", "sensitivity", "specificity"):
        for side in ("ci_low", "ci_high"):
            row[f"{name}_{side}"] = metrics.get(f"{name}_{side}")
    return row


def pooled_history(store: Store | None, study: StudyView, summary: Mapping[str, Any] | None) -> pd.DataFrame:
    """Pooled test metrics of the model after `round` training rounds (0 = initial model).

    From the store's "pooled" evaluations; else from summary.json, where history entry r holds
    the model that entered round r (after r-1 rounds) and `final` the model after the last round.
    """
    rows: list[dict[str, Any]] = []
    if store is not None and study.in_store:
        rows = [_metric_row(e.round_no, e.metrics, "store")
                for e in store.list_evaluations(study.id, version=study.version) if e.scope == "pooled"]
    if not rows and summary:
        for h in summary.get("history") or []:
            if h.get("pooled_entering_model"):
                rows.append(_metric_row(int(h["round"]) - 1, h["pooled_entering_model"], "summary.json"))
        final = (summary.get("final") or {}).get("pooled")
        if final:
            rows.append(_metric_row(int(summary.get("rounds") or len(rows)), final, "summary.json"))
    frame = pd.DataFrame(rows)
    return frame.sort_values("round").reset_index(drop=True) if not frame.empty else frame


def shown(value: Any) -> Any:
    """A silo's suppressed cell (None or "<k") as the word "suppressed"; numbers unchanged."""
    if value is None or (isinstance(value, str) and value.startswith("<")):
        return SUPPRESSED
    return value


def _silo_row(round_no: int, silo: str, report: Mapping[str, Any]) -> dict[str, Any]:
    return {"round": round_no, "silo": silo, **{c: shown(report.get(c)) for c in SILO_COLUMNS}}


def per_silo_table(store: Store | None, study: StudyView, summary: Mapping[str, Any] | None) -> pd.DataFrame:
    """Each silo's own (small-cell suppressed) test metrics per round, latest model last."""
    rows: list[dict[str, Any]] = []
    if store is not None and study.in_store:
        rows = [_silo_row(e.round_no, e.scope, e.metrics)
                for e in store.list_evaluations(study.id, version=study.version) if e.scope != "pooled"]
    if not rows and summary:
        for h in summary.get("history") or []:
            for silo, rep in (h.get("per_silo") or {}).items():
                rows.append(_silo_row(int(h["round"]) - 1, silo, rep))
        for silo, rep in ((summary.get("final") or {}).get("per_silo") or {}).items():
            rows.append(_silo_row(int(summary.get("rounds") or 0), silo, rep))
    frame = pd.DataFrame(rows, columns=["round", "silo", *SILO_COLUMNS])
    return frame.astype(object).sort_values(["round", "silo"]).reset_index(drop=True)


def evaluation_csv(pooled: pd.DataFrame, silos: pd.DataFrame) -> bytes:
    """One table for spreadsheets: pooled rows (silo "pooled") then each silo's rows."""
    pooled_rows = pooled.assign(silo="pooled") if not pooled.empty else pd.DataFrame(columns=["silo"])
    table = pd.concat([pooled_rows, silos], ignore_index=True, sort=False)
    first = [c for c in ("round", "silo") if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]].to_csv(index=False).encode("utf-8")


@dataclass(frozen=True)
class Reference:
    label: str
    value: float
    kind: str  # "published" (FLamby's paper) or "measured" (our local-only baseline)


def reference_lines(path: Path = BENCH_FILE) -> list[Reference]:
    """FLamby's published accuracies and our local-only baselines, to draw on the heart study.

    FLamby publishes the mean of the 4 hospitals' test accuracies; the local-only baselines are
    our measured pooled-test accuracy of a model trained at one hospital alone.
    """
    try:
        bench = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    published = bench.get("flamby_reference") or {}
    refs = [Reference(f"FLamby {name} (published, mean of 4 hospitals)", float(published[key]), "published")
            for key, name in (("fedavg", "FedAvg"), ("fedyogi", "FedYogi")) if key in published]
    pooled = next((v for k, v in published.items() if k.startswith("pooled")), None)
    if pooled is not None:
        refs.append(Reference("FLamby pooled training (published, mean of 4 hospitals)", float(pooled), "published"))
    for name, method in sorted((bench.get("methods") or {}).items()):
        if name.startswith("local_") and method.get("pooled_test_accuracy") is not None:
            refs.append(Reference(f"local-only {name[6:]} (measured, pooled test set)",
                                  float(method["pooled_test_accuracy"]), "measured"))
    return refs


# ----------------------------------------------------------------------------- rounds and silos


def rounds_table(store: Store | None, study: StudyView, summary: Mapping[str, Any] | None) -> pd.DataFrame:
    """Who was asked, who replied and who refused (with the silo's reason), per round."""
    rows: list[dict[str, Any]] = []
    if store is not None and study.in_store:
        for r in store.list_rounds(study.id, version=study.version):
            rows.append({"round": r.round_no, "status": r.status, "asked": len(r.asked), "replied": ", ".join(r.replied),
                         "refused": "; ".join(f"{s}: {why}" for s, why in sorted(r.refused.items())),
                         "started": r.started_at, "finished": r.finished_at})
    if not rows and summary:
        for h in summary.get("history") or []:
            refused = h.get("refused") or {}
            rows.append({"round": h["round"], "status": "finished", "asked": len(h.get("asked") or []),
                         "replied": ", ".join(h.get("replied") or []),
                         "refused": "; ".join(f"{s}: {why}" for s, why in sorted(refused.items())),
                         "seconds": round(float(h.get("seconds") or 0.0), 1)})
    return pd.DataFrame(rows)


def privacy_table(store: Store | None, study: StudyView, summary: Mapping[str, Any] | None) -> pd.DataFrame:
    """Each silo's latest reported cumulative epsilon against its budget."""
    latest: dict[str, dict[str, Any]] = {}
    if store is not None and study.in_store:
        for p in store.list_privacy_spend(study.id, version=study.version):  # ordered by silo, round
            before = latest.get(p.silo, {}).get("epsilon_spent")
            latest[p.silo] = {"silo": p.silo, "round": p.round_no, "epsilon_spent": p.epsilon_spent_total,
                              "epsilon_budget": p.epsilon_budget, "rounds_left": p.rounds_left,
                              "after_next_round": next_round_estimate(before, p.epsilon_spent_total)}
    if not latest and summary:
        for h in summary.get("history") or []:
            for silo, p in (h.get("privacy") or {}).items():
                latest[silo] = {"silo": silo, "round": h["round"], "epsilon_spent": p.get("epsilon_spent"),
                                "epsilon_budget": p.get("epsilon_budget"), "rounds_left": p.get("rounds_left")}
    return pd.DataFrame(list(latest.values()))


def next_round_estimate(before: float | None, spent: float | None) -> float | None:
    """Epsilon after the next round if it costs what the last one did.

    Only each silo's accountant knows the exact figure (and refuses a round that would
    exceed its budget); under RDP composition a round costs no more than the one before,
    so repeating the last increment is a cautious estimate for the lead deciding.
    """
    if spent is None or before is None:
        return None
    return spent + max(spent - before, 0.0)


NOT_RECORDED = "not recorded"


def connection_state(silo: SiloRow | None) -> str:
    """online / offline as the coordinator last recorded it; "not recorded" if it never did.

    A silo row can exist before any heartbeat (an enrolment creates it): without a last-seen
    time, "offline" would be a guess, so the page says it does not know.
    """
    if silo is None or silo.last_seen is None:
        return NOT_RECORDED
    return "online" if silo.online else "offline"


def validation_summary(report: Mapping[str, Any] | None) -> dict[str, Any]:
    """Counts from a silo's validation report: rows and how many rules passed, warned, failed."""
    if not report:
        return {"rows": None, "ok": None, "passed": None, "warnings": None, "failed": None}
    results = report.get("results") or []
    return {
        "rows": report.get("rows"),
        "ok": report.get("ok"),
        "passed": sum(1 for r in results if r.get("passed")),
        "warnings": sum(1 for r in results if not r.get("passed") and r.get("severity") == "warning"),
        "failed": sum(1 for r in results if not r.get("passed") and r.get("severity") == "error"),
    }


# ----------------------------------------------------------------------------- audit logs


@dataclass(frozen=True)
class PartyLog:
    party: str
    role: str
    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / AUDIT_FILE


def party_logs(state: Path) -> list[PartyLog]:
    """The coordinator's log, plus each local silo's log (a demo runs the silos under STATE/silos)."""
    logs = [PartyLog("coordinator", "coordinator", state / "coordinator")]
    logs += [PartyLog(d.name, "silo", d) for d in sorted((state / "silos").glob("*")) if (d / AUDIT_FILE).is_file()]
    return [log for log in logs if log.path.is_file()]


def party_public_keys(log: PartyLog) -> dict[str, bytes]:
    """The party's own public key, read from its key file on this machine (never created here)."""
    key_file = log.directory / AUDIT_KEY_FILE
    if not key_file.is_file():
        return {}
    return PartyKey.load_or_create(key_file).public_keys()


def audit_frame(logs: Iterable[PartyLog]) -> tuple[pd.DataFrame, list[str]]:
    """All entries of all logs for display (verification is separate); unreadable lines reported."""
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for log in logs:
        with log.path.open("r", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    e = json.loads(line)
                    rows.append({"party": log.party, "seq": e["seq"], "ts": e["ts"], "actor": e["actor"],
                                 "role": e["role"], "action": e["action"], "subject": e["subject"],
                                 "details": json.dumps(e.get("details", {}), sort_keys=True)})
                except (json.JSONDecodeError, KeyError, TypeError):
                    problems.append(f"{log.party}: line {lineno} is not a readable entry")
    frame = pd.DataFrame(rows, columns=["party", "seq", "ts", "actor", "role", "action", "subject", "details"])
    if not frame.empty:
        frame["time"] = pd.to_datetime(frame["ts"], utc=True, errors="coerce")
    return frame, problems



AT_THE_GATE = ("waiting_approval", "held")  # round statuses while the ServerApp's gate waits on them


def offer(store: Store, study: StudyView) -> tuple[int, bool] | None:
    """The round to decide and whether the coordinator is already waiting on it (else: ahead)."""
    round_no = next_round_to_decide(store, study)
    if round_no is None:
        return None
    rnd = store.get_round(study.id, round_no, version=study.version)
    return round_no, rnd is not None and rnd.status in AT_THE_GATE


def status_now(store: Store, study: StudyView) -> str:
    """The study version's status in the store now (a view's status is from the page's last run)."""
    return store.get_study(study.id, study.version).status if study.in_store else study.status


def next_round_to_decide(store: Store, study: StudyView) -> int | None:
    """The round the lead should decide now, or None.

    First a round the coordinator is waiting on (it asked the store for approval: waiting or
    held). Otherwise the lowest gated training round after the last started one, so a lead may
    decide ahead; only one round is offered at a time, so the lead decides with the previous
    round's results in hand. Rounds the policy auto-approves need no decision. The statistics
    round 0 is offered only when the coordinator asks for it: today's ServerApp gates training
    rounds only, and a decision that gates nothing must not look like one that does.
    """
    if study.spec is None or not study.in_store:
        return None
    rounds = {r.round_no: r for r in store.list_rounds(study.id, version=study.version)}
    waiting = sorted(n for n, r in rounds.items() if r.status in AT_THE_GATE)
    if waiting:
        return waiting[0]
    started = [n for n, r in rounds.items() if r.status in ("running", "finished", "failed")]
    first = max(started) + 1 if started else 1
    for n in range(max(first, 1), study.spec.training.rounds + 1):
        if not needs_manual_approval(study.spec, n):
            continue
        return n if n not in rounds else None  # decided already and not started yet: nothing to add
    return None


__all__ = [
    "BENCH_FILE", "BENCH_LABEL", "AT_THE_GATE", "NOT_RECORDED", "connection_state", "offer", "DB_ENV", "HEART_STUDY", "METRICS", "STATE_ENV", "SUPPRESSED", "PartyLog", "Reference",
    "StudyView", "audit_frame", "db_url", "evaluation_csv", "find_view", "get_store", "parse_policy", "party_logs",
    "party_public_keys", "per_silo_table", "pooled_history", "privacy_table", "read_summary", "reference_lines",
    "next_round_to_decide", "rounds_table", "state_dir", "status_now", "study_views", "summary_for", "summary_view", "templates", "upload_text", "validation_summary",
]
