"""The silo's side of a model release: silo IT's consent, and the model it sends.

A silo sends the final model only with consent: automatic when silo IT approved the
study with `--release auto`, otherwise silo IT runs `silo-node release approve STUDY`
(or `release refuse`). Consent is for the exact policy hash silo IT approved. A silo
without consent answers "no consent" (in its own audit log and in the refusal the
coordinator records), never the weights.

What is sent is the model every silo can rebuild from the public history (the policy's
initial model, then the server optimiser over each round's decrypted aggregate), and
the feature transform (pooled normalisation statistics) it needs, rounded to
RELEASE_DECIMALS before it leaves. Releasing it spends no privacy budget: under DP it is
post-processing of updates already charged.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies import messages as m
from policies.audit import AuditLog
from policies.errors import PolicyError
from policies.model_card import model_bytes, sha256
from silo_node.approval import load_approval_by_id
from silo_node.ledger import write_durably

CONSENT_DIR = "release_consent"
DECISIONS = ("approve", "refuse")


@dataclass(frozen=True)
class Consent:
    study_id: str
    policy_hash: str
    decision: str  # "approve" or "refuse"
    by: str
    at: str


def _path(state_dir: Path, study_id: str) -> Path:
    return Path(state_dir) / CONSENT_DIR / f"{study_id}.json"


def record_consent(state_dir: Path, study_id: str, decision: str, by: str, log: AuditLog) -> Consent:
    """Silo IT's decision on releasing a study's model, for the policy it approved; durable and logged.

    Refused with nothing written when the study was never approved here.
    """
    if decision not in DECISIONS:
        raise PolicyError(f"release decision {decision!r}: use one of {', '.join(DECISIONS)}")
    approval = load_approval_by_id(state_dir, study_id)
    if approval is None:
        raise PolicyError(f"study {study_id} is not approved at this silo ({state_dir}); nothing to consent to")
    consent = Consent(study_id, approval.policy_hash, decision, by, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_durably(_path(state_dir, study_id), consent.__dict__)
    action = "release.consent_given" if decision == "approve" else "release.consent_refused"
    log.append(action, study_id, {"policy_hash": approval.policy_hash, "by": by, "how": "silo IT (manual)"}, actor=by)
    return consent


def load_consent(state_dir: Path, study_id: str) -> Consent | None:
    path = _path(state_dir, study_id)
    return Consent(**json.loads(path.read_text())) if path.exists() else None


def consent_for(state_dir: Path, study_id: str, policy_hash: str) -> tuple[bool, str]:
    """(consents, how or why not). Silo IT's explicit decision wins over the approval's mode."""
    consent = load_consent(state_dir, study_id)
    if consent is not None and consent.policy_hash == policy_hash:
        if consent.decision == "approve":
            return True, f"silo IT consented ({consent.by}, {consent.at})"
        return False, f"silo IT refused consent to release the model ({consent.by}, {consent.at})"
    approval = load_approval_by_id(state_dir, study_id)
    if approval is not None and approval.policy_hash == policy_hash and approval.release == "auto":
        return True, "automatic (approved with --release auto)"
    return False, (f"no consent: silo IT has not consented to releasing the model of {study_id} "
                   f"(`silo-node release approve {study_id}`)")


def release_model(silo, req: m.Request, arrays: dict[str, np.ndarray]) -> tuple[dict, None, None]:
    """Answer a release request: the rounded final model if this silo consents, else a refusal.

    Both outcomes are in the silo's audit log (consent given / refused, model sent with its
    sha256); `handle` turns the PolicyError into the recorded refusal the coordinator sees.
    """
    state_dir = silo._require_state_dir("model release")
    consents, how = consent_for(state_dir, silo.study.id, silo.study.policy_hash())
    log: AuditLog | None = silo.audit
    subject = f"{silo.study.id}/release"
    if not consents:
        if log is not None:
            log.append("release.consent_refused", subject, {"reason": how})
        raise PolicyError(how)
    if log is not None:
        log.append("release.consent_given", subject, {"how": how})
    data = final_model_bytes(silo, arrays)
    digest = sha256(data)
    if log is not None:
        log.append("release.model_sent", subject, {"sha256": digest, "bytes": len(data),
                                                   "rounds": len(m.aggregates_from_arrays(arrays))})
    # The keys stay until the coordinator's closing exchange says the model was released
    # (service._destroy_keys_at_end): a release that fails for want of consents may be asked again.
    return {m.MODEL: np.frombuffer(data, dtype=np.uint8).copy()}, None, None


def final_model_bytes(silo, arrays: dict[str, np.ndarray]) -> bytes:
    """The global model after every round in the history, with its feature transform, rounded."""
    aggregates = m.aggregates_from_arrays(arrays)
    if len(aggregates) != silo.study.training.rounds:
        raise PolicyError(f"release of a model after {len(aggregates)} rounds; the study trains "
                          f"{silo.study.training.rounds}: only the final model is released")
    if silo.study.features.normalisation == "local":
        raise PolicyError("the study normalises with each hospital's own statistics: there is no single feature "
                          "transform to release with the model")
    mean, std = silo._normaliser(arrays.get(m.STATS_SUM))
    return model_bytes(silo.global_weights(aggregates), mean, std, silo.study)
