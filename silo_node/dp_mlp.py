"""DP-SGD for multilayer perceptrons without per-sample gradients: ghost norms, one matmul per layer.

Opacus' default engine materialises every sample's gradient of every layer (hooks keep
a batch x out x in tensor per Linear), which made a 100k-parameter MLP 14-26x slower
than non-private training (BENCHMARKS.md section 3). For a Linear layer on
non-sequence input, sample i's weight gradient is the outer product g_i a_i^T of the
gradient at the layer's output and the layer's input, so

    ||grad_i W||^2 = ||a_i||^2 ||g_i||^2      ||grad_i b||^2 = ||g_i||^2
    sum_i c_i grad_i W = (c * g)^T a          (one matmul, like the non-private step)

and nothing of size batch x out x in is ever built. The backward pass stops at each
layer's output (weights are detached), so it also skips the non-private weight-gradient
matmuls that the clipped sum then replaces.

Everything else is Opacus' DPOptimizer step, operation for operation: Poisson sampling
as UniformWithReplacementSampler draws it (torch.rand(n) < q), flat clipping with
factor min(1, C / (norm + 1e-6)), Gaussian noise N(0, (sigma C)^2) per parameter in
parameter order from the noise generator (as `_generate_noise`), division by the
expected batch size, then plain SGD. tests/test_dp_mlp.py holds it to Opacus'
GradSampleModule + DPOptimizer on the same seeds. The engine for the shipped
logistic-regression model is silo_node.dp; both account with the same plan
(silo_node.dp.plan_for_silo) and ledger.

Scope: a torch `nn.Sequential` of `nn.Linear` and elementwise activations, on 2-D
input (one feature vector per row). Anything else is refused, because the ghost norm
identity does not hold for layers that mix samples or see sequences.
"""

from __future__ import annotations

import secrets
from typing import Callable, NamedTuple

import torch
from torch import nn

from policies.privacy import PrivacyPolicy
from policies.study import Training
from silo_node.dp import CLIP_STABILISER, opacus_generators, sample_rate_for

# Activations that act on each element alone, so a sample's gradient depends on that sample only.
ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
)

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ClippedStep(NamedTuple):
    """One batch's per-sample gradient norms and clipped gradient sums (before noise)."""

    norms: torch.Tensor  # (batch,) L2 norm of each sample's whole gradient
    summed: list[torch.Tensor]  # sum_i c_i grad_i, one per parameter, in model.parameters() order


def check_mlp(model: nn.Module) -> list[nn.Linear]:
    """The model's Linear layers in order; refuses any model the ghost-norm identity does not cover."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"dp_mlp trains an nn.Sequential of Linear layers and activations, not {type(model).__name__}")
    linears = []
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            linears.append(layer)
        elif not isinstance(layer, ELEMENTWISE):
            raise TypeError(
                f"layer {i} of the model is {type(layer).__name__}: dp_mlp handles only nn.Linear and elementwise "
                f"activations ({', '.join(t.__name__ for t in ELEMENTWISE)})"
            )
    if not linears:
        raise TypeError("the model has no nn.Linear layer to train")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for i, layer in enumerate(linears):
        if any(id(p) not in trainable for p in layer.parameters()):
            raise TypeError(f"Linear layer {i} has a frozen parameter; dp_mlp trains every parameter")
    return linears


def clipped_step(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
                 criterion: Criterion) -> ClippedStep:
    """Per-sample norms by ghost norms, and the clipped gradient sum by one matmul per layer.

    `criterion(output, y)` must be the SUM of per-sample losses (reduction="sum"): then the
    gradient at a layer's output is each sample's own, as Opacus' per-sample gradients are.
    """
    check_mlp(model)
    _check_rows(x)
    return _clipped_step(model, x, y, max_grad_norm, criterion)


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"dp_mlp needs 2-D input (rows x features), got shape {tuple(x.shape)}")


def _clipped_step(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
                  criterion: Criterion) -> ClippedStep:
    inputs, outputs, prediction = _forward(model, x)
    if len(x) == 0:  # an empty Poisson batch: nothing to clip, the noise is still added
        grads: tuple[torch.Tensor, ...] = tuple(o.detach() for o in outputs)
        norms = x.new_zeros(0)
    else:
        grads = torch.autograd.grad(criterion(prediction, y), outputs)
        norms = _ghost_norms(model, inputs, grads)
    factors = (max_grad_norm / (norms + CLIP_STABILISER)).clamp(max=1.0)
    summed: list[torch.Tensor] = []
    for layer, a, g in zip(_linears(model), inputs, grads):
        cg = g * factors.unsqueeze(1)
        summed.append(cg.T @ a)
        if layer.bias is not None:
            summed.append(cg.sum(dim=0))
    return ClippedStep(norms, summed)


def _linears(model: nn.Sequential) -> list[nn.Linear]:
    return [layer for layer in model if isinstance(layer, nn.Linear)]


def _forward(model: nn.Sequential, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(inputs, outputs) of every Linear layer, and the model's output.

    The weights enter as constants and the first layer's output is a leaf of the graph,
    so backward computes only gradients at layer outputs (one matmul per layer), never
    the weight gradients that the clipped sum replaces.
    """
    inputs, outputs = [], []
    h = x
    for layer in model:
        if isinstance(layer, nn.Linear):
            bias = None if layer.bias is None else layer.bias.detach()
            inputs.append(h.detach())
            h = nn.functional.linear(h, layer.weight.detach(), bias)
            if not h.requires_grad:
                h.requires_grad_(True)
            outputs.append(h)
        else:
            h = layer(h)
    return inputs, outputs, h


