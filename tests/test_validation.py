"""Cohort validation on real Parquet files: each rule, severities, suppression, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from policies.errors import PolicyError
from policies.study import StudySpec
from policies.validation import RuleResult, ValidationReport, suppress, validate_cohort

INT_COLUMNS = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
               "thalach", "exang", "slope", "ca", "thal", "num"]
SENTINEL = 987654


def base_columns(n: int = 30) -> dict[str, list]:
    """A cohort that passes every rule of the heart study, with both label classes."""
    return {
        "age": [30 + i % 40 for i in range(n)],
        "sex": [i % 2 for i in range(n)],
        "cp": [1 + i % 4 for i in range(n)],
        "trestbps": [110 + i % 50 for i in range(n)],
        "chol": [180 + i for i in range(n)],
        "fbs": [i % 2 for i in range(n)],
        "restecg": [i % 3 for i in range(n)],
        "thalach": [120 + i % 60 for i in range(n)],
        "exang": [(i // 2) % 2 for i in range(n)],
        "oldpeak": [round(0.1 * (i % 30), 1) for i in range(n)],
        "slope": [1 + i % 3 for i in range(n)],
        "ca": [i % 4 for i in range(n)],
        "thal": [(3, 6, 7)[i % 3] for i in range(n)],
        "num": [i % 5 for i in range(n)],
    }


def to_table(cols: dict[str, list], types: dict[str, pa.DataType] | None = None) -> pa.Table:
    types = types or {}
    arrays = {}
    for name, values in cols.items():
        default = pa.int64() if name in INT_COLUMNS else None
        arrays[name] = pa.array(values, type=types.get(name, default))
    return pa.table(arrays)


def write(tmp_path: Path, cols: dict[str, list], name: str = "cohort.parquet",
          types: dict[str, pa.DataType] | None = None, row_group_size: int | None = None) -> Path:
    path = tmp_path / name
    pq.write_table(to_table(cols, types), path, row_group_size=row_group_size)
    return path


def by_rule(report: ValidationReport) -> dict[str, RuleResult]:
    return {r.rule: r for r in report.results}


def failed(report: ValidationReport) -> set[str]:
    return {r.rule for r in report.results if not r.passed}


def study_with_patient_id(study: StudySpec, id_type: str = "string") -> StudySpec:
    data = study.model_dump(mode="json")
    data["cohort"]["columns"]["patient_id"] = {"type": id_type}
    data["cohort"]["patient_id_column"] = "patient_id"
    return StudySpec.model_validate(data)


# ---------------------------------------------------------------- baseline


def test_clean_cohort_passes_every_rule(tmp_path, heart_study):
    report = validate_cohort(write(tmp_path, base_columns()), heart_study)
    assert report.ok
    assert failed(report) == set()
    assert report.rows == 30
    assert report.study_id == "heart-disease"
    assert report.policy_hash == heart_study.policy_hash()
    assert report.render().splitlines()[-1] == "OK: may join the study"
    assert "cohort.duplicate_patients" not in by_rule(report)  # no patient_id_column in the study


def test_rule_ids_and_descriptions(tmp_path, heart_study):
    rules = by_rule(validate_cohort(write(tmp_path, base_columns()), heart_study))
    for rid in ("column.age.present", "column.age.type", "column.age.missing_share",
                "column.age.range", "column.sex.categories", "cohort.min_rows", "cohort.label_classes"):
        assert rid in rules
    assert rules["column.chol.range"].description.startswith("values must lie in [80, 700] mg/dl")
    assert rules["column.oldpeak.range"].description.startswith("values must lie in [-3, 7] mm")
    assert rules["column.chol.range"].severity == "warning"
    assert rules["column.age.range"].severity == "error"
    assert rules["column.fbs.missing_share"].severity == "warning"


# ---------------------------------------------------------------- per-column rules


def test_type_failure_blocks_and_skips_value_checks(tmp_path, heart_study):
    cols = base_columns()
    cols["age"] = [str(v) for v in cols["age"]]
    report = validate_cohort(write(tmp_path, cols, types={"age": pa.string()}), heart_study)
    rules = by_rule(report)
    assert not report.ok
    assert not rules["column.age.type"].passed
    assert rules["column.age.type"].violations == 30
    assert "the file stores string" in rules["column.age.type"].description
    rng = rules["column.age.range"]
    assert not rng.passed and rng.violations == 0
    assert rng.description.startswith("not evaluated (type rule failed)")
    assert failed(report) == {"column.age.type", "column.age.range"}


def test_float_column_under_integer_rule(tmp_path, heart_study):
    whole = base_columns()
    whole["age"] = [float(v) for v in whole["age"]]
    report = validate_cohort(write(tmp_path, whole, "whole.parquet", types={"age": pa.float64()}), heart_study)
    assert report.ok and by_rule(report)["column.age.type"].passed

    fractional = dict(whole, age=[v + (0.5 if i < 7 else 0.0) for i, v in enumerate(whole["age"])])
    report = validate_cohort(write(tmp_path, fractional, "frac.parquet", types={"age": pa.float64()}), heart_study)
    rules = by_rule(report)
    assert not report.ok
    assert not rules["column.age.type"].passed and rules["column.age.type"].violations == 7
    assert rules["column.age.range"].description.startswith("not evaluated")


def test_integer_type_accepts_any_width(tmp_path, heart_study):
    report = validate_cohort(
        write(tmp_path, base_columns(), types={"sex": pa.int8(), "cp": pa.uint16(), "oldpeak": pa.float32()}),
        heart_study,
    )
    assert report.ok, report.render()


def test_float_rule_accepts_integers(tmp_path, heart_study):
    cols = base_columns()
    cols["oldpeak"] = [i % 5 for i in range(30)]
    report = validate_cohort(write(tmp_path, cols, types={"oldpeak": pa.int32()}), heart_study)
    assert report.ok


def test_missing_required_column_blocks(tmp_path, heart_study):
    cols = base_columns()
    del cols["sex"]
    report = validate_cohort(write(tmp_path, cols), heart_study)
    rules = by_rule(report)
    assert not report.ok
    assert failed(report) == {"column.sex.present"}
    assert rules["column.sex.present"].severity == "error"
    assert "column.sex.categories" not in rules
    assert "sex" not in report.missing_per_column


def test_missing_optional_column_is_fine(tmp_path, heart_study):
    cols = base_columns()
    for optional in ("slope", "ca", "thal"):
        del cols[optional]
    report = validate_cohort(write(tmp_path, cols), heart_study)
    assert report.ok
    assert by_rule(report)["column.slope.present"].passed


def test_missing_share_warning_does_not_block(tmp_path, heart_study):
    cols = base_columns()
    cols["fbs"] = [None if i < 10 else v for i, v in enumerate(cols["fbs"])]  # 33% > 10%
    report = validate_cohort(write(tmp_path, cols), heart_study)
    rule = by_rule(report)["column.fbs.missing_share"]
    assert not rule.passed and rule.severity == "warning" and rule.violations == 10
    assert report.ok
    assert report.missing_per_column["fbs"] == 10
    assert "WARN  warning  column.fbs.missing_share" in report.render()


def test_missing_share_error_blocks(tmp_path, heart_study):
    cols = base_columns()
    cols["age"] = [None if i < 6 else v for i, v in enumerate(cols["age"])]  # age allows 0% missing
    report = validate_cohort(write(tmp_path, cols), heart_study)
    assert not report.ok
    assert failed(report) == {"column.age.missing_share"}
    assert by_rule(report)["column.age.missing_share"].violations == 6


def test_nan_counts_as_missing(tmp_path, heart_study):
    cols = base_columns()
    cols["oldpeak"] = [float("nan") if i < 20 else v for i, v in enumerate(cols["oldpeak"])]
    report = validate_cohort(write(tmp_path, cols), heart_study)
    assert report.missing_per_column["oldpeak"] == 20
    assert not by_rule(report)["column.oldpeak.missing_share"].passed  # 67% > 50%
    assert by_rule(report)["column.oldpeak.range"].passed  # NaN is missing, not out of range


def test_range_error_blocks(tmp_path, heart_study):
    cols = base_columns()
    cols["age"][:6] = [5, 6, 101, 150, 17, 200]
    report = validate_cohort(write(tmp_path, cols), heart_study)
    rule = by_rule(report)["column.age.range"]
    assert not report.ok and not rule.passed and rule.violations == 6
    assert failed(report) == {"column.age.range"}


def test_range_bounds_are_inclusive(tmp_path, heart_study):
    cols = base_columns()
    cols["age"][:2] = [18, 100]
    assert validate_cohort(write(tmp_path, cols), heart_study).ok


def test_range_warning_does_not_block(tmp_path, heart_study):
    cols = base_columns()
    cols["chol"] = [0] * 30
    report = validate_cohort(write(tmp_path, cols), heart_study)
    rule = by_rule(report)["column.chol.range"]
    assert report.ok
    assert not rule.passed and rule.severity == "warning" and rule.violations == 30


def test_categories_rule(tmp_path, heart_study):
    cols = base_columns()
    cols["sex"][:8] = [2] * 8
    cols["sex"][8] = None  # missing is not a category violation (sex allows 0% missing though)
    report = validate_cohort(write(tmp_path, cols), heart_study)
    rule = by_rule(report)["column.sex.categories"]
    assert not report.ok
    assert not rule.passed and rule.violations == 8
    assert rule.description == "values must be one of 0, 1"
    assert failed(report) == {"column.sex.categories", "column.sex.missing_share"}


# ---------------------------------------------------------------- cohort rules


def test_min_rows(tmp_path, heart_study):
    report = validate_cohort(write(tmp_path, base_columns(12)), heart_study)
    assert not report.ok
    assert failed(report) == {"cohort.min_rows"}
    assert by_rule(report)["cohort.min_rows"].violations == 12


def test_label_classes_one_class_only(tmp_path, heart_study):
    cols = base_columns()
    cols["num"] = [0] * 30
    report = validate_cohort(write(tmp_path, cols), heart_study)
    assert not report.ok
    assert failed(report) == {"cohort.label_classes"}
    assert by_rule(report)["cohort.label_classes"].severity == "error"


def test_label_classes_respects_min_rows_per_class(tmp_path, heart_study):
    strict = heart_study.model_copy(
        update={"cohort": heart_study.cohort.model_copy(update={"min_rows_per_class": 10})}
    )
    cols = base_columns()
    cols["num"] = [1 if i < 7 else 0 for i in range(30)]  # 7 positives < 10
    report = validate_cohort(write(tmp_path, cols), strict)
    rule = by_rule(report)["cohort.label_classes"]
    assert not rule.passed and rule.violations == 7
    assert validate_cohort(write(tmp_path, cols), heart_study).ok


def test_label_column_absent(tmp_path, heart_study):
    cols = base_columns()
    del cols["num"]
    report = validate_cohort(write(tmp_path, cols), heart_study)
    assert failed(report) == {"column.num.present", "cohort.label_classes"}
    assert by_rule(report)["cohort.label_classes"].description.startswith("not evaluated")


@pytest.mark.parametrize("id_type", ["string", "integer"])
def test_duplicate_patients(tmp_path, heart_study, id_type):
    study = study_with_patient_id(heart_study, id_type)
    cols = base_columns()
    ids = list(range(30))
    ids[20:26] = [0, 1, 1, 1, 2, 3]  # 6 rows repeat an earlier id
    cols["patient_id"] = [f"P{i:04d}" for i in ids] if id_type == "string" else ids
    report = validate_cohort(write(tmp_path, cols), study)
    rule = by_rule(report)["cohort.duplicate_patients"]
    assert not report.ok
    assert failed(report) == {"cohort.duplicate_patients"}
    assert rule.violations == 6 and rule.severity == "error"

    cols["patient_id"] = [f"P{i:04d}" for i in range(30)] if id_type == "string" else list(range(30))
    assert validate_cohort(write(tmp_path, cols, "unique.parquet"), study).ok


# ---------------------------------------------------------------- the real sample cohorts


@pytest.mark.parametrize(
    "silo",
    [
        "cleveland",
        "hungary",
        "switzerland",
        "va",
    ],
)
def test_sample_cohorts_may_join(heart_study, sample_paths, silo):
    report = validate_cohort(sample_paths[silo], heart_study)
    assert report.ok, [r.rule for r in report.failed_errors()]
    assert report.render().splitlines()[-1] == "OK: may join the study"


def test_va_trestbps_zero_is_a_warning(heart_study, sample_paths):
    """VA codes a few unknown blood pressures as 0: reported, suppressed, not blocking."""
    report = validate_cohort(sample_paths["va"], heart_study)
    rule = by_rule(report)["column.trestbps.range"]
    assert not rule.passed and rule.severity == "warning"
    assert rule.violations == "<5"
    assert report.ok


def test_switzerland_chol_is_a_warning(heart_study, sample_paths):
    report = validate_cohort(sample_paths["switzerland"], heart_study)
    rule = by_rule(report)["column.chol.range"]
    assert not rule.passed and rule.severity == "warning"
    assert rule.violations == 123  # every row records 0
    assert "WARN  warning  column.chol.range" in report.render()
    assert report.ok


# ---------------------------------------------------------------- suppression


@pytest.mark.parametrize(("count", "k", "expected"),
                         [(0, 5, 0), (1, 5, "<5"), (4, 5, "<5"), (5, 5, 5), (123, 5, 123), (9, 10, "<10"), (1, 1, 1)])
def test_suppress(count, k, expected):
    assert suppress(count, k) == expected


def test_small_counts_are_suppressed_everywhere(tmp_path, heart_study):
    cols = base_columns()
    cols["age"][0] = SENTINEL  # one out-of-range row
    cols["fbs"][:2] = [None, None]  # two missing, within the 10% allowed
    cols["chol"][:3] = [SENTINEL + 1, SENTINEL + 2, 7]
    report = validate_cohort(write(tmp_path, cols), heart_study)
    rules = by_rule(report)
    assert rules["column.age.range"].violations == "<5"
    assert rules["column.chol.range"].violations == "<5"
    assert report.missing_per_column["fbs"] == "<5"
    assert report.missing_per_column["age"] == 0
    text = report.render()
    assert "FAIL  error    column.age.range" in text
    assert "<5" in text
    payload = json.dumps(report.counts_only_dict())
    for forbidden in (str(SENTINEL), str(SENTINEL + 1), str(SENTINEL + 2)):
        assert forbidden not in text
        assert forbidden not in payload
    assert json.loads(payload)["ok"] is False


def test_sentinel_in_a_type_failed_column_is_not_echoed(tmp_path, heart_study):
    cols = base_columns()
    cols["age"] = [str(SENTINEL)] * 30
    report = validate_cohort(write(tmp_path, cols, types={"age": pa.string()}), heart_study)
    assert not report.ok
    assert str(SENTINEL) not in report.render()
    assert str(SENTINEL) not in json.dumps(report.counts_only_dict())


def test_small_cohort_row_count_is_suppressed(tmp_path, heart_study):
    report = validate_cohort(write(tmp_path, base_columns(3)), heart_study)
    assert report.rows == "<5"
    assert by_rule(report)["cohort.min_rows"].violations == "<5"
    assert "Rows        : <5" in report.render()


def test_suppression_follows_the_study_k(tmp_path, heart_study):
    study = heart_study.model_copy(update={"small_cell_min": 10})
    cols = base_columns()
    cols["age"][:7] = [SENTINEL] * 7
    report = validate_cohort(write(tmp_path, cols), study)
    assert by_rule(report)["column.age.range"].violations == "<10"
    assert report.small_cell_min == 10


def test_counts_only_dict_is_json(tmp_path, heart_study):
    report = validate_cohort(write(tmp_path, base_columns()), heart_study)
    data = json.loads(json.dumps(report.counts_only_dict()))
    assert data["ok"] is True
    assert data["rows"] == 30
    assert {r["rule"] for r in data["results"]} == {r.rule for r in report.results}


def test_render_verdict_counts_error_rules(tmp_path, heart_study):
    cols = base_columns()
    cols["age"][0] = 500
    cols["sex"][0] = 9
    cols["chol"][0] = 5  # warning only, not counted
    text = validate_cohort(write(tmp_path, cols), heart_study).render()
    assert text.splitlines()[-1] == "BLOCKED: 2 error rule(s) failed"
    assert str(tmp_path / "cohort.parquet") in text
    assert "heart-disease" in text


# ---------------------------------------------------------------- streaming


def test_streaming_gives_the_same_counts(tmp_path, heart_study):
    study = study_with_patient_id(heart_study, "string")
    n = 1000
    cols = base_columns(n)
    cols["age"] = [SENTINEL if i % 97 == 0 else v for i, v in enumerate(cols["age"])]
    cols["fbs"] = [None if i % 13 == 0 else v for i, v in enumerate(cols["fbs"])]
    cols["oldpeak"] = [None if i % 3 == 0 else v for i, v in enumerate(cols["oldpeak"])]
    cols["sex"] = [3 if i % 250 == 1 else v for i, v in enumerate(cols["sex"])]
    cols["patient_id"] = [f"P{i % 990}" for i in range(n)]  # rows 990..999 repeat ids from the first batch
    path = write(tmp_path, cols, row_group_size=64)
    assert pq.ParquetFile(path).num_row_groups > 10

    small = validate_cohort(path, study, batch_rows=7)
    whole = validate_cohort(path, study, batch_rows=10**7)
    assert small.model_dump() == whole.model_dump()
    rules = by_rule(small)
    assert rules["column.age.range"].violations == 11
    assert rules["column.sex.categories"].violations == "<5"
    assert rules["cohort.duplicate_patients"].violations == 10
    assert small.missing_per_column["fbs"] == 77
    assert small.rows == n


def test_batch_rows_must_be_positive(tmp_path, heart_study):
    with pytest.raises(ValueError):
        validate_cohort(write(tmp_path, base_columns()), heart_study, batch_rows=0)


# ---------------------------------------------------------------- bad input


def test_empty_cohort_is_blocked(tmp_path, heart_study):
    table = to_table(base_columns()).slice(0, 0)
    path = tmp_path / "empty.parquet"
    pq.write_table(table, path)
    report = validate_cohort(path, heart_study)
    rules = by_rule(report)
    assert not report.ok
    assert report.rows == 0
    assert not rules["cohort.min_rows"].passed
    assert rules["cohort.min_rows"].severity == "error"
    assert not rules["cohort.label_classes"].passed
    assert all(rules[f"column.{c}.type"].passed for c in ("age", "num", "oldpeak"))
    assert report.render().splitlines()[-1].startswith("BLOCKED:")


def test_missing_file(tmp_path, heart_study):
    path = tmp_path / "nowhere.parquet"
    with pytest.raises(PolicyError, match="nowhere.parquet") as info:
        validate_cohort(path, heart_study)
    assert "not found" in str(info.value)


def test_not_parquet(tmp_path, heart_study):
    path = tmp_path / "x.parquet"
    path.write_text("age,sex\n987654,1\n")
    with pytest.raises(PolicyError, match="x.parquet") as info:
        validate_cohort(path, heart_study)
    assert "not a readable Parquet file" in str(info.value)
    assert "987654" not in str(info.value)


def test_directory_is_not_a_cohort(tmp_path, heart_study):
    with pytest.raises(PolicyError, match="not a file"):
        validate_cohort(tmp_path, heart_study)


def test_patient_id_of_the_wrong_type_is_not_evaluated(tmp_path, heart_study):
    study = study_with_patient_id(heart_study, "string")
    cols = base_columns()
    cols["patient_id"] = [[i] for i in range(30)]  # a list column: neither text nor hashable ids
    report = validate_cohort(write(tmp_path, cols), study)
    assert failed(report) == {"column.patient_id.type", "cohort.duplicate_patients"}
    assert by_rule(report)["cohort.duplicate_patients"].description.startswith("not evaluated")


def test_duplicate_column_names_are_refused(tmp_path, heart_study):
    table = to_table(base_columns())
    table = table.append_column("age", table.column("age"))
    path = tmp_path / "twice.parquet"
    pq.write_table(table, path)
    with pytest.raises(PolicyError, match="'age' appears more than once"):
        validate_cohort(path, heart_study)


def test_text_label_column_is_not_evaluated(tmp_path, heart_study):
    cols = base_columns()
    cols["num"] = [str(v) for v in cols["num"]]
    report = validate_cohort(write(tmp_path, cols, types={"num": pa.string()}), heart_study)
    assert failed(report) == {"column.num.type", "column.num.categories", "cohort.label_classes"}
    assert by_rule(report)["cohort.label_classes"].description.startswith("not evaluated")
