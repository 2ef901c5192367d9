"""The layout of every message between coordinator and silos, independent of transport.

Each message is a small header (plain config values) plus named float64 arrays. The
Flower adapters on each side only copy these into ConfigRecord / ArrayRecord, so the
contract lives here, once.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies import PROTOCOL_VERSION
from policies.errors import PolicyError

ENROL = "query.enrol"  # key ceremony 1: each silo's enrolment public key
KEYGEN = "query.keygen"  # key ceremony 2: one silo makes the CKKS key, seals it to the others
KEYRECV = "query.keyrecv"  # key ceremony 3: each other silo opens its sealed copy
KEYSHARE = "query.keyshare"  # a silo joining later: the key holder seals the same key to it
STATS = "query.stats"  # round 0: normalisation moments
TRAIN = "train"
EVALUATE = "evaluate"
REVEAL = "query.reveal"  # silos decrypt a pooled evaluation sum and return it rounded
CLOSE = "query.close"  # study ended: the coordinator's final audit head out, each silo's final head back
RELEASE = "query.release"  # model release: consenting silos send the final model, rounded (see policies/model_card)
HEADER = "fedcohort"  # ConfigRecord name of the header
ARRAYS = "arrays"  # ArrayRecord name of the arrays
STATS_SUM = "stats_sum"
UPDATE = "update"
EVAL = "eval"
MOMENTS = "moments"
ENROL_PUB = "enrol_pub"
AGG_CTX = "aggregator_context"
SEALED = "sealed"
EVAL_SUM = "eval_sum"
POOLED_EVAL = "pooled_eval"
MODEL = "model"  # a released model: the safetensors file's bytes (uint8)


# Header fields are bounded: a reply's text ends up in the coordinator's store, audit log and
# summary, so an oversized or malformed header is refused when it is parsed, not stored.
MAX_REASON_CHARS = 2_000  # a refusal reason: enough for a person to act on
MAX_REPORT_CHARS = 1_000_000  # a silo's counts-only report as JSON (validation report included)
Short = Annotated[str, Field(max_length=200)]  # ids, names, hashes, nonces, timestamps
Seq = Annotated[int, Field(ge=0)]
#: Largest total of array bytes one message may carry either way. A CKKS update of the heart
#: study is about 0.1 MB and a 1000-round history about 100 MB; anything bigger is refused
#: before it is parsed, summed or replayed.
MAX_ARRAY_BYTES = 256 * 2**20


def check_array_bytes(arrays: dict[str, np.ndarray], what: str) -> None:
    """Refuse an oversized message by the bytes its arrays hold (before any of them is used)."""
    total = sum(int(getattr(a, "nbytes", 0)) for a in arrays.values())
    if total > MAX_ARRAY_BYTES:
        raise PolicyError(f"{what} carries {total} bytes of arrays, above the {MAX_ARRAY_BYTES}-byte limit: refused")


def peer_key(node: str) -> str:
    return f"peer_{node}"


def sealed_key(node: str) -> str:
    return f"sealed_{node}"


def agg_key(round_no: int) -> str:
    return f"agg_{round_no:04d}"


def new_nonce() -> str:
    return secrets.token_hex(16)


class Request(BaseModel):
    """What the coordinator asks: which study, which round, with a fresh nonce."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol_version: int = PROTOCOL_VERSION
    study_id: Short
    policy_hash: Short
    round: Seq
    nonce: Short
    sent_at: Short = ""  # coordinator's clock, recorded by the silo; freshness comes from the nonce
    audit_seq: Seq = 0  # coordinator's audit chain head, witnessed by the silo
    audit_head: Short = ""
    ledger_seq: Seq = 0  # this silo's privacy-ledger head as the coordinator last witnessed it
    ledger_head: Short = ""


