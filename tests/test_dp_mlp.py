"""The ghost-norm MLP engine (silo_node.dp_mlp) held to Opacus' GradSampleModule + DPOptimizer.

Same model, same batch, same seeds: the same per-sample norms, the same clipped sum,
the same noise (draw for draw) and, over many steps with Poisson sampling, the same
trajectory. Float64 models, so the comparisons are to 1e-10, not to float32 rounding.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from policies.privacy import PrivacyPolicy
from policies.study import Training
from silo_node import dp

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")
from opacus import GradSampleModule  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # noqa: E402

from silo_node import dp_mlp  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
nn = torch.nn
BCE_SUM = nn.BCEWithLogitsLoss(reduction="sum")


def _mlp(seed: int = 0) -> nn.Sequential:
    """Three Linear layers, two activations, a bias-free layer: every case the engine handles."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 1)).double()


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows on very different scales, so some per-sample gradients are clipped and some are not."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) * rng.choice([0.05, 4.0], size=(n, 1))
    y = (rng.random((n, 1)) < 0.5).astype(float)
    return torch.as_tensor(x), torch.as_tensor(y)


def _opacus(model: nn.Sequential, sigma: float, clip: float, batch: int, lr: float,
            generator: torch.Generator | None = None) -> tuple[GradSampleModule, DPOptimizer]:
    module = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(module.parameters(), lr=lr), noise_multiplier=sigma, max_grad_norm=clip,
                      expected_batch_size=batch, generator=generator)
    return module, opt


def _params(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.parameters()])


def test_per_sample_norms_and_clipped_sum_equal_opacus() -> None:
    x, y = _data()
    clip = 1.0
    model = _mlp()
    module, opt = _opacus(copy.deepcopy(model), 0.0, clip, len(y), 0.1)
    (nn.BCEWithLogitsLoss()(module(x), y)).backward()  # Opacus' usual mean loss: it rescales per-sample grads
    theirs_norms = torch.stack([p.grad_sample.reshape(len(y), -1).norm(dim=1) for p in module.parameters()], 1).norm(dim=1)
    opt.clip_and_accumulate()
    theirs_sums = [p.summed_grad for p in module.parameters()]

    ours = dp_mlp.clipped_step(model, x, y, clip, BCE_SUM)
    assert (ours.norms > clip).any() and (ours.norms < clip).any(), "the batch must exercise clipping both ways"
    np.testing.assert_allclose(ours.norms.numpy(), theirs_norms.numpy(), rtol=1e-10, atol=1e-12)
    assert [tuple(s.shape) for s in ours.summed] == [tuple(p.shape) for p in model.parameters()]
    for mine, theirs in zip(ours.summed, theirs_sums):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-10, atol=1e-12)


def test_noise_is_opacus_noise_draw_for_draw() -> None:
    """One step on one batch with the same noise generator seed: identical parameters after the step."""
    x, y = _data()
    sigma, clip, lr, batch = 1.7, 0.5, 0.3, 4
    model = _mlp()
    module, opt = _opacus(copy.deepcopy(model), sigma, clip, batch, lr, torch.Generator().manual_seed(5))
    nn.BCEWithLogitsLoss()(module(x), y).backward()
    opt.step()

    before = _params(model)
    step = dp_mlp.clipped_step(model, x, y, clip, BCE_SUM)
    dp_mlp.noisy_step(model, step.summed, sigma, clip, batch, lr, torch.Generator().manual_seed(5))
    np.testing.assert_allclose(_params(model), _params(module._module), rtol=0, atol=1e-12)

    clean = before - lr * np.concatenate([s.numpy().ravel() for s in step.summed]) / batch
    noise = (clean - _params(model)) * batch / lr
    assert noise.std() == pytest.approx(sigma * clip, rel=0.2)  # 103 draws of N(0, (sigma C)^2)
    assert abs(noise.mean()) < 0.3 * sigma * clip


