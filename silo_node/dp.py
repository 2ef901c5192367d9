"""Record-level differential privacy for local training: DP-SGD and its RDP accounting.

A silo spends its study budget (epsilon, delta) by DP-SGD: each step samples every
training row independently with probability q = batch_size / n (Poisson sampling),
clips each row's gradient to `max_grad_norm`, adds Gaussian noise of std
noise_multiplier * max_grad_norm to the sum and divides by the expected batch size,
exactly as Opacus' DPOptimizer does. The noise is calibrated once per study so that the
planned rounds x local_steps spend exactly the budget under Opacus' RDP accountant, and
what is actually spent is an accountant history kept by silo_node.ledger.

Two engines run the same algorithm:
  "vectorised" (default) the closed-form per-sample gradient of logistic regression,
               (sigmoid(x.w + b) - y) * [x, 1], in numpy: no autograd, no hooks;
  "opacus"     Opacus' own GradSampleModule, DPOptimizer and DPDataLoader.
tests/test_dp.py holds the vectorised engine to the Opacus one (same per-sample norms,
clipped sums and trajectory without noise, same noise scale), and bench/dp_overhead.py
shows why the vectorised one is the default.

Randomness: the Poisson sample and the noise must be unpredictable to anyone but the
silo, or the noise can be regenerated and subtracted. `seed=None` (the default, and the
only choice for a real study) draws from the OS; a seed is for tests and benchmarks.
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, Sequence

import numpy as np

from policies.errors import PolicyError
from policies.privacy import PrivacyPolicy
from policies.study import Training

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant

HistoryEntry = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), as Opacus keeps it
Engine = Literal["vectorised", "opacus"]

CALIBRATION_TOLERANCE = 1e-4  # relative: the planned study spends epsilon * (1 - 1e-4) .. epsilon
CLIP_STABILISER = 1e-6  # Opacus' clip factor is C / (norm + 1e-6); matched so clipping is identical


# ---- planning and accounting ------------------------------------------------------------


@dataclass(frozen=True)
class DPPlan:
    """What one silo does each round to spend its study budget exactly over the planned rounds."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    stats_noise_multiplier: float | None = None  # the statistics release, when the plan includes one


def sample_rate_for(batch_size: int, n_train: int) -> float:
    """Poisson sampling rate q = batch_size / n: the expected batch is the policy's batch size."""
    return batch_size / n_train


