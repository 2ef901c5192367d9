"""The noised release of a silo's normalisation statistics (Gaussian mechanism) and its use.

Under `privacy: dp` the statistics round is a release like a training round: one
Gaussian mechanism over the whole training split (sample rate 1, one step) charged in
the same RDP accountant and ledger. Its sensitivity comes from the schema: every value
is clipped to its range and rescaled to z = (x - centre) / half_width (features.StatBounds).
The mechanism releases COUNT_WEIGHT * n, every sum of z and the sums of z^2 of features
with more than two values, so one record moves that vector by at most

    sqrt(COUNT_WEIGHT^2 + 1 per numeric feature + 1 per one-hot group
         + 1 per numeric feature with more than two values)

in L2 norm (|z| <= 1; at most one level of a one-hot group is 1). The count is weighted
up because every other statistic is divided by it and it is the aggregation weight.
A two-valued feature's z^2 is a linear function of z, so its sum of squares is computed
from the noised sum and count: post-processing, like everything else derived here (the
pooled normaliser, the aggregation weight), which costs nothing more.
"""

from __future__ import annotations

import math

import numpy as np

from silo_node.features import STD_EPS, StatBounds, normaliser_from_moments

COUNT_WEIGHT = 2.0  # the count's noise is this many times smaller than a sum's (in z units)
MIN_STD_Z = 0.1  # a noised variance below (0.1 half-widths)^2 is floored there: never divide by ~0


def sensitivity(bounds: StatBounds) -> float:
    """L2 bound on what one record adds to the released, z-scaled vector (see module doc)."""
    squares = int(np.count_nonzero(~bounds.two_valued))
    return math.sqrt(COUNT_WEIGHT ** 2 + bounds.n_numeric + bounds.groups + squares)


def moment_units(bounds: StatBounds) -> np.ndarray:
    """Per slot, the size of one z unit in the moments' own units: [1, half_width, half_width^2]."""
    return np.concatenate([[1.0], bounds.half_width, bounds.half_width ** 2])


def add_gaussian_noise(m: np.ndarray, bounds: StatBounds, noise_multiplier: float,
                       rng: np.random.Generator) -> np.ndarray:
    """The moments with N(0, (noise_multiplier * sensitivity)^2) on each released z slot
    (the count's divided by COUNT_WEIGHT), two-valued sums of squares derived from the rest."""
    scale = noise_multiplier * sensitivity(bounds)
    z_noise = rng.normal(0.0, scale, size=len(m))
    z_noise[0] /= COUNT_WEIGHT
    noised = m + z_noise * moment_units(bounds)
    return with_derived_squares(noised, bounds)


def with_derived_squares(m: np.ndarray, bounds: StatBounds) -> np.ndarray:
    """Sums of squares of two-valued features from their sums and the count (exact for true data).

    With z in {u, v}, z^2 = (u + v) z - u v, so sum z^2 = (u + v) sum z - u v n.
    """
    d = len(bounds.centre)
    h, c = bounds.half_width, bounds.centre
    u, v = (bounds.low - c) / h, (bounds.high - c) / h
    derived = ((u + v) * (m[1 : 1 + d] / h) - u * v * m[0]) * h * h
    out = m.copy()
    out[1 + d :] = np.where(bounds.two_valued, derived, m[1 + d :])
    return out


def released_count(m: np.ndarray) -> float:
    """The (noised) row count of a statistics release: its first slot."""
    return float(m[0])


def weight_rows(count: float, min_rows: int, max_rows: int) -> int:
    """A noised count as an aggregation weight: rounded and clamped to the schema's public
    min_rows..max_rows (a silo with fewer rows cannot join; post-processing, no cost)."""
    return int(min(max(round(count), min_rows, 1), max_rows))


def normaliser_from_noised(m: np.ndarray, bounds: StatBounds) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std from pooled noised moments, kept usable whatever the noise drew.

    The count is taken as at least 2, the mean is clamped to the schema's interval and the
    variance to [MIN_STD_Z^2, largest possible variance on that interval], in z units: the
    noise can make a sum of squares smaller than the squared sum (negative variance) or
    push a mean outside what clipped values allow, and both facts are public.
    """
    n = max(float(m[0]), 2.0)
    d = (len(m) - 1) // 2
    h, c = bounds.half_width, bounds.centre
    mean_z = np.clip(m[1 : 1 + d] / (n * h), (bounds.low - c) / h, (bounds.high - c) / h)
    var_z = (m[1 + d :] / (n * h * h) - mean_z ** 2) * n / (n - 1.0)
    widest = ((bounds.high - bounds.low) / (2.0 * h)) ** 2
    var_z = np.clip(var_z, MIN_STD_Z ** 2, np.maximum(widest, MIN_STD_Z ** 2))
    return c + h * mean_z, h * np.sqrt(var_z) + STD_EPS


def pooled_normaliser(m: np.ndarray, bounds: StatBounds, noised: bool) -> tuple[np.ndarray, np.ndarray]:
    """The normaliser every silo derives from the pooled statistics (guarded when noised)."""
    return normaliser_from_noised(m, bounds) if noised else normaliser_from_moments(m, bounds.centre)
