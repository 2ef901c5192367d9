"""DP-SGD: calibration against Opacus' RDP accountant, and the vectorised engine held to Opacus'.

The vectorised engine is the default only because these tests show it clips, sums,
scales and noises exactly as Opacus' GradSampleModule + DPOptimizer + DPDataLoader do.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from policies.errors import PolicyError
from policies.privacy import PrivacyPolicy
from policies.study import Training
from silo_node import dp

torch = pytest.importorskip("torch")
opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402

HEART_TRAIN_ROWS = {"cleveland": 199, "hungary": 172, "switzerland": 30, "va": 85}
FLAMBY_DELTA = 1e-3

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _data(n: int = 12, d: int = 13, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features on very different scales, so some rows are clipped and some are not."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.choice([0.05, 3.0], size=(n, 1))
    y = (rng.random(n) < 0.5).astype(float)
    return x, y, rng.normal(size=d + 1) * 0.3


def _fresh_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    return accountant.get_epsilon(delta=delta)


# ---- calibration -----------------------------------------------------------------------------


@pytest.mark.parametrize("silo", sorted(HEART_TRAIN_ROWS))
@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_calibration_spends_the_budget_over_the_planned_study(silo: str, epsilon: float) -> None:
    training = Training()  # 15 rounds x 100 steps, batch 4
    plan = dp.plan_for_silo(training, PrivacyPolicy(epsilon=epsilon, delta=FLAMBY_DELTA), HEART_TRAIN_ROWS[silo])
    spent = _fresh_epsilon(plan.noise_multiplier, plan.sample_rate, training.rounds * training.local_steps, FLAMBY_DELTA)
    assert plan.sample_rate == training.batch_size / HEART_TRAIN_ROWS[silo]
    assert epsilon * 0.99 <= spent <= epsilon


def test_noise_multipliers_at_epsilon_one_are_as_expected() -> None:
    """The smaller the silo, the larger q and the more noise the same budget needs."""
    sigma = {s: dp.plan_for_silo(Training(), PrivacyPolicy(epsilon=1.0, delta=FLAMBY_DELTA), n).noise_multiplier
             for s, n in HEART_TRAIN_ROWS.items()}
    assert 2.3 < sigma["cleveland"] < 2.5
    assert 14.5 < sigma["switzerland"] < 15.5
    assert sigma["cleveland"] < sigma["hungary"] < sigma["va"] < sigma["switzerland"]


def test_delta_not_below_one_over_n_is_refused() -> None:
    with pytest.raises(PolicyError, match="1/n"):
        dp.plan_for_silo(Training(), PrivacyPolicy(epsilon=1.0, delta=0.05), 30)


def test_history_merges_like_the_accountant() -> None:
    history = dp.add_to_history([], 2.0, 0.02, 100)
    history = dp.add_to_history(history, 2.0, 0.02, 100)
    assert history == [(2.0, 0.02, 200)]
    assert dp.epsilon_of(history, 1e-3) == pytest.approx(_fresh_epsilon(2.0, 0.02, 200, 1e-3), rel=1e-12)
    assert dp.epsilon_of([], 1e-3) == 0.0


# ---- the vectorised step against Opacus -----------------------------------------------------------


def _opacus_per_sample(weights: np.ndarray, x: np.ndarray, y: np.ndarray, clip: float):
    """Opacus' per-sample norms and clipped sum ([w..., b]) for one fixed batch, no noise."""
    d = x.shape[1]
    model = GradSampleModule(dp._opacus_model(weights, d))
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=clip, expected_batch_size=len(y))
    loss = torch.nn.BCEWithLogitsLoss()(model(torch.as_tensor(x)), torch.as_tensor(y).unsqueeze(1))
    loss.backward()
    weight, bias = model._module.weight, model._module.bias
    per_sample = torch.cat([weight.grad_sample.reshape(len(y), -1), bias.grad_sample.reshape(len(y), -1)], dim=1)
    opt.clip_and_accumulate()
    summed = torch.cat([weight.summed_grad.reshape(-1), bias.summed_grad.reshape(-1)])
    return per_sample.norm(dim=1).numpy(), summed.numpy()


def test_per_sample_norms_and_clipped_sum_equal_opacus() -> None:
    x, y, w = _data()
    clip = 1.0
    norms, summed = _opacus_per_sample(w, x, y, clip)
    ours = np.linalg.norm(dp.per_sample_gradients(w, x, y), axis=1)
    assert (ours > clip).any() and (ours < clip).any(), "the batch must exercise clipping both ways"
    np.testing.assert_allclose(ours, norms, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dp.clipped_gradient_sum(w, x, y, clip), summed, rtol=0, atol=1e-6)


