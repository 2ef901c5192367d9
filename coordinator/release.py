"""Releasing a study's model: the lead's request, the silos' consents, the model card.

How the release reaches the silos: the lead's request is a row in the store
(`Store.request_release`, from `coordinator study release` or the web UI). A ServerApp
delivers a pending request in one of two ways:

- after the study: `coordinator study release` submits a new Flower run in release mode
  (as `coordinator start` does for a resume). The ServerApp restores the final
  checkpoint (the encrypted history only), recognises each silo by the enrolment key the
  key ceremony saw, and sends every silo of the study one RELEASE message carrying the
  history;
- at the end of the study run, when the request was made while the study was running
  (the UI allows it once the last round is under way): the same exchange, before the
  closing exchange, so the silos' final audit heads cover it.

Each silo answers by its own consent policy with the rounded final model or a refusal.
The coordinator keeps the model only when the silos that consented and sent agreeing
models (equal to the rounding) number at least the study's `min_silos`: the same
minimum the silos enforce on every aggregate, so no model leaves with fewer hospitals
behind it than any single round had. Otherwise the release fails, is recorded with its
reason, and nothing is stored. The coordinator never decrypts: it only compares what
the silos decrypted and rounded.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policies import messages as m
from policies.audit import AuditLog, open_party_log
from policies.errors import PolicyError
from policies.model_card import (
    CARD_FILE, CARD_FORMAT, RELEASE_DECIMALS, WEIGHTS_FILE, feature_transform, file_metadata, load_model,
    models_agree, sha256,
)
from policies.study import StudySpec
from coordinator.rounds import StudyState
from coordinator.store import ModelReleaseRow, Store, open_store

if TYPE_CHECKING:  # the ServerApp imports this module; only the type flows back
    from coordinator.certs import SuperLinkTls
    from coordinator.server_app import SiloAnswer, StudyRunner

RELEASES_DIR = "releases"  # STATE/coordinator/releases/<id>-v<version>/{model_card.json, model.safetensors}
RELEASE_SUMMARY = "release_summary.json"  # what `coordinator study release` follows
CONSENTED = "consented"


@dataclass
class ReleaseOutcome:
    """What the coordinator decided from the silos' answers."""

    consents: dict[str, str]  # silo -> "consented" or why not
    weights: bytes | None = None  # the agreed safetensors file, when released
    reason: str = ""
    agreeing: list[str] = field(default_factory=list)

    @property
    def released(self) -> bool:
        return self.weights is not None


# ---- the lead's request ----------------------------------------------------------------------


def request_release(store: Store, audit: AuditLog, study_id: str, user: str, *, version: int | None = None,
                    allow_running: bool = False, role: str | None = None) -> ModelReleaseRow:
    """Record the lead's request (store and audit log); refused, with nothing written, unless
    the study has completed (or, with `allow_running`, is still running)."""
    row = store.request_release(study_id, user, version=version, allow_running=allow_running)
    audit.append("release.requested", f"{row.study_id} v{row.study_version}", {"by": user}, actor=user, role=role)
    return row


# ---- delivering it (inside the ServerApp) ---------------------------------------------------------


def serve_release(runner: "StudyRunner", store: Store) -> None:
    """Release mode of the ServerApp: deliver the pending request from the final checkpoint."""
    spec = runner.study
    summary: dict[str, Any] = {"study_id": spec.id, "version": spec.version, "pid": os.getpid()}
    try:
        pending = store.get_release(spec.id, version=spec.version)
        if pending is None or pending.status != "requested":
            raise PolicyError(f"study {spec.id} v{spec.version} has no pending release request")
        silos_in = _restore_final(runner, store)
        nodes = runner.wait_for_silos()
        members = runner._identify(nodes, silos_in)
        runner.names = {a.node_id: a.reply.silo for a in members}
        outcome = deliver(runner, store, sorted(runner.names))
        summary |= {"status": "completed", "released": outcome.released, "reason": outcome.reason,
                    "consents": outcome.consents}
        if outcome.released:  # the study's product exists: every silo destroys the study's keys
            runner.close_study("released")
    except PolicyError as exc:
        summary |= {"status": "stopped", "released": False, "reason": str(exc)}
        if (row := store.get_release(spec.id, version=spec.version)) is not None and row.status == "requested":
            _fail(runner.audit, store, spec, {}, str(exc))
    _write_summary(runner.out_dir, summary)


