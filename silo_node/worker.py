"""What a silo does for each request, free of any transport.

The Flower ClientApp and the in-process benchmark both call these functions, so the
numbers in bench/ come from the same code that runs at a hospital.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.errors import PolicyError
from policies.messages import Reply, Request, check_request
from policies.metrics import silo_report
from policies.study import StudySpec
from policies.update import pack_update, unpack_sum
from silo_node.cohort import read_cohort
from silo_node.features import Design, build_design, moments, normalise, normaliser_from_moments
from silo_node.server_optimizer import replay
from silo_node.training import derive_seed, evaluate, init_weights, local_train


@dataclass
class Silo:
    name: str
    study: StudySpec
    design: Design

    @classmethod
    def from_cohort(cls, name: str, study: StudySpec, cohort: str | Path) -> "Silo":
        return cls(name=name, study=study, design=build_design(read_cohort(cohort), study))

    def warm_up(self) -> None:
        """Load the heavy libraries once, in the resident service, not per round."""
        import tenseal  # noqa: F401  (CKKS, used for encrypted studies)

        init_weights(self.study, self.design.x.shape[1])

    # ---- round 0 ---------------------------------------------------------------
    def stats_contribution(self) -> np.ndarray:
        """Training-split moments for pooled normalisation (count, sums, sums of squares)."""
        return moments(self.design.x_train)

    # ---- the global model --------------------------------------------------------
    def _normaliser(self, stats_sum: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        mode = self.study.features.normalisation
        d = self.design.x.shape[1]
        if mode == "none":
            return np.zeros(d), np.ones(d)
        if mode == "local":
            return normaliser_from_moments(moments(self.design.x_train))
        if stats_sum is None:
            raise PolicyError("pooled normalisation needs the statistics round's sum, which is missing")
        return normaliser_from_moments(stats_sum)

    def global_weights(self, aggregates: list[np.ndarray]) -> np.ndarray:
        """Rebuild the global model from the policy's init and every round's summed update."""
        means = []
        for r, agg in enumerate(aggregates, start=1):
            summed = unpack_sum(agg)
            if summed.contributors < self.study.min_silos:
                raise PolicyError(
                    f"round {r} aggregate has {summed.contributors} contributors, below the study minimum "
                    f"of {self.study.min_silos}: refused (a single update could be isolated)"
                )
            means.append(summed.mean)
        init = init_weights(self.study, self.design.x.shape[1])
        return replay(self.study.training, init, means)

    def aggregation_weight(self) -> float:
        if self.study.training.weighting == "uniform":
            return 1.0
        return len(self.design.train_idx) / self.study.cohort.max_rows

    # ---- requests -----------------------------------------------------------------
    def train(self, round_no: int, stats_sum: np.ndarray | None, aggregates: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate the current global model, then train from it; return (update, eval counts)."""
        mean, std = self._normaliser(stats_sum)
        w = self.global_weights(aggregates)
        counts = evaluate(w, normalise(self.design.x_test, mean, std), self.design.y_test)
        seed = derive_seed(self.study.seed, round_no, self.name)
        trained = local_train(w, normalise(self.design.x_train, mean, std), self.design.y_train, self.study, seed)
        return pack_update(trained, self.aggregation_weight()), counts

    def evaluate(self, stats_sum: np.ndarray | None, aggregates: list[np.ndarray]) -> np.ndarray:
        mean, std = self._normaliser(stats_sum)
        w = self.global_weights(aggregates)
        return evaluate(w, normalise(self.design.x_test, mean, std), self.design.y_test)

    # ---- replies ------------------------------------------------------------------
    def reply(self, req: Request, counts: np.ndarray | None = None) -> Reply:
        report = json.dumps(silo_report(counts, self.study.small_cell_min)) if counts is not None else "{}"
        return Reply(
            study_id=req.study_id, policy_hash=req.policy_hash, round=req.round, nonce=req.nonce,
            silo=self.name, status="ok", report=report,
        )

    def check(self, req: Request) -> None:
        check_request(req, self.study.id, self.study.policy_hash())

