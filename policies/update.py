"""Layout of what a silo contributes to a sum: `[a_k * w, a_k, 1]`.

The aggregation weight a_k travels inside the vector, so any subset of silos sums to a
correctly weighted mean (k of n is enough) and the last slot counts the contributors.
The same layout is used in plaintext and, later, under CKKS where only sums are possible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pack_update(weights: np.ndarray, a_k: float) -> np.ndarray:
    return np.concatenate([a_k * np.asarray(weights, dtype=np.float64), [a_k, 1.0]])


@dataclass(frozen=True)
class SummedUpdate:
    mean: np.ndarray
    total_weight: float
    contributors: int


def unpack_sum(vec: np.ndarray) -> SummedUpdate:
    vec = np.asarray(vec, dtype=np.float64)
    total = float(vec[-2])
    if total <= 0:
        raise ValueError("summed aggregation weight is not positive: no usable contribution")
    return SummedUpdate(mean=vec[:-2] / total, total_weight=total, contributors=int(round(vec[-1])))


def sum_vectors(vectors: list[np.ndarray]) -> np.ndarray:
    """Element-wise sum of same-length contribution vectors (the coordinator's whole job)."""
    if not vectors:
        raise ValueError("nothing to sum")
    lengths = {len(v) for v in vectors}
    if len(lengths) != 1:
        raise ValueError(f"contributions have different lengths {sorted(lengths)}")
    return np.sum(np.stack(vectors), axis=0)