class Reply(BaseModel):
    """A silo's answer. `report` is the silo's own small-cell-suppressed view, as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    protocol_version: int = PROTOCOL_VERSION
    study_id: Short
    policy_hash: Short
    round: Seq
    nonce: Short
    silo: Short
    status: Literal["ok", "refused"]
    reason: str = Field("", max_length=MAX_REASON_CHARS)
    report: str = Field("{}", max_length=MAX_REPORT_CHARS)
    audit_seq: Seq = 0  # the silo's audit chain head, witnessed by the coordinator
    audit_head: Short = ""
    ledger_seq: Seq = 0  # the silo's privacy-ledger head after this reply's charge
    ledger_head: Short = ""
    epsilon_spent: float | None = None
    epsilon_budget: float | None = None
    rounds_left: int | None = None

    @field_validator("report")
    @classmethod
    def _json_object(cls, report: str) -> str:
        """The coordinator stores the report as is: it must be a JSON object, checked on arrival."""
        try:
            parsed = json.loads(report)
        except ValueError:
            raise ValueError("report is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"report is JSON {type(parsed).__name__}, not an object")
        return report

    def report_dict(self) -> dict:
        return json.loads(self.report)


def refusal(req: Request, silo: str, reason: str) -> Reply:
    """A reply that declines the request and says why (never with a row or a value)."""
    return Reply(
        study_id=req.study_id, policy_hash=req.policy_hash, round=req.round, nonce=req.nonce,
        silo=silo, status="refused", reason=reason[:MAX_REASON_CHARS],
    )


def check_request(req: Request, study_id: str, policy_hash: str) -> None:
    """A silo refuses a request for another protocol, study or policy version."""
    if req.protocol_version != PROTOCOL_VERSION:
        raise PolicyError(
            f"coordinator speaks protocol {req.protocol_version}, this silo speaks {PROTOCOL_VERSION}: refused"
        )
    if req.study_id != study_id or req.policy_hash != policy_hash:
        raise PolicyError(
            f"request is for study '{req.study_id}' policy {req.policy_hash[:12]}, this silo approved "
            f"'{study_id}' policy {policy_hash[:12]}: refused"
        )


def check_reply(reply: Reply, req: Request) -> None:
    """The coordinator drops replies that do not answer the exact request it sent."""
    for field in ("protocol_version", "study_id", "policy_hash", "round", "nonce"):
        if getattr(reply, field) != getattr(req, field):
            raise PolicyError(f"reply from '{reply.silo}' does not match the request ({field} differs)")


def history_arrays(stats_sum: np.ndarray | None, aggregates: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The public state every silo needs to rebuild the global model: stats and sums so far."""
    out: dict[str, np.ndarray] = {}
    if stats_sum is not None:
        out[STATS_SUM] = np.asarray(stats_sum)  # float64 in plaintext studies, uint8 ciphertext under CKKS
    for r, agg in enumerate(aggregates, start=1):
        out[agg_key(r)] = np.asarray(agg)
    return out


def aggregates_from_arrays(arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
    keys = sorted(k for k in arrays if k.startswith("agg_"))
    expected = [agg_key(r) for r in range(1, len(keys) + 1)]
    if keys != expected:
        raise PolicyError("aggregate history has gaps: refused")
    return [arrays[k] for k in keys]


# ---- key lifecycle: key epochs after a re-key, the study's outcome at its close, withdrawal ----
KEY_EPOCH = "key_epoch"  # [epoch]: the key a silo encrypts under now, and the one a ceremony makes or opens
KEY_EPOCHS = "key_epochs"  # [epoch of stats_sum, epoch of agg_1, ...]: absent = all epoch 0 (never re-keyed)
EVAL_EPOCH = "eval_epoch"  # [epoch] of the pending evaluation sum a silo decrypts
OUTCOME = "outcome"  # closing exchange: "completed" or "stopped", as UTF-8 bytes
WITHDRAWN_PREFIX = "withdrawn:"  # how every refusal of a withdrawn silo begins


def is_withdrawal(reason: str) -> bool:
    """Whether a refusal says the silo withdrew from the study (the coordinator stops asking it)."""
    return reason.startswith(WITHDRAWN_PREFIX)


def epoch_of(arrays: dict[str, np.ndarray], key: str, default: int = 0) -> int:
    """One key epoch from a message's arrays (absent: `default`)."""
    if key not in arrays:
        return default
    values = np.asarray(arrays[key]).ravel()
    if values.size != 1 or not float(values[0]).is_integer() or values[0] < 0:
        raise PolicyError(f"{key} must be one non-negative integer key epoch")
    return int(values[0])


def epoch_list(arrays: dict[str, np.ndarray]) -> list[int]:
    """Key epoch of the statistics sum and of each aggregate, in order ([] when never re-keyed)."""
    if KEY_EPOCHS not in arrays:
        return []
    values = np.asarray(arrays[KEY_EPOCHS]).ravel()
    if values.size == 0 or np.any(values < 0) or np.any(values != np.round(values)):
        raise PolicyError(f"{KEY_EPOCHS} must be non-negative integer key epochs, one per summed history entry")
    return [int(v) for v in values]
