"""Local training and evaluation of the study model (torch), on normalised local data.

Weights travel as one flat float64 vector `[weight..., bias]` so that every party, and
later the CKKS packing, deals with a single layout whatever the model.
"""

from __future__ import annotations

import hashlib

import numpy as np

from policies.metrics import eval_counts
from policies.study import StudySpec


def _torch():
    import torch  # heavy: imported only when a silo actually trains

    return torch


def init_weights(study: StudySpec, n_features: int) -> np.ndarray:
    """The policy's seeded initial model: torch's default Linear init after manual_seed(seed)."""
    torch = _torch()
    torch.manual_seed(study.seed)
    layer = torch.nn.Linear(n_features, 1)
    return np.concatenate([layer.weight.detach().double().numpy().ravel(), layer.bias.detach().double().numpy()])


def derive_seed(*parts: object) -> int:
    """A reproducible 63-bit seed from named parts (study seed, round, silo)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def local_train(weights: np.ndarray, x: np.ndarray, y: np.ndarray, study: StudySpec, seed: int) -> np.ndarray:
    """SGD on BCE for `local_steps` mini-batches, reshuffling each pass as a DataLoader would."""
    torch = _torch()
    t = study.training
    n, d = x.shape
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
    w = torch.tensor(weights[:d], dtype=torch.float32).reshape(1, d).requires_grad_(True)
    b = torch.tensor(weights[d:], dtype=torch.float32).requires_grad_(True)
    opt = torch.optim.SGD([w, b], lr=t.client_lr)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(t.local_steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + t.batch_size]
        pos += t.batch_size
        opt.zero_grad()
        loss = loss_fn(xt[idx] @ w.T + b, yt[idx])
        loss.backward()
        opt.step()
    return np.concatenate([w.detach().double().numpy().ravel(), b.detach().double().numpy()])


def predict_scores(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    d = x.shape[1]
    logits = x @ weights[:d] + weights[d]
    return 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without exp overflow


def evaluate(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Count vector (see policies.metrics) of the model on (x, y)."""
    scores = predict_scores(weights, x)
    eps = 1e-12
    loss_sum = float(-np.sum(y * np.log(scores + eps) + (1 - y) * np.log(1 - scores + eps)))
    return eval_counts(y, scores, loss_sum)