def release_if_requested(runner: "StudyRunner", nodes: list[int]) -> bool:
    """End of a completed study run: deliver a request the lead made while it ran. Never fatal.
    Whether the model was released (then the closing exchange tells silos to destroy keys)."""
    if runner.book is None:
        return False
    store, spec = runner.book.store, runner.study
    row = store.get_release(spec.id, version=spec.version)
    if row is None or row.status != "requested":
        return False
    try:
        return deliver(runner, store, nodes).released
    except PolicyError as exc:
        _fail(runner.audit, store, spec, {}, str(exc))
        return False


def _restore_final(runner: "StudyRunner", store: Store) -> set[str]:
    """The final checkpoint's sums and key fingerprints; refused unless every round is in it.
    Returns the silos that were in the study at its end (the ones asked to consent)."""
    spec = runner.study
    checkpoint = store.load_last_checkpoint(spec.id, version=spec.version)
    if checkpoint is None or checkpoint.round_no != spec.training.rounds:
        got = "no checkpoint" if checkpoint is None else f"a checkpoint after round {checkpoint.round_no}"
        raise PolicyError(f"release needs the checkpoint after the last round ({spec.training.rounds}); "
                          f"the store has {got}")
    state, arrays, meta = StudyState.from_checkpoint(checkpoint.encrypted_state, spec.id, spec.policy_hash())
    state.adder = runner.state.adder
    runner.state = state
    if m.AGG_CTX in arrays:
        runner._use_context(arrays[m.AGG_CTX].tobytes())
    runner.fingerprints = dict(meta.get("fingerprints") or {})
    return set(meta.get("silos_in") or checkpoint.silos_in)


def deliver(runner: "StudyRunner", store: Store, nodes: list[int]) -> ReleaseOutcome:
    """Send RELEASE with the final history, decide, record (audit, store, files)."""
    spec = runner.study
    history = m.history_arrays(runner.state.stats_sum, runner.state.aggregates)
    answers, dropped = runner.exchange(nodes, m.RELEASE, len(runner.state.aggregates), history)
    names = runner.names | {a.node_id: a.reply.silo for a in answers}
    answered = {a.node_id for a in answers}
    silent = {names.get(n, str(n)): "no reply in time" if n in dropped else "reply failed or rejected (see audit log)"
              for n in nodes if n not in answered}
    outcome = decide(spec, answers, silent)
    for silo, answer in sorted(outcome.consents.items()):
        runner.audit.append("release.consent", f"{spec.id}/release", {"silo": silo, "answer": answer[:300]})
    if not outcome.released:
        _fail(runner.audit, store, spec, outcome.consents, outcome.reason)
        return outcome
    assert outcome.weights is not None
    row = store.get_release(spec.id, version=spec.version)
    card = build_card(spec, store, outcome, row)
    store.finish_release(spec.id, "released", outcome.consents, outcome.reason, weights=outcome.weights,
                         model_card=card, version=spec.version)
    where = write_release_files(release_dir(runner.out_dir, spec), card, outcome.weights)
    runner.audit.append("release.released", f"{spec.id} v{spec.version}", {
        "sha256": sha256(outcome.weights), "policy_hash": spec.policy_hash(), "silos": outcome.agreeing,
        "files": str(where)})
    return outcome


def _fail(audit: AuditLog, store: Store, spec: StudySpec, consents: dict[str, str], reason: str) -> None:
    store.finish_release(spec.id, "failed", consents, reason, version=spec.version)
    audit.append("release.failed", f"{spec.id} v{spec.version}", {"reason": reason[:500], "consents": len(
        [c for c in consents.values() if c == CONSENTED])})


