"""The server optimiser, run identically at every silo.

Under encryption the coordinator can only add, so it cannot apply FedYogi's non-linear
step. Each silo instead replays the optimiser over the public history of aggregates
(policy init, then every round's weighted mean): the same inputs and the same float64
arithmetic give every silo, and any silo rejoining later, the same global model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.study import Training


@dataclass
class ServerOptimizer:
    """FedAvg (take the mean) or FedYogi (Reddi et al. 2021, no bias correction, as FLamby)."""

    training: Training
    weights: np.ndarray
    m: np.ndarray = field(init=False)
    v: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64).copy()
        self.m = np.zeros_like(self.weights)
        self.v = np.full_like(self.weights, self.training.tau**2)

    def step(self, mean_of_silos: np.ndarray) -> np.ndarray:
        t = self.training
        if t.strategy == "fedavg":
            self.weights = np.asarray(mean_of_silos, dtype=np.float64).copy()
            return self.weights
        delta = mean_of_silos - self.weights
        d2 = delta * delta
        self.m = t.beta1 * self.m + (1 - t.beta1) * delta
        self.v = self.v - (1 - t.beta2) * d2 * np.sign(self.v - d2)
        self.weights = self.weights + t.server_lr * self.m / (np.sqrt(self.v) + t.tau)
        return self.weights


def replay(training: Training, init: np.ndarray, means: list[np.ndarray]) -> np.ndarray:
    """Global weights after applying the optimiser to each round's mean, in order."""
    opt = ServerOptimizer(training, init)
    for mean in means:
        opt.step(mean)
    return opt.weights