@lru_cache(maxsize=256)
def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, total_steps: int) -> float:
    """Smallest noise multiplier whose `total_steps` steps at `sample_rate` spend at most epsilon.

    Opacus' bisection with a relative tolerance of 1e-4 instead of its absolute 0.01, so a
    planned study spends its budget, not up to 1% less; it is pure, hence cached (~0.5 s).
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the bisection probes tiny sigmas whose best RDP order is the largest
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=total_steps,
            accountant="rdp", epsilon_tolerance=CALIBRATION_TOLERANCE * epsilon,
        ))


def plan_for_silo(training: Training, privacy: PrivacyPolicy, n_train: int) -> DPPlan:
    """The noise this silo needs so that rounds x local_steps spend exactly the study's epsilon.

    Refuses a delta that is not below 1/n: with delta >= 1/n, "releasing one patient's record
    outright" would still meet the guarantee, which then protects nobody.
    """
    if privacy.delta >= 1.0 / n_train:
        raise PolicyError(
            f"privacy.delta {privacy.delta:g} is not below 1/n = 1/{n_train} for this silo's training rows; "
            "the guarantee would be meaningless here: lower delta in the study policy"
        )
    if training.batch_size > n_train:
        raise PolicyError(f"training.batch_size {training.batch_size} exceeds this silo's {n_train} training rows")
    q = sample_rate_for(training.batch_size, n_train)
    sigma = noise_multiplier_for(privacy.epsilon, privacy.delta, q, training.rounds * training.local_steps)
    return DPPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=training.local_steps, rounds=training.rounds)


STATS_SAMPLE_RATE = 1.0  # the statistics release reads every training row once: no subsampling
STATS_STEPS = 1


def stats_noise_multiplier_for(epsilon: float, delta: float, training_entry: HistoryEntry) -> float:
    """Least noise multiplier for one full-data Gaussian release that, composed with the
    planned training `(sigma, q, steps)` in one RDP accountant, keeps the total within epsilon.

    Geometric bisection to 1e-4 relative; returns the feasible (larger) end, so the planned
    study never needs the ledger's float tolerance. Raises PolicyError if no noise fits
    (training alone already spends epsilon).
    """
    sigma, q, steps = training_entry
    return _stats_sigma(float(epsilon), float(delta), (float(sigma), float(q), int(steps)))


@lru_cache(maxsize=256)
def _stats_sigma(epsilon: float, delta: float, training_entry: tuple[float, float, int]) -> float:
    def fits(sigma: float) -> bool:
        return epsilon_of([(sigma, STATS_SAMPLE_RATE, STATS_STEPS), training_entry], delta) <= epsilon

    low, high = 1e-2, 1.0
    while not fits(high):
        low, high = high, high * 2.0
        if high > 1e7:
            raise PolicyError(f"no statistics noise fits epsilon {epsilon:g}: training alone spends it; "
                              "raise privacy.stats_budget_share")
    while high / low > 1.0 + 1e-4:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def plan_with_stats(training: Training, privacy: PrivacyPolicy, n_train: int) -> DPPlan:
    """The silo's whole plan: one noised statistics release plus the planned rounds, within epsilon.

    Training is calibrated to epsilon * (1 - stats_budget_share) alone (plan_for_silo), then
    the statistics get the least noise that fits the rest of the budget in the same accountant:
    composed, stats + all rounds spend at most epsilon.
    """
    training_budget = privacy.model_copy(update={"epsilon": privacy.training_epsilon()})
    plan = plan_for_silo(training, training_budget, n_train)
    entry = (plan.noise_multiplier, plan.sample_rate, training.rounds * training.local_steps)
    sigma = stats_noise_multiplier_for(privacy.epsilon, privacy.delta, entry)
    return DPPlan(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, plan.rounds, sigma)


def add_to_history(history: Sequence[Sequence[Any]], noise_multiplier: float, sample_rate: float, steps: int) -> list[HistoryEntry]:
    """History after `steps` more steps, merged as RDPAccountant.step merges them.

    Merging keeps one entry per (noise, rate), so epsilon_of costs one RDP evaluation for a
    whole study and equals the calibration's (sigma, q, rounds x steps) to the last bit.
    """
    out: list[HistoryEntry] = [(float(s), float(q), int(k)) for s, q, k in history]
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def epsilon_of(history: Sequence[Sequence[Any]], delta: float) -> float:
    """Epsilon spent by an accountant history, computed by a fresh Opacus RDPAccountant.

    Cached: a round's decide and charge ask for the same histories (~10 ms each).
    """
    return _epsilon(tuple((float(s), float(q), int(k)) for s, q, k in history), float(delta))


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


# ---- the DP-SGD step (vectorised) ----------------------------------------------------------


def _augment(x: np.ndarray) -> np.ndarray:
    """[x, 1]: the bias is the last weight, matching the flat `[w..., b]` layout."""
    return np.hstack([x, np.ones((x.shape[0], 1))])


def per_sample_gradients(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows of d BCEWithLogits / d[w, b]: (sigmoid(x.w + b) - y) * [x, 1], one row per sample."""
    return _per_sample(weights, _augment(x), y)


def _per_sample(weights: np.ndarray, xa: np.ndarray, y: np.ndarray) -> np.ndarray:
    residual = 1.0 / (1.0 + np.exp(-(xa @ weights))) - y
    return residual[:, None] * xa


def clip_factors(norms: np.ndarray, max_grad_norm: float) -> np.ndarray:
    """Opacus' flat clipping: scale each sample by min(1, C / (norm + 1e-6))."""
    return np.minimum(1.0, max_grad_norm / (norms + CLIP_STABILISER))


def clipped_gradient_sum(weights: np.ndarray, x: np.ndarray, y: np.ndarray, max_grad_norm: float) -> np.ndarray:
    """Sum over the batch of per-sample gradients clipped to `max_grad_norm` (before noise)."""
    return _clipped_sum(weights, _augment(x), y, max_grad_norm)


def _clipped_sum(weights: np.ndarray, xa: np.ndarray, y: np.ndarray, max_grad_norm: float) -> np.ndarray:
    grads = _per_sample(weights, xa, y)
    return clip_factors(np.linalg.norm(grads, axis=1), max_grad_norm) @ grads


def poisson_masks(rng: np.random.Generator, steps: int, n: int, sample_rate: float) -> np.ndarray:
    """steps x n booleans: row i is in step t's batch with probability q, independently."""
    return rng.random((steps, n)) < sample_rate


