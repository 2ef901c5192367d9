"""The coordinator's side of a study, free of transport: sums and pooled metrics.

The coordinator only ever adds vectors (later: ciphertexts). It keeps the summed
aggregates (the public history every silo replays) and the pooled evaluation counts;
per-silo contributions are dropped as soon as they are summed.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from policies.errors import PolicyError
from policies.metrics import metrics_from_counts
from policies.update import sum_vectors

CHECKPOINT_FORMAT = 1
_META, _STATS = "_meta", "_stats_sum"


@dataclass
class RoundRecord:
    round: int
    asked: list[str]
    replied: list[str]
    refused: dict[str, str]
    pooled: dict[str, float] | None = None  # metrics of the model that entered this round
    per_silo: dict[str, dict] = field(default_factory=dict)
    privacy: dict[str, dict] = field(default_factory=dict)  # silo -> epsilon spent, budget, rounds left
    seconds: float = 0.0
    bytes_down: int = 0  # array bytes of the requests sent (history to every silo)
    bytes_up: int = 0  # array bytes of the replies received (updates, evaluations)


@dataclass
class StudyState:
    """Everything the coordinator may hold about a running study."""

    study_id: str
    policy_hash: str
    stats_sum: np.ndarray | None = None
    aggregates: list[np.ndarray] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    final: dict | None = None
    started: float = field(default_factory=time.time)
    # plaintext sum, or a ciphertext sum bound to the study's keyless aggregator context
    adder: Callable[[list[np.ndarray]], np.ndarray] = sum_vectors

    def add_stats(self, contributions: list[np.ndarray]) -> None:
        self.stats_sum = self.adder(contributions)

    def add_round(self, updates: list[np.ndarray]) -> np.ndarray:
        agg = self.adder(updates)
        self.aggregates.append(agg)
        return agg

    def to_checkpoint(self, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
        """Serialise what a new Flower run needs to continue: sums, round records, `arrays`, `meta`.

        Only what the coordinator already holds goes in (under CKKS the sums are ciphertexts
        it cannot open); `meta` is public bookkeeping as JSON. An .npz archive read back
        without pickle, so a checkpoint can never carry code.
        """
        if any(k.startswith(("agg_", "_")) or k in (_STATS, _META) for k in arrays):
            raise ValueError(f"checkpoint array names clash with the study state: {sorted(arrays)}")
        body = {"format": CHECKPOINT_FORMAT, "study_id": self.study_id, "policy_hash": self.policy_hash,
                "started": self.started, "rounds": [asdict(r) for r in self.rounds], "meta": meta}
        out = {_META: np.frombuffer(json.dumps(body, default=float).encode(), dtype=np.uint8)}
        if self.stats_sum is not None:
            out[_STATS] = np.asarray(self.stats_sum)
        out |= {f"agg_{r:04d}": np.asarray(a) for r, a in enumerate(self.aggregates, start=1)}
        out |= {k: np.asarray(v) for k, v in arrays.items()}
        buf = io.BytesIO()
        np.savez(buf, **out)
        return buf.getvalue()

    @classmethod
    def from_checkpoint(cls, blob: bytes, study_id: str, policy_hash: str) -> tuple["StudyState", dict[str, np.ndarray], dict]:
        """Rebuild the state written by `to_checkpoint`; refuses another study's checkpoint."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            body = json.loads(arrays.pop(_META).tobytes())
        except (OSError, ValueError, KeyError) as exc:
            raise PolicyError(f"the study's checkpoint cannot be read ({type(exc).__name__}: {exc})") from None
        if body.get("format") != CHECKPOINT_FORMAT:
            raise PolicyError(f"checkpoint format {body.get('format')} is not {CHECKPOINT_FORMAT}; cannot resume")
        if (body["study_id"], body["policy_hash"]) != (study_id, policy_hash):
            raise PolicyError(f"the checkpoint is for study {body['study_id']} policy {body['policy_hash'][:12]}, "
                              f"not {study_id} policy {policy_hash[:12]}: refused")
        aggs = sorted(k for k in arrays if k.startswith("agg_"))
        if aggs != [f"agg_{r:04d}" for r in range(1, len(aggs) + 1)]:
            raise PolicyError("the checkpoint's aggregate history has gaps: refused")
        state = cls(study_id, policy_hash, stats_sum=arrays.pop(_STATS, None),
                    aggregates=[arrays.pop(k) for k in aggs],
                    rounds=[RoundRecord(**r) for r in body["rounds"]], started=float(body["started"]))
        return state, arrays, body["meta"]

    def summary(self) -> dict:
        """JSON-able study summary: per-round pooled metrics and the final evaluation."""
        return {
            "study_id": self.study_id,
            "policy_hash": self.policy_hash,
            "rounds": len(self.aggregates),
            "history": [
                {"round": r.round, "asked": r.asked, "replied": r.replied, "refused": r.refused,
                 "pooled_entering_model": r.pooled, "privacy": r.privacy, "seconds": r.seconds,
                 "bytes_down": r.bytes_down, "bytes_up": r.bytes_up}
                for r in self.rounds
            ],
            "final": self.final,
            "wall_seconds": time.time() - self.started,
        }


def final_evaluation(pooled_counts: np.ndarray, per_silo_reports: dict[str, dict]) -> dict:
    """The study's headline numbers: pooled test metrics, per-hospital (suppressed) and their mean."""
    pooled = metrics_from_counts(pooled_counts)
    centre_acc = {s: rep.get("accuracy") for s, rep in per_silo_reports.items()}
    shown = [a for a in centre_acc.values() if a is not None]
    return {
        "pooled_test_accuracy": pooled["accuracy"],
        "pooled": pooled,
        "center_accuracy": centre_acc,
        "mean_center_accuracy": float(np.mean(shown)) if len(shown) == len(centre_acc) and shown else None,
        "per_silo": per_silo_reports,
    }


def dumps(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=float)