def test_trajectory_with_poisson_sampling_and_noise_equals_opacus_engine() -> None:
    """Many steps, Opacus' own Poisson sampler and noise on the same generators: the same model."""
    x, y = _data(n=40, seed=1)
    training = Training(local_steps=30, batch_size=8, client_lr=0.2)
    privacy = PrivacyPolicy(epsilon=1.0, delta=1e-3, max_grad_norm=0.8)
    sigma, seed = 1.1, 123
    model = _mlp(seed=3)
    sampling, noise = dp.opacus_generators(seed)
    module, opt = _opacus(copy.deepcopy(model), sigma, privacy.max_grad_norm, training.batch_size,
                          training.client_lr, noise)
    sampler = UniformWithReplacementSampler(num_samples=len(y), sample_rate=training.batch_size / len(y),
                                            generator=sampling, steps=training.local_steps)
    for rows in sampler:
        opt.zero_grad()
        nn.BCEWithLogitsLoss()(module(x[rows]), y[rows]).backward()
        opt.step()

    start = _params(model)
    dp_mlp.dp_mlp_train(model, x, y, training, privacy, sigma, seed=seed)
    assert np.abs(_params(model) - start).max() > 0.05, "the model must actually move"
    np.testing.assert_allclose(_params(model), _params(module._module), rtol=0, atol=1e-10)


def test_empty_poisson_batch_adds_noise_only() -> None:
    x, y = _data()
    model = _mlp()
    step = dp_mlp.clipped_step(model, x[:0], y[:0], 1.0, BCE_SUM)
    assert step.norms.shape == (0,)
    assert all(float(s.abs().max()) == 0.0 for s in step.summed)
    before = _params(model)
    dp_mlp.noisy_step(model, step.summed, 1.0, 1.0, 4, 0.1, torch.Generator().manual_seed(0))
    assert not np.allclose(_params(model), before)


def test_without_a_seed_every_run_draws_fresh_noise() -> None:
    x, y = _data()
    training, privacy = Training(local_steps=3, batch_size=4), PrivacyPolicy(epsilon=1.0, delta=1e-3)
    a = dp_mlp.dp_mlp_train(_mlp(), x, y, training, privacy, 1.0)
    b = dp_mlp.dp_mlp_train(_mlp(), x, y, training, privacy, 1.0)
    assert not np.allclose(_params(a), _params(b))


def test_learns_a_separable_problem_without_noise() -> None:
    rng = np.random.default_rng(4)
    xn = rng.normal(size=(400, 5))
    x, y = torch.as_tensor(xn), torch.as_tensor((xn @ rng.normal(size=5) > 0).astype(float)[:, None])
    model = dp_mlp.dp_mlp_train(_mlp(), x, y, Training(local_steps=300, batch_size=32, client_lr=0.5),
                                PrivacyPolicy(epsilon=1.0, delta=1e-3, max_grad_norm=1.0), 0.0, seed=0)
    accuracy = float(((model(x) > 0).double() == y).double().mean())
    assert accuracy > 0.9, f"accuracy {accuracy:.3f} (chance is about 0.5)"


@pytest.mark.parametrize("layer, name", [(nn.BatchNorm1d(8), "BatchNorm1d"), (nn.Dropout(0.1), "Dropout"),
                                         (nn.Softmax(dim=1), "Softmax")])
def test_layers_that_mix_samples_or_are_not_elementwise_are_refused(layer: nn.Module, name: str) -> None:
    model = nn.Sequential(nn.Linear(5, 8), layer, nn.Linear(8, 1)).double()
    with pytest.raises(TypeError, match=f"layer 1 of the model is {name}"):
        dp_mlp.check_mlp(model)


def test_sequence_input_is_refused() -> None:
    x, y = _data()
    with pytest.raises(ValueError, match=r"2-D input .* shape \(2, 8, 5\)"):
        dp_mlp.clipped_step(_mlp(), x.reshape(2, 8, 5), y, 1.0, BCE_SUM)