def decide(spec: StudySpec, answers: list["SiloAnswer"], silent: dict[str, str]) -> ReleaseOutcome:
    """Consents, agreement and the minimum: the agreed model, or why there is none.

    The reference is the model most consenting silos sent byte for byte; a consenting
    silo whose model differs from it by more than the rounding is not counted (recorded).
    """
    consents = dict(silent)  # silo -> why it gave no answer
    models: dict[str, bytes] = {}
    for a in answers:
        silo = a.reply.silo
        if a.reply.status != "ok":
            consents[silo] = a.reply.reason or "refused"
            continue
        data = a.arrays[m.MODEL].tobytes() if m.MODEL in a.arrays else b""
        try:
            _check_model(spec, data)
        except PolicyError as exc:
            consents[silo] = f"consented, but its model is unusable: {exc}"
            continue
        consents[silo], models[silo] = CONSENTED, data
    agreeing: list[str] = []
    reference = b""
    if models:
        reference = Counter(sha256(d) for d in models.values()).most_common(1)[0][0]
        reference = next(d for d in models.values() if sha256(d) == reference)
        ref_tensors = load_model(reference)
        for silo, data in sorted(models.items()):
            if models_agree(load_model(data), ref_tensors):
                agreeing.append(silo)
            else:
                consents[silo] = "consented, but its model disagrees with the other consenting silos beyond rounding"
    need = spec.min_silos
    if len(agreeing) < need:
        return ReleaseOutcome(consents, None, f"{len(agreeing)} silo(s) consented with agreeing models, the study's "
                              f"minimum (min_silos) is {need}: nothing released", agreeing)
    return ReleaseOutcome(consents, reference, f"{len(agreeing)} silo(s) consented with agreeing models "
                          f"(minimum {need})", agreeing)


def _check_model(spec: StudySpec, data: bytes) -> None:
    if not data:
        raise PolicyError("no model in the reply")
    tensors = load_model(data)
    meta = file_metadata(data)
    if (meta.get("study_id"), meta.get("policy_hash")) != (spec.id, spec.policy_hash()):
        raise PolicyError("the model file names another study or policy")
    d = len(spec.feature_names())
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if shapes.get("weight") != (1, d) or shapes.get("bias") != (1,) or shapes.get("feature_mean") != (d,):
        raise PolicyError(f"tensor shapes {shapes} do not fit the study's {d} features")


# ---- the card -----------------------------------------------------------------------------------


def build_card(spec: StudySpec, store: Store, outcome: ReleaseOutcome, row: ModelReleaseRow | None) -> dict:
    """Everything a user of the model needs to know, from the policy and the store."""
    assert outcome.weights is not None
    tensors = load_model(outcome.weights)
    rounds = [r for r in store.list_rounds(spec.id, version=spec.version) if r.round_no > 0]
    final_round = max((r.round_no for r in rounds), default=0)
    pooled = next((e.metrics for e in store.list_evaluations(spec.id, version=spec.version)
                   if e.round_no == final_round and e.scope == "pooled"), None)
    spend: dict[str, dict[str, float]] = {}
    for p in store.list_privacy_spend(spec.id, version=spec.version):  # ordered by silo, round: the last wins
        spend[p.silo] = {"epsilon_spent": p.epsilon_spent_total, "epsilon_budget": p.epsilon_budget,
                         "after_round": p.round_no}
    dp = spec.dp
    return {
        "format": CARD_FORMAT,
        "study": {"id": spec.id, "version": spec.version, "name": spec.name, "policy_hash": spec.policy_hash()},
        "governance": spec.governance.model_dump(mode="json"),
        "model": {
            "kind": spec.model.kind, "file": WEIGHTS_FILE, "format": "safetensors", "sha256": sha256(outcome.weights),
            "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())}, "dtype": "float64",
            "rounded_to_decimals": RELEASE_DECIMALS,
        },
        "feature_transform": feature_transform(spec, tensors),
        "training": {
            "rounds": final_round, "strategy": spec.training.strategy, "encryption": spec.encryption,
            "participating_silos_per_round": {str(r.round_no): sorted(r.replied) for r in rounds},
        },
        "privacy": {
            "mechanism": "DP-SGD at each silo" if dp else "none",
            "delta": dp.delta if dp else None, "study_epsilon_per_silo": dp.epsilon if dp else None,
            "epsilon_spent_per_silo": spend,
        },
        "metrics": {
            "final_pooled": pooled, "evaluated_after_round": final_round,
            "confidence_intervals": "95% Wilson score intervals (*_ci_low, *_ci_high) on the pooled test sets",
        },
        "release": {
            "requested_by": row.requested_by if row else None,
            "requested_at": row.requested_at.isoformat() if row else None,
            "released_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "consents": outcome.consents, "silos_released_by": outcome.agreeing,
            "minimum_consents": spec.min_silos, "minimum_rule": "the study's min_silos",
        },
    }


