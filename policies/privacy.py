"""The privacy contract of a study: a per-silo (epsilon, delta) budget and budget decisions.

Silos and the coordinator both read these models, so this module imports neither torch
nor Flower: the coordinator must be able to show a budget or a refusal without loading
a training stack. The budget is record-level differential privacy for the whole study
at each silo, spent by DP-SGD and accounted with Renyi DP (see silo_node.dp).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PrivacyPolicy(BaseModel):
    """A study's privacy budget, identical at every silo; a silo may only lower it (ceiling).

    `epsilon` covers the whole study at one silo (all rounds), not one round: the silo
    calibrates its noise so that the planned rounds spend exactly this budget.
    `delta` should be well below 1/n for the smallest silo (a silo refuses otherwise).
    `stats_budget_share` is the part of epsilon given up for the one noised release of the
    pooled normalisation statistics (count, sums, sums of squares) before round 1: training
    is calibrated as if the study's budget were epsilon * (1 - share), and the statistics
    get the least noise that keeps statistics + all planned rounds within epsilon in the
    same RDP accountant. Larger shares give cleaner statistics and noisier training.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # epsilon .inf is no budget

    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    stats_budget_share: float = Field(
        0.2, gt=0, le=0.5,
        description="share of epsilon for the noised normalisation statistics (0 < share <= 0.5)",
    )
    sampling: Literal["poisson"] = "poisson"
    accountant: Literal["rdp"] = "rdp"

    def training_epsilon(self) -> float:
        """The budget training is calibrated to on its own: epsilon minus the statistics' share."""
        return self.epsilon * (1.0 - self.stats_budget_share)


class BudgetDecision(BaseModel):
    """Whether a release fits the budget, with the numbers a person needs to see why."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    spent: float
    would_spend: float
    budget: float
    reason: str
