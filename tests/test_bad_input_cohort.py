"""Bad input, part 1: a corpus of broken cohorts (issue 7, point 5).

Each broken file is made under tmp from the real Cleveland cohort, then given to the
library (`validate_cohort`), to `silo-node validate` and to `silo-node start` (which
validates before anything else). Each must give a specific error naming the file, the
column and rule, and counts (never a row value, never a count below the small-cell
minimum), exit non-zero, and leave the silo's state directory (keys, approval, budget,
audit log) byte for byte as it was. The 10-million-row file is in its own slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bad_input_helpers import approved_silo_state, tree

from policies.errors import PolicyError
from policies.study import shipped_study
from policies.validation import validate_cohort
from silo_node.cli import main as silo_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from validate_large import validate_in_child, write_big_cohort  # noqa: E402  (one file writer, one measurement)

SENTINEL = -987  # a value planted in bad rows: it must never be echoed
K = 5  # the heart study's small-cell minimum


@dataclass(frozen=True)
class Case:
    """What a broken cohort must produce: a refusal (`error`) or failing rules with counts."""

    file: str
    error: str | None = None  # words of the PolicyError (exit code 2)
    rules: dict[str, int | str] | None = None  # failed rule id -> shown count (exit code 1)


def _frame(sample_paths) -> pd.DataFrame:
    return pd.read_parquet(sample_paths["cleveland"])


def _write(frame: pd.DataFrame | pa.Table, path: Path) -> Path:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table, path)
    return path


def build_corpus(root: Path, sample_paths) -> dict[str, Case]:
    """Every kind of broken cohort of the issue, each with what the silo must say about it."""
    root.mkdir(parents=True, exist_ok=True)
    good = _frame(sample_paths)
    n = len(good)
    cases: dict[str, Case] = {}

    whole = _write(good, root / "good.parquet").read_bytes()
    (root / "truncated.parquet").write_bytes(whole[: len(whole) * 2 // 3])
    cases["truncated"] = Case("truncated.parquet", error="does not end with the Parquet magic bytes")

    (root / "wrong_magic.parquet").write_bytes(b"PAR0" + whole[4:])
    cases["wrong_magic"] = Case("wrong_magic.parquet", error="does not start with the Parquet magic bytes 'PAR1'")

    (root / "zero_bytes.parquet").write_bytes(b"")
    cases["zero_bytes"] = Case("zero_bytes.parquet", error="it is empty (0 bytes)")

    table = pa.Table.from_pandas(good, preserve_index=False)
    _write(table.append_column("chol", table.column("chol")), root / "duplicate_columns.parquet")
    cases["duplicate_columns"] = Case("duplicate_columns.parquet", error="column 'chol' appears more than once")

    nan_inf = good.astype({"age": "float64"})
    nan_inf.loc[:6, "age"] = np.nan  # 7 missing ages: age allows none
    nan_inf.loc[10:12, "oldpeak"] = [np.inf, -np.inf, np.inf]  # 3 infinities: shown as <5
    _write(nan_inf, root / "nan_inf.parquet")
    cases["nan_inf"] = Case("nan_inf.parquet", rules={"column.age.missing_share": 7, "column.oldpeak.type": f"<{K}",
                                                       "column.oldpeak.range": 0})

    negative = good.copy()
    negative.loc[:11, "age"] = SENTINEL  # 12 negative ages
    _write(negative, root / "negative_ages.parquet")
    cases["negative_ages"] = Case("negative_ages.parquet", rules={"column.age.range": 12})

    few_negative = good.copy()
    few_negative.loc[:1, "age"] = SENTINEL  # 2 negative ages: the count itself is small, so suppressed
    _write(few_negative, root / "few_negative_ages.parquet")
    cases["few_negative_ages"] = Case("few_negative_ages.parquet", rules={"column.age.range": f"<{K}"})

    strings = good.astype({"trestbps": "string"})
    strings.loc[:3, "trestbps"] = "unknown"
    _write(strings, root / "strings_in_numeric.parquet")
    cases["strings_in_numeric"] = Case("strings_in_numeric.parquet", rules={"column.trestbps.type": n})

    _write(good.iloc[:0], root / "zero_rows.parquet")
    cases["zero_rows"] = Case("zero_rows.parquet", rules={"cohort.min_rows": 0, "cohort.label_classes": 0})

    unicode_names = good.rename(columns={"age": "âge", "chol": "сhol"})  # Latin â; Cyrillic с
    unicode_names["病歴"] = 1
    _write(unicode_names, root / "unicode_columns.parquet")
    cases["unicode_columns"] = Case("unicode_columns.parquet", rules={"column.age.present": 0, "column.chol.present": 0})

    all_null = good.copy()
    all_null["thalach"] = pd.array([None] * n, dtype="Int64")  # typed, every value null
    table = pa.Table.from_pandas(all_null, preserve_index=False)
    table = table.set_column(table.schema.get_field_index("sex"), "sex", pa.nulls(n))  # Arrow's null type
    _write(table, root / "all_null_columns.parquet")
    cases["all_null_columns"] = Case("all_null_columns.parquet", rules={"column.sex.missing_share": n})

    good.to_csv(root / "cohort.csv", index=False)
    cases["csv"] = Case("cohort.csv", error="it looks like CSV or other text: convert it to Parquet first")
    good.to_csv(root / "csv_named.parquet", index=False)
    cases["csv_named_parquet"] = Case("csv_named.parquet", error="it looks like CSV or other text")

    (root / "a_directory").mkdir()
    _write(good, root / "a_directory" / "part-0.parquet")
    cases["directory"] = Case("a_directory", error="is a directory, not a file")
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sample_paths) -> tuple[Path, dict[str, Case]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root, sample_paths)


@pytest.fixture(scope="module")
def silo_state(tmp_path_factory) -> Path:
    return approved_silo_state(tmp_path_factory.mktemp("silo") / "state")


CASES = ["truncated", "wrong_magic", "zero_bytes", "duplicate_columns", "nan_inf", "negative_ages",
         "few_negative_ages", "strings_in_numeric", "zero_rows", "unicode_columns", "all_null_columns", "csv",
         "csv_named_parquet", "directory"]


def _assert_no_leak(text: str) -> None:
    assert str(SENTINEL) not in text, "a row value was echoed"
    assert "Traceback" not in text


def _rule_line(text: str, rule: str) -> str:
    """The report line of one rule: STATUS severity rule count description."""
    lines = [ln for ln in text.splitlines() if ln.split()[2:3] == [rule]]
    assert lines, f"no line for {rule} in:\n{text}"
    return lines[0]


@pytest.mark.parametrize("name", CASES)
def test_library_names_file_rule_and_counts(corpus, heart_study, name):
    root, cases = corpus
    case = cases[name]
    path = root / case.file
    if case.error:
        with pytest.raises(PolicyError) as info:
            validate_cohort(path, heart_study)
        message = str(info.value)
        assert message.startswith(f"{path}: "), message
        assert case.error in message
        _assert_no_leak(message)
        return
    report = validate_cohort(path, heart_study)
    assert not report.ok
    results = {r.rule: r for r in report.results}
    for rule, count in case.rules.items():
        assert not results[rule].passed and results[rule].severity == "error", results[rule]
        assert results[rule].violations == count, results[rule]
    for r in report.results:  # small counts suppressed everywhere in the report
        assert not (isinstance(r.violations, int) and 0 < r.violations < K), r
    assert report.file == str(path)
    _assert_no_leak(json.dumps(report.counts_only_dict()))


@pytest.mark.parametrize("name", CASES)
def test_silo_node_validate_and_start_refuse_and_write_nothing(corpus, silo_state, name, capsys):
    """`silo-node validate` (run in the silo's state dir) and `silo-node start` on the same file."""
    root, cases = corpus
    case = cases[name]
    path = root / case.file
    before = tree(silo_state)
    cwd = os.getcwd()
    os.chdir(silo_state)  # anything validate wrote to its working directory would show
    try:
        code = silo_cli(["validate", "--study", str(shipped_study()), "--cohort", str(path)])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == (2 if case.error else 1), text
    assert str(path) in text
    if case.error:
        assert f"error: {path}: " in out.err and case.error in out.err
    else:
        assert "BLOCKED:" in out.out
        for rule, count in case.rules.items():
            line = _rule_line(out.out, rule)
            assert line.startswith("FAIL") and line.split()[3] == str(count), line
    _assert_no_leak(text)

    code = silo_cli(["start", "--study", str(shipped_study()), "--cohort", str(path), "--state-dir", str(silo_state),
                     "--name", "cleveland", "--superlink", "127.0.0.1:1", "--insecure-local-demo"])
    out = capsys.readouterr()
    assert code != 0
    assert (case.error or "not joining") in out.err
    assert tree(silo_state) == before, "a refused cohort changed the silo's state (keys, approval, budget or audit log)"


@pytest.mark.parametrize("name", ["truncated", "csv", "unicode_columns"])
def test_console_script_exit_codes_in_a_c_locale(corpus, tmp_path, name):
    """The installed `silo-node` command itself, under LC_ALL=C: exit code, one clear message, no traceback."""
    root, cases = corpus
    case = cases[name]
    exe = Path(sys.executable).parent / "silo-node"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "silo_node.cli"]
    proc = subprocess.run([*cmd, "validate", "--study", str(shipped_study()), "--cohort", str(root / case.file)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, LC_ALL="C", LANG="C"))
    assert proc.returncode == (2 if case.error else 1), proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(root / case.file) in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_corrupt_data_pages_name_the_row_group(tmp_path, heart_study, sample_paths):
    """Footer intact, data damaged: the error says which row group, not Arrow's internals."""
    frame = pd.concat([_frame(sample_paths)] * 4, ignore_index=True)
    path = tmp_path / "corrupt.parquet"
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=303, compression="snappy")
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(2).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start: start + column.total_compressed_size] = np.random.default_rng(7).bytes(column.total_compressed_size)
    path.write_bytes(bytes(raw))
    with pytest.raises(PolicyError) as info:
        validate_cohort(path, heart_study)
    assert str(info.value).startswith(f"{path}: Parquet file could not be read to the end: row group 3 of 4 ")