def _vectorised_train(
    weights: np.ndarray, x: np.ndarray, y: np.ndarray, training: Training, privacy: PrivacyPolicy,
    noise_multiplier: float, rng: np.random.Generator,
) -> np.ndarray:
    n, d = x.shape
    steps, clip = training.local_steps, privacy.max_grad_norm
    xa, yv = _augment(np.asarray(x, dtype=np.float64)), np.asarray(y, dtype=np.float64)
    masks = poisson_masks(rng, steps, n, sample_rate_for(training.batch_size, n))
    noise = rng.normal(0.0, noise_multiplier * clip, size=(steps, d + 1))
    step_size = training.client_lr / training.batch_size  # Opacus divides by the expected batch size
    w = np.array(weights, dtype=np.float64)
    for t in range(steps):
        rows = masks[t]
        w -= step_size * (_clipped_sum(w, xa[rows], yv[rows], clip) + noise[t])
    return w


# ---- the same algorithm through Opacus ---------------------------------------------------------


def _torch():
    import torch  # heavy: imported only when a silo actually trains with this engine

    return torch


def opacus_generators(seed: int) -> tuple[Any, Any]:
    """(sampling, noise) torch generators of the Opacus engine for a seed; tests rebuild them."""
    torch = _torch()
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed ^ 0x5DEECE66D)


def _opacus_model(weights: np.ndarray, d: int) -> Any:
    torch = _torch()
    model = torch.nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(weights[:d]).reshape(1, d))
        model.bias.copy_(torch.as_tensor(weights[d:]))
    return model


def _opacus_train(
    weights: np.ndarray, x: np.ndarray, y: np.ndarray, training: Training, privacy: PrivacyPolicy,
    noise_multiplier: float, seed: int, accountant: "RDPAccountant | None",
) -> np.ndarray:
    """Opacus' GradSampleModule + DPOptimizer + DPDataLoader, i.e. what make_private assembles.

    Assembled by hand because make_private derives q = 1/ceil(n/batch) and divides by
    int(n q) (3, not 4, at three of the four heart silos); here q = batch/n and the divisor
    is batch, like the vectorised engine and the calibration.
    """
    torch = _torch()
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    n, d = x.shape
    q = sample_rate_for(training.batch_size, n)
    sampling, noise = opacus_generators(seed)
    model = GradSampleModule(_opacus_model(weights, d))
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=training.client_lr), noise_multiplier=noise_multiplier,
        max_grad_norm=privacy.max_grad_norm, expected_batch_size=training.batch_size, generator=noise,
    )
    if accountant is not None:
        opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    data = torch.utils.data.TensorDataset(torch.as_tensor(x, dtype=torch.float64),
                                          torch.as_tensor(y, dtype=torch.float64).unsqueeze(1))
    loader = DPDataLoader(data, sample_rate=q, generator=sampling)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for xb, yb in _take(loader, training.local_steps):
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
    model.remove_hooks()
    inner = model._module
    return np.concatenate([inner.weight.detach().numpy().ravel(), inner.bias.detach().numpy()])


def _take(loader: Any, steps: int):
    """`steps` Poisson batches, across as many passes of the loader as that needs."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


# ---- the entry point ------------------------------------------------------------------------


def dp_local_train(
    weights: np.ndarray, x: np.ndarray, y: np.ndarray, training: Training, privacy: PrivacyPolicy,
    noise_multiplier: float, seed: int | None = None, *, engine: Engine = "vectorised",
    accountant: "RDPAccountant | None" = None,
) -> np.ndarray:
    """DP-SGD from `weights` for `training.local_steps` steps; the private counterpart of local_train.

    Spends (noise_multiplier, batch_size/n, local_steps) of the silo's budget: charge
    exactly that in the ledger before the result leaves the silo. `seed=None` draws the
    sample and the noise from OS entropy, as a real study must. `accountant` (opacus
    engine only) receives Opacus' own per-step accounting, to check the ledger against.
    """
    if engine == "opacus":
        seed = secrets.randbits(63) if seed is None else seed  # torch generators take at most 64 bits
        return _opacus_train(weights, x, y, training, privacy, noise_multiplier, seed, accountant)
    if accountant is not None:
        raise ValueError("accountant is only fed by the opacus engine")
    rng = np.random.default_rng(seed)  # seed None: 128 bits of OS entropy
    return _vectorised_train(weights, x, y, training, privacy, noise_multiplier, rng)