def _ghost_norms(model: nn.Sequential, inputs: list[torch.Tensor], grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """sqrt(sum over layers of ||a_i||^2 ||g_i||^2 (weight) + ||g_i||^2 (bias)), per sample."""
    total = torch.zeros(len(inputs[0]), dtype=grads[0].dtype, device=grads[0].device)
    for layer, a, g in zip(_linears(model), inputs, grads):
        g2 = g.pow(2).sum(dim=1)
        total += a.pow(2).sum(dim=1) * g2
        if layer.bias is not None:
            total += g2
    return total.sqrt()


def poisson_batch(generator: torch.Generator, n: int, sample_rate: float) -> torch.Tensor:
    """Indices of one Poisson batch: each row in with probability q, drawn as Opacus' sampler draws it."""
    return (torch.rand(n, generator=generator) < sample_rate).nonzero(as_tuple=False).reshape(-1)


def gaussian_noise(std: float, reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) shaped like `reference`, from `generator`, as Opacus' non-secure _generate_noise."""
    if std == 0:
        return torch.zeros_like(reference)
    return torch.normal(mean=0, std=std, size=reference.shape, device=reference.device, generator=generator,
                        dtype=reference.dtype)


def noisy_step(model: nn.Sequential, summed: list[torch.Tensor], noise_multiplier: float, max_grad_norm: float,
               expected_batch_size: int, lr: float, generator: torch.Generator) -> None:
    """p -= lr * (clipped sum + noise) / expected batch: DPOptimizer.add_noise, scale_grad, then SGD."""
    with torch.no_grad():
        for p, s in zip(model.parameters(), summed):
            grad = s + gaussian_noise(noise_multiplier * max_grad_norm, s, generator)
            grad /= expected_batch_size
            p.add_(grad.view_as(p), alpha=-lr)


def dp_mlp_train(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, training: Training, privacy: PrivacyPolicy,
    noise_multiplier: float, seed: int | None = None, *, criterion: Criterion | None = None,
) -> nn.Sequential:
    """`training.local_steps` DP-SGD steps on `model`, in place; returns the model.

    Spends (noise_multiplier, batch_size/n, local_steps), exactly what silo_node.dp's plan
    and the ledger account. `seed=None` draws the sample and the noise from OS entropy,
    as a real study must; the (sampling, noise) generators for a seed are those of
    silo_node.dp.opacus_generators, so the same seed gives Opacus' engine the same draws.
    `criterion` defaults to BCEWithLogitsLoss(reduction="sum") on (rows, 1) outputs.
    """
    check_mlp(model)
    _check_rows(x)
    criterion = criterion or nn.BCEWithLogitsLoss(reduction="sum")
    n = len(x)
    q = sample_rate_for(training.batch_size, n)
    sampling, noise = opacus_generators(secrets.randbits(63) if seed is None else seed)
    for _ in range(training.local_steps):
        rows = poisson_batch(sampling, n, q)
        step = _clipped_step(model, x[rows], y[rows], privacy.max_grad_norm, criterion)
        noisy_step(model, step.summed, noise_multiplier, privacy.max_grad_norm, training.batch_size,
                   training.client_lr, noise)
    return model