def test_trajectory_without_noise_equals_opacus_engine() -> None:
    """q = 1 puts every row in every batch, so both engines see the same batches."""
    x, y, w = _data()
    training = Training(local_steps=25, batch_size=len(y), client_lr=0.5)
    privacy = PrivacyPolicy(epsilon=1.0, delta=1e-3, max_grad_norm=0.7)
    ours = dp.dp_local_train(w, x, y, training, privacy, 0.0, seed=1)
    theirs = dp.dp_local_train(w, x, y, training, privacy, 0.0, seed=1, engine="opacus")
    assert np.abs(ours - w).max() > 1e-2, "the model must actually move"
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_noise_scale_equals_opacus_engine() -> None:
    """One step, same batch, many seeds: (noisy - clean) / lr * B has std sigma * C in both engines."""
    x, y, w = _data(n=6)
    sigma, clip, draws = 2.0, 0.5, 300
    training = Training(local_steps=1, batch_size=len(y), client_lr=1.0)
    privacy = PrivacyPolicy(epsilon=1.0, delta=1e-3, max_grad_norm=clip)
    clean = dp.dp_local_train(w, x, y, training, privacy, 0.0, seed=0)

    def noise(engine: str) -> np.ndarray:
        runs = [dp.dp_local_train(w, x, y, training, privacy, sigma, seed=s, engine=engine) for s in range(draws)]
        return (clean - np.array(runs)) * len(y) / training.client_lr

    ours, theirs = noise("vectorised"), noise("opacus")
    for sample in (ours, theirs):
        assert abs(sample.mean()) < 0.1 * sigma * clip
        assert sample.std() == pytest.approx(sigma * clip, rel=0.05)
    assert ours.std() == pytest.approx(theirs.std(), rel=0.07)


def test_poisson_sampling_matches_opacus_sampler() -> None:
    n, q, steps = 30, 4 / 30, 4000
    ours = dp.poisson_masks(np.random.default_rng(0), steps, n, q).sum(axis=1)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(0), steps=steps)
    theirs = np.array([len(batch) for batch in sampler])
    for sizes in (ours, theirs):
        assert sizes.mean() == pytest.approx(n * q, rel=0.03)
        assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)
        assert (sizes == 0).any(), "empty batches happen at this rate and must be handled"


def test_opacus_engine_accounts_what_the_ledger_charges() -> None:
    x, y, w = _data(n=30)
    training = Training(local_steps=40, batch_size=4)
    accountant = RDPAccountant()
    dp.dp_local_train(w, x, y, training, PrivacyPolicy(epsilon=1.0, delta=1e-3), 3.0, seed=2,
                      engine="opacus", accountant=accountant)
    assert accountant.history == dp.add_to_history([], 3.0, 4 / 30, 40)


@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
def test_hand_assembled_opacus_engine_is_make_private() -> None:
    """When n is a multiple of the batch, make_private's q and divisor are ours: results must be identical."""
    x, y, w = _data(n=40)
    training = Training(local_steps=30, batch_size=4, client_lr=0.3)
    privacy = PrivacyPolicy(epsilon=1.0, delta=1e-3, max_grad_norm=0.8)
    seed, sigma = 11, 1.3
    sampling, noise = dp.opacus_generators(seed)
    data = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y).unsqueeze(1))
    model = dp._opacus_model(w, x.shape[1])
    module, opt, loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=training.client_lr),
        data_loader=torch.utils.data.DataLoader(data, batch_size=4, generator=sampling),
        noise_multiplier=sigma, max_grad_norm=privacy.max_grad_norm, noise_generator=noise,
    )
    assert opt.expected_batch_size == 4 and loader.sample_rate == 4 / 40
    for xb, yb in dp._take(loader, training.local_steps):
        opt.zero_grad()
        torch.nn.BCEWithLogitsLoss()(module(xb), yb).backward()
        opt.step()
    theirs = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    ours = dp.dp_local_train(w, x, y, training, privacy, sigma, seed=seed, engine="opacus")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


# ---- behaviour ---------------------------------------------------------------------------------------


def test_without_a_seed_every_run_draws_fresh_noise() -> None:
    x, y, w = _data()
    training, privacy = Training(local_steps=5), PrivacyPolicy(epsilon=1.0, delta=1e-3)
    assert not np.allclose(dp.dp_local_train(w, x, y, training, privacy, 1.0),
                           dp.dp_local_train(w, x, y, training, privacy, 1.0))


def test_dp_training_still_learns_at_epsilon_8() -> None:
    rng = np.random.default_rng(7)
    n, d = 200, 13
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) > 0).astype(float)
    training, privacy = Training(), PrivacyPolicy(epsilon=8.0, delta=FLAMBY_DELTA)
    plan = dp.plan_for_silo(training, privacy, n)
    w = np.zeros(d + 1)
    for r in range(training.rounds):
        w = dp.dp_local_train(w, x, y, training, privacy, plan.noise_multiplier, seed=r)
    accuracy = float(((x @ w[:d] + w[d] > 0) == y).mean())
    assert accuracy >= 0.8, f"accuracy {accuracy:.3f} at epsilon 8 (chance is about 0.5)"


def test_opacus_engine_handles_empty_poisson_batches() -> None:
    x, y, w = _data(n=5)
    training = Training(local_steps=60, batch_size=1)  # q = 0.2: P(empty batch) = 0.33 per step
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = dp.dp_local_train(w, x, y, training, PrivacyPolicy(epsilon=1.0, delta=1e-3), 1.0, seed=3, engine="opacus")
    assert np.isfinite(out).all()
