"""The study's feature pipeline applied to a local cohort (FLamby Fed-Heart-Disease protocol).

Everything here runs at the silo on patient rows; only the normalisation moments
(count, sum, sum of squares per feature) ever leave, and only as a vector to be summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from policies.errors import PolicyError
from policies.schema import ColumnRule
from policies.study import StudySpec

STD_EPS = 1e-9


@dataclass(frozen=True)
class Design:
    """A silo's model-ready data: raw (unnormalised) features, labels, and the split."""

    x: np.ndarray  # float64, rows x features, not normalised
    y: np.ndarray  # float64 0/1
    train_idx: np.ndarray
    test_idx: np.ndarray

    @property
    def x_train(self) -> np.ndarray:
        return self.x[self.train_idx]

    @property
    def y_train(self) -> np.ndarray:
        return self.y[self.train_idx]

    @property
    def x_test(self) -> np.ndarray:
        return self.x[self.test_idx]

    @property
    def y_test(self) -> np.ndarray:
        return self.y[self.test_idx]


def build_design(frame: pd.DataFrame, study: StudySpec) -> Design:
    """Drop columns, drop incomplete rows, one-hot (first level dropped), label, split."""
    fp = study.features
    used = [c for c in frame.columns if c not in fp.drop_columns]
    complete = frame[used].dropna(axis=0, how="any")
    parts = [complete[fp.numeric].astype("float64").to_numpy()]
    for col, levels in fp.one_hot.items():
        values = complete[col].astype("float64").to_numpy()
        parts.append(np.stack([(values == lvl).astype("float64") for lvl in levels[1:]], axis=1))
    x = np.concatenate(parts, axis=1)
    y = (complete[study.cohort.label_column].astype("float64").to_numpy() > fp.label_threshold).astype("float64")
    train_idx, test_idx = split_indices(y, study)
    return Design(x=x, y=y, train_idx=train_idx, test_idx=test_idx)


def split_indices(y: np.ndarray, study: StudySpec) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's split: stratified when both classes have more than 2 rows."""
    n = len(y)
    counts = np.bincount(y.astype(int), minlength=2)
    stratify = y if study.split.stratify and (counts > 2).all() else None
    train, test = train_test_split(
        np.arange(n), train_size=study.split.train_size, test_size=1 - study.split.train_size,
        random_state=study.split.seed, shuffle=True, stratify=stratify,
    )
    return np.asarray(train), np.asarray(test)


def moments(x: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """[n, sum per feature..., sum of squares per feature...] of x - centre (0 by default).

    All a silo shares for normalisation. Released moments are of values clipped to the
    schema and centred on the middle of each range (StatBounds): that halves what one
    record can add to a sum, hence the noise a private release needs.
    """
    xc = x if centre is None else x - centre
    return np.concatenate([[float(len(x))], xc.sum(axis=0), (xc * xc).sum(axis=0)])


def normaliser_from_moments(m: np.ndarray, centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased std (+1e-9, as FLamby) from summed moments of one or many silos."""
    n = m[0]
    d = (len(m) - 1) // 2
    s, ss = m[1 : 1 + d], m[1 + d :]
    mean = s / n
    var = np.maximum(ss - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    return mean + (0.0 if centre is None else centre), np.sqrt(var) + STD_EPS


@dataclass(frozen=True)
class StatBounds:
    """Per model feature, the interval [low, high] the schema allows, for the released statistics.

    `centre` and `half_width` rescale a clipped value into z = (x - centre) / half_width:
    numeric features land in [-1, 1]; one-hot columns keep centre 0 and width 1 (z in {0, 1}),
    so a record's one-hot group adds at most 1 to the group's sums. `groups` counts the
    one-hot groups, which bound a record's contribution together (see stats_release).
    `two_valued` marks features that take only their two bounds (binary categories, one-hot):
    their sum of squares follows from their sum and the count, so it is not released apart.
    """

    low: np.ndarray
    high: np.ndarray
    centre: np.ndarray
    half_width: np.ndarray
    n_numeric: int
    groups: int
    two_valued: np.ndarray


def stat_bounds(study: StudySpec) -> StatBounds:
    """Bounds from the schema: a numeric feature's range, else its categories; one-hot [0, 1]."""
    numeric = [_numeric_bounds(col, study.cohort.columns[col]) for col in study.features.numeric]
    dummies = sum(len(levels) - 1 for levels in study.features.one_hot.values())
    low = np.asarray([b[0] for b in numeric] + [0.0] * dummies, dtype=np.float64)
    high = np.asarray([b[1] for b in numeric] + [1.0] * dummies, dtype=np.float64)
    two_valued = np.asarray([b[2] for b in numeric] + [True] * dummies, dtype=bool)
    k = len(numeric)
    centre = np.concatenate([(low[:k] + high[:k]) / 2.0, np.zeros(dummies)])
    half = np.concatenate([(high[:k] - low[:k]) / 2.0, np.ones(dummies)])
    half = np.where(half > 0, half, 1.0)  # a single-value range: nothing varies, any width is exact
    return StatBounds(low, high, centre, half, k, len(study.features.one_hot), two_valued)


def _numeric_bounds(col: str, rule: ColumnRule) -> tuple[float, float, bool]:
    """(low, high, takes only those two values) of one numeric column.

    A column with neither range nor categories cannot be clipped, so what one record adds
    to its sums (and the noise a private release needs) would be unbounded: refused by name.
    """
    if rule.range is not None:
        return float(rule.range[0]), float(rule.range[1]), False
    if rule.categories:
        try:
            values = sorted({float(c) for c in rule.categories})
        except ValueError:
            raise PolicyError(f"numeric feature '{col}' has non-numeric categories in the schema") from None
        return values[0], values[-1], len(values) == 2
    raise PolicyError(
        f"numeric feature '{col}' has neither a range nor categories in the schema: the statistics round "
        "clips every value to the schema, so give the column a range"
    )


def clipped_moments(x: np.ndarray, bounds: StatBounds) -> np.ndarray:
    """Moments of the rows clipped to the schema's bounds, centred: what the statistics round releases."""
    return moments(np.clip(x, bounds.low, bounds.high), bounds.centre)


def normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (x - mean) / std


def feature_scales(study: StudySpec) -> np.ndarray:
    """A bound on |value| per model feature, from the schema (ranges, categories; one-hot 1).

    Used to scale statistics before encryption so that sums stay inside CKKS headroom.
    """
    scales = []
    for col in study.features.numeric:
        rule = study.cohort.columns[col]
        if rule.range is not None:
            scales.append(max(abs(rule.range[0]), abs(rule.range[1]), 1.0))
        elif rule.categories:
            scales.append(max(max(abs(float(c)) for c in rule.categories), 1.0))
        else:
            scales.append(1.0)
    for levels in study.features.one_hot.values():
        scales += [1.0] * (len(levels) - 1)
    return np.asarray(scales, dtype=np.float64)
