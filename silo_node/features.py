"""The study's feature pipeline applied to a local cohort (FLamby Fed-Heart-Disease protocol).

Everything here runs at the silo on patient rows; only the normalisation moments
(count, sum, sum of squares per feature) ever leave, and only as a vector to be summed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

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


def moments(x: np.ndarray) -> np.ndarray:
    """[n, sum per feature..., sum of squares per feature...]: all a silo shares for normalisation."""
    return np.concatenate([[float(len(x))], x.sum(axis=0), (x * x).sum(axis=0)])


def normaliser_from_moments(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased std (+1e-9, as FLamby) from summed moments of one or many silos."""
    n = m[0]
    d = (len(m) - 1) // 2
    s, ss = m[1 : 1 + d], m[1 + d :]
    mean = s / n
    var = np.maximum(ss - n * mean * mean, 0.0) / max(n - 1.0, 1.0)
    return mean, np.sqrt(var) + STD_EPS


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