# ---------------------------------------------------------------- 10 million rows


@pytest.mark.slow
def test_ten_million_rows_stream_in_bounded_memory_and_are_refused_by_max_rows(tmp_path, sample_paths):
    """Validated by streaming (memory does not grow with rows), and refused: the study's
    declared largest cohort (`cohort.max_rows`) is 1000 rows."""
    rows = 10_000_000
    path = write_big_cohort(tmp_path / "ten_million.parquet", rows, source=sample_paths["cleveland"])
    assert pq.ParquetFile(path).metadata.num_rows == rows
    proc, peak, seconds = validate_in_child(shipped_study(), path, tmp_path)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["rows"] == rows
    results = {r["rule"]: r for r in report["results"]}
    assert not results["cohort.max_rows"]["passed"] and results["cohort.max_rows"]["violations"] == rows
    assert "at most 1000 rows" in results["cohort.max_rows"]["description"]
    assert results["column.age.range"]["passed"]  # every row was read: the Cleveland values all pass
    assert results["column.chol.range"]["passed"]
    raw_bytes = rows * len(report["missing_per_column"]) * 8
    print(f"10M rows: {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB (the columns alone: {raw_bytes / 2**20:.0f} MiB); "
          "bench/validate_large.py records it")
    assert peak < raw_bytes / 2, "validation memory grows with the rows: not streaming"
