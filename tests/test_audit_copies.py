"""The CSV and Parquet copies in an audit export: compared with the signed JSONL by content.

`audit verify` compares each copy column by column in Arrow first and falls back to the
row-by-row comparison only when something differs, so these tests pin both halves: a copy
that says what the JSONL says passes however it is formatted, and one changed cell is still
caught and its row named.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from policies.audit import (
    COLUMNS,
    AuditLog,
    PartyKey,
    _csv_copy_matches,
    _entry_columns,
    _parquet_copy_matches,
    export_bundle,
    verify_bundle,
)

# subjects and actors a user typed: spreadsheet formulas, quotes, commas, newlines, non-ASCII
TRICKY = [
    ("study.created", "=HYPERLINK(\"http://x\")", {"version": 1}),
    ("silo.enrolled", "+cleveland, \"north\"", {"rows": 303, "note": "-1"}),
    ("round.approved", "@round-1\r\nsecond line", {"round": 1}),
    ("silo.refused", "\tva", {"round": 1, "reason": "too_few_rows"}),
    ("round.finished", "Zürich-1", {"round": 1, "replied": 3}),
    ("privacy.charged", "", {"epsilon": 0.5}),
]


@pytest.fixture()
def export(tmp_path: Path) -> tuple[Path, AuditLog]:
    key = PartyKey.generate()
    log = AuditLog(tmp_path / "coordinator.jsonl", key, party="coordinator", role="coordinator")
    for action, subject, details in TRICKY:
        log.append(action, subject, details, actor=f"-{subject[:3]}")
    out = tmp_path / "export"
    export_bundle(log.path, out, key.public_keys(), party="coordinator")
    (out / "manifest.json").write_text(_without_copy_hashes((out / "manifest.json").read_text()))
    return out, log


def _without_copy_hashes(manifest: str) -> str:
    """Copies edited below would fail the manifest's sha256 first; drop those so each test sees
    only the content comparison (the sha256 check has its own tests in test_audit.py)."""
    data = json.loads(manifest)
    for name in ("audit.csv", "audit.parquet"):
        data["files"].pop(name)
    return json.dumps(data)


def _problems(out: Path) -> list[str]:
    problem = verify_bundle(out).problem
    return [p for p in problem.split("; ") if "not listed in the manifest" not in p]


def _csv_rows(path: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(path.read_bytes().decode("utf-8"))))  # keeps \r\n in cells


def _write_csv(path: Path, rows: list[list[str]], **fmt: object) -> None:
    buf = io.StringIO()
    csv.writer(buf, **fmt).writerows(rows)  # type: ignore[arg-type]
    path.write_bytes(buf.getvalue().encode("utf-8"))


def test_exported_copies_pass_the_column_check(export: tuple[Path, AuditLog]) -> None:
    """The fast path must accept what export writes, or every verify falls back to Python rows."""
    out, log = export
    want = _entry_columns(list(log.entries()))
    assert _csv_copy_matches((out / "audit.csv").read_bytes(), want)
    assert _parquet_copy_matches((out / "audit.parquet").read_bytes(), want)
    assert _problems(out) == []


def test_csv_resaved_with_other_quoting_still_matches(export: tuple[Path, AuditLog]) -> None:
    out, _ = export
    rows = _csv_rows(out / "audit.csv")
    _write_csv(out / "audit.csv", rows, quoting=csv.QUOTE_ALL, lineterminator="\n")
    assert _problems(out) == []


@pytest.mark.parametrize("row, column", [(1, "subject"), (4, "details"), (6, "signature"), (3, "seq")])
def test_one_changed_csv_cell_is_caught_and_named(export: tuple[Path, AuditLog], row: int, column: str) -> None:
    out, _ = export
    rows = _csv_rows(out / "audit.csv")
    rows[row][COLUMNS.index(column)] += "x"
    _write_csv(out / "audit.csv", rows, lineterminator="\r\n")
    assert _problems(out) == [f"audit.csv: row {row} differs from audit.jsonl"]


def test_csv_formula_guard_removed_is_caught(export: tuple[Path, AuditLog]) -> None:
    """The CSV writes '=HYPERLINK(...) so a spreadsheet shows text; a copy without the guard is not
    what this tool wrote, even though the JSONL holds =HYPERLINK(...)."""
    out, _ = export
    rows = _csv_rows(out / "audit.csv")
    assert rows[1][COLUMNS.index("subject")].startswith("'=")
    rows[1][COLUMNS.index("subject")] = rows[1][COLUMNS.index("subject")][1:]
    _write_csv(out / "audit.csv", rows, lineterminator="\r\n")
    assert _problems(out) == ["audit.csv: row 1 differs from audit.jsonl"]


def test_csv_with_a_missing_row_or_extra_column_is_named(export: tuple[Path, AuditLog]) -> None:
    out, _ = export
    rows = _csv_rows(out / "audit.csv")
    _write_csv(out / "audit.csv", rows[:-1], lineterminator="\r\n")
    assert _problems(out) == ["audit.csv: 5 rows, audit.jsonl has 6 entries"]
    _write_csv(out / "audit.csv", [r + ["extra"] for r in rows], lineterminator="\r\n")
    assert _problems(out) == ["audit.csv: unexpected columns"]
    ragged = [*rows[:3], rows[3] + ["extra"], *rows[4:]]
    _write_csv(out / "audit.csv", ragged, lineterminator="\r\n")
    assert _problems(out) == ["audit.csv: row 3 differs from audit.jsonl"]


def test_csv_with_a_bom_or_bad_utf8_is_refused(export: tuple[Path, AuditLog]) -> None:
    out, _ = export
    data = (out / "audit.csv").read_bytes()
    (out / "audit.csv").write_bytes(b"\xef\xbb\xbf" + data)
    assert _problems(out) == ["audit.csv: unexpected columns"]
    (out / "audit.csv").write_bytes(data.replace("Zürich".encode(), b"Z\xfcrich"))
    assert _problems(out) == ["audit.csv: not readable as UTF-8 CSV"]


@pytest.mark.parametrize("row, column", [(2, "actor"), (5, "details"), (6, "hash")])
def test_one_changed_parquet_cell_is_caught_and_named(export: tuple[Path, AuditLog], row: int, column: str) -> None:
    out, _ = export
    table = pq.read_table(out / "audit.parquet")
    values = table.column(column).to_pylist()
    values[row - 1] += "x"
    table = table.set_column(COLUMNS.index(column), column, pa.array(values, pa.string()))
    pq.write_table(table, out / "audit.parquet")
    assert _problems(out) == [f"audit.parquet: row {row} differs from audit.jsonl"]


def test_parquet_with_another_seq_type_is_compared_by_value(export: tuple[Path, AuditLog]) -> None:
    """A tool that re-saves seq as int32 still says the same thing; as strings it does not."""
    out, _ = export
    table = pq.read_table(out / "audit.parquet")
    seq = table.column("seq")
    pq.write_table(table.set_column(0, "seq", seq.cast(pa.int32())), out / "audit.parquet")
    assert _problems(out) == []
    pq.write_table(table.set_column(0, "seq", seq.cast(pa.string())), out / "audit.parquet")
    assert _problems(out) == ["audit.parquet: row 1 differs from audit.jsonl"]
