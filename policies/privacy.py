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
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    sampling: Literal["poisson"] = "poisson"
    accountant: Literal["rdp"] = "rdp"


class BudgetDecision(BaseModel):
    """Whether a release fits the budget, with the numbers a person needs to see why."""

    model_config = ConfigDict(frozen=True)

    allowed: bool
    spent: float
    would_spend: float
    budget: float
    reason: str