# ---- files ----------------------------------------------------------------------------------------


def release_dir(coordinator_dir: Path, spec: StudySpec) -> Path:
    return Path(coordinator_dir) / RELEASES_DIR / f"{spec.id}-v{spec.version}"


def card_json(card: dict) -> str:
    """The card as written to model_card.json (and downloaded from the UI)."""
    return json.dumps(card, indent=2, sort_keys=True)


def write_release_files(out: Path, card: dict, weights: bytes) -> Path:
    """`model_card.json` + `model.safetensors` in `out`, both or neither (temp dir, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / WEIGHTS_FILE).write_bytes(weights)
    (tmp / CARD_FILE).write_text(card_json(card))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def export_model(store: Store, study_id: str, out: Path, *, version: int | None = None) -> Path:
    """Write a released model's card and weights from the store; the sha256 is checked first."""
    row = store.get_release(study_id, version=version)
    if row is None or row.status != "released" or row.weights is None or row.model_card is None:
        state = "never requested" if row is None else row.status + (f": {row.reason}" if row.reason else "")
        raise PolicyError(f"study {study_id}: no released model to export (release {state})")
    if sha256(row.weights) != row.model_sha256 or row.model_card["model"]["sha256"] != row.model_sha256:
        raise PolicyError(f"study {study_id}: the stored weights do not hash to the card's sha256; not exported")
    return write_release_files(out, row.model_card, row.weights)


def _write_summary(coordinator_dir: Path, summary: dict) -> None:
    tmp = Path(coordinator_dir) / f"{RELEASE_SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, Path(coordinator_dir) / RELEASE_SUMMARY)


# ---- `coordinator study release` ----------------------------------------------------------------


def run_release(state_dir: Path, study_id: str | None, address: str, user: str, *, expected_silos: int,
                db_url: str | None = None, timeout: float = 1800.0, tls: SuperLinkTls | None = None) -> dict:
    """Record the request (unless one is pending) and deliver it in a new Flower run (over TLS
    to the study CA unless `tls` is None: the local demo)."""
    from coordinator.start import StartPlan, _policy_file, start_study

    state_dir = Path(state_dir).resolve()
    with open_store(db_url, state_dir) as store:
        row = _study_row(store, study_id)
        pending = store.get_release(row.id, version=row.version)
        if pending is None or pending.status != "requested":
            request_release(store, open_party_log(state_dir / "coordinator", "coordinator", "coordinator"),
                            row.id, user, version=row.version)
        plan = StartPlan(_policy_file(state_dir, row), row.label, None)
    summary = start_study(state_dir, plan, address, expected_silos=expected_silos, db_url=db_url, timeout=timeout,
                          extra_config={"mode": "release"}, summary_name=RELEASE_SUMMARY, tls=tls)
    with open_store(db_url, state_dir) as store:
        final = store.get_release(row.id, version=row.version)
    return summary | {"release_status": final.status if final else None,
                      "model_sha256": final.model_sha256 if final else None}


def _study_row(store: Store, study_id: str | None):
    """The named study's latest version, else the one completed study in the store."""
    if study_id is not None:
        return store.get_study(study_id)
    done = [r for r in store.list_studies() if r.status == "completed"]
    if len(done) != 1:
        names = ", ".join(r.label for r in done) or "none"
        raise PolicyError(f"name the study with --study (completed studies: {names})")
    return done[0]
