"""The coordinator's side of a study, free of transport: sums and pooled metrics.

The coordinator only ever adds vectors (later: ciphertexts). It keeps the summed
aggregates (the public history every silo replays) and the pooled evaluation counts;
per-silo contributions are dropped as soon as they are summed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from policies.metrics import metrics_from_counts
from policies.update import sum_vectors


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

    def summary(self) -> dict:
        """JSON-able study summary: per-round pooled metrics and the final evaluation."""
        return {
            "study_id": self.study_id,
            "policy_hash": self.policy_hash,
            "rounds": len(self.aggregates),
            "history": [
                {"round": r.round, "asked": r.asked, "replied": r.replied, "refused": r.refused,
                 "pooled_entering_model": r.pooled, "privacy": r.privacy, "seconds": r.seconds}
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
