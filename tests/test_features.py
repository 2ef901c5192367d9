"""The feature pipeline reproduces FLamby's Fed-Heart-Disease rows, split and columns."""

import numpy as np

from silo_node.cohort import read_cohort
from silo_node.features import build_design, moments, normaliser_from_moments

FLAMBY_SPLIT = {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va": (85, 45)}


def test_flamby_rows_split_and_columns(heart_study, sample_paths):
    total_train = total_test = 0
    for silo, (n_train, n_test) in FLAMBY_SPLIT.items():
        design = build_design(read_cohort(sample_paths[silo]), heart_study)
        assert design.x.shape[1] == 13
        assert (len(design.train_idx), len(design.test_idx)) == (n_train, n_test), silo
        assert not np.intersect1d(design.train_idx, design.test_idx).size
        total_train += n_train
        total_test += n_test
    assert (total_train + total_test, total_train, total_test) == (740, 486, 254)
    assert heart_study.feature_names() == [
        "age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak",
        "cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2",
    ]


def test_switzerland_chol_zero_is_kept_as_a_value(heart_study, sample_paths):
    design = build_design(read_cohort(sample_paths["switzerland"]), heart_study)
    assert (design.x[:, 3] == 0).all()


def test_pooled_moments_equal_pooled_rows(heart_study, sample_paths):
    designs = [build_design(read_cohort(p), heart_study) for p in sample_paths.values()]
    summed = sum(moments(d.x_train) for d in designs)
    mean, std = normaliser_from_moments(summed)
    pooled = np.concatenate([d.x_train for d in designs])
    np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pooled.std(axis=0, ddof=1) + 1e-9, rtol=1e-9)
