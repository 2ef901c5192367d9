"""Cohort validation against the study schema: streaming, counts only, small cells suppressed.

A silo runs this before joining a study. The report it produces may be shown to, or sent
to, people outside the hospital, so it carries counts, column names and rule texts only:
never a value or a row from the data, and every count below the study's small-cell minimum
is replaced by "<k".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pandas.util import hash_array
from pydantic import BaseModel, ConfigDict

from policies.errors import PolicyError
from policies.schema import ColumnRule, Severity
from policies.study import StudySpec

Count = int | str


PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with these four bytes


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """Open a cohort file, turning missing, truncated or non-Parquet files into clear errors.

    The magic bytes are checked first, so a CSV, a truncated copy or a file of another
    format gets a message that says which, instead of Arrow's internal wording (and the
    message never quotes the file's content).
    """
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"{path}: cohort file not found")
    if path.is_dir():
        raise PolicyError(f"{path}: cohort path is a directory, not a file; give the Parquet file itself "
                          "(partitioned datasets are not supported)")
    if not path.is_file():
        raise PolicyError(f"{path}: cohort path is not a file")
    _check_magic(path)
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PolicyError(f"{path}: not a readable Parquet file: its footer (the schema) cannot be read; "
                          f"damaged or truncated? ({type(exc).__name__})") from None


def _check_magic(path: Path) -> None:
    """Refuse an empty, non-Parquet or truncated file by its first and last four bytes."""
    size = path.stat().st_size
    if size == 0:
        raise PolicyError(f"{path}: not a readable Parquet file: it is empty (0 bytes)")
    with path.open("rb") as fh:
        head = fh.read(4)
        fh.seek(max(size - 4, 0))
        tail = fh.read(4)
    if head != PARQUET_MAGIC:
        hint = "; it looks like CSV or other text: convert it to Parquet first" if _looks_like_text(path) else ""
        raise PolicyError(f"{path}: not a readable Parquet file: it does not start with the Parquet magic bytes "
                          f"'PAR1'{hint}")
    if tail != PARQUET_MAGIC or size < 12:
        raise PolicyError(f"{path}: not a readable Parquet file: it does not end with the Parquet magic bytes "
                          f"'PAR1' ({size} bytes): truncated, or copied before it was completely written")


def _looks_like_text(path: Path) -> bool:
    """A CSV or TSV export is the usual wrong file: UTF-8 text with a separator on its first line."""
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        return True
    with path.open("rb") as fh:
        start = fh.read(4096)
    try:
        first = start.decode("utf-8").splitlines()[0] if start else ""
    except UnicodeDecodeError:
        return False
    return any(sep in first for sep in (",", ";", "\t"))


def suppress(count: int, k: int) -> Count:
    """Hide small cells: a count of 1..k-1 could single out patients, so it becomes "<k".

    Zero is kept, because "nobody" identifies no one and tells a data manager the rule holds.
    """
    if 0 < count < k:
        return f"<{k}"
    return int(count)


# ---------------------------------------------------------------- report models


class RuleResult(BaseModel):
    """Outcome of one rule. `violations` always counts rows, already suppressed.

    For per-column rules it counts offending rows. The cohort-size rules have no offending
    rows, so there it is the size of the unit that is too small (rows in the cohort, rows in
    the smallest short label class); the description says so.
    """

    model_config = ConfigDict(frozen=True)

    rule: str
    column: str | None
    severity: Severity
    passed: bool
    violations: Count
    description: str

    @property
    def status(self) -> Literal["PASS", "FAIL", "WARN"]:
        if self.passed:
            return "PASS"
        return "FAIL" if self.severity == "error" else "WARN"


class ValidationReport(BaseModel):
    """Everything a silo may share about its cohort's fitness: counts and rule texts only."""

    model_config = ConfigDict(frozen=True)

    file: str
    study_id: str
    policy_hash: str
    small_cell_min: int
    rows: Count
    results: list[RuleResult]
    missing_per_column: dict[str, Count]

    @property
    def ok(self) -> bool:
        """Warnings are reported but never block; one failed error rule does."""
        return not self.failed_errors()

    def failed_errors(self) -> list[RuleResult]:
        return [r for r in self.results if not r.passed and r.severity == "error"]

    def render(self) -> str:
        """Plain text for a terminal or a ticket; safe to paste anywhere (counts only)."""
        lines = [
            f"Cohort file : {self.file}",
            f"Study       : {self.study_id} (policy {self.policy_hash[:12]})",
            f"Rows        : {self.rows}   (counts below {self.small_cell_min} shown as <{self.small_cell_min})",
            "",
        ]
        width = max((len(r.rule) for r in self.results), default=10)
        for r in self.results:
            lines.append(
                f"{r.status:4s}  {r.severity:7s}  {r.rule:{width}s}  {str(r.violations):>6s}  {r.description}"
            )
        lines.append("")
        failed = len(self.failed_errors())
        lines.append("OK: may join the study" if failed == 0 else f"BLOCKED: {failed} error rule(s) failed")
        return "\n".join(lines)

    def counts_only_dict(self) -> dict[str, Any]:
        """JSON-able form for the coordinator or an audit log (no data values inside)."""
        return {**self.model_dump(mode="json"), "ok": self.ok}


# ---------------------------------------------------------------- type compatibility

TypeStatus = Literal["ok", "check_whole", "check_finite", "bad"]


def _type_status(expected: str, arrow_type: pa.DataType) -> TypeStatus:
    """Decide from the schema alone where possible; floats need their values (whole? finite?)."""
    if pa.types.is_null(arrow_type):
        return "ok"  # an all-null column has no values of a wrong type; the missing rule judges it
    if expected == "integer":
        if pa.types.is_integer(arrow_type):
            return "ok"
        return "check_whole" if pa.types.is_floating(arrow_type) else "bad"
    if expected == "float":
        if pa.types.is_integer(arrow_type):
            return "ok"
        return "check_finite" if pa.types.is_floating(arrow_type) else "bad"  # infinities are not measurements
    if expected == "string":
        return "ok" if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) else "bad"
    return "ok" if pa.types.is_boolean(arrow_type) else "bad"


def _count(mask: pa.Array) -> int:
    """Number of true entries; nulls in the mask mean "not applicable" and are not counted."""
    return int(pc.sum(mask).as_py() or 0)


def _missing(arr: pa.Array) -> int:
    """NaN counts as missing: pandas and the feature pipeline treat it exactly like null."""
    nans = _count(pc.is_nan(arr)) if pa.types.is_floating(arr.type) else 0
    return arr.null_count + nans


def _present(arr: pa.Array) -> pa.Array:
    if pa.types.is_floating(arr.type):
        return pc.invert(pc.is_null(arr, nan_is_null=True))
    return pc.is_valid(arr)


def _value_set(categories: list[int | str], arrow_type: pa.DataType) -> pa.Array:
    """Allowed values in the column's own type; a category the type cannot hold matches nothing."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return pa.array([c for c in categories if isinstance(c, str)], type=arrow_type)
    ints = [c for c in categories if isinstance(c, int)]
    if pa.types.is_integer(arrow_type):
        info = np.iinfo(arrow_type.to_pandas_dtype())
        return pa.array([c for c in ints if info.min <= c <= info.max], type=arrow_type)
    if pa.types.is_boolean(arrow_type):
        return pa.array([bool(c) for c in ints if c in (0, 1)], type=arrow_type)
    return pa.array([float(c) for c in ints], type=pa.float64())


# ---------------------------------------------------------------- streaming tallies


@dataclass
class _ColumnTally:
    """Running counts for one column; fed batch by batch so memory does not grow with rows."""

    rule: ColumnRule
    status: TypeStatus
    missing: int = 0
    wrong_values: int = 0  # present values the type rule refuses: not whole, or infinite
    out_of_range: int = 0
    not_in_categories: int = 0
    value_set: pa.Array | None = None

    def update(self, arr: pa.Array) -> None:
        self.missing += _missing(arr)
        if self.status == "bad" or pa.types.is_null(arr.type):
            return
        if self.status in ("check_whole", "check_finite"):
            fits = pc.is_finite(arr)
            if self.status == "check_whole":
                fits = pc.and_(fits, pc.equal(arr, pc.floor(arr)))
            self.wrong_values += _count(pc.and_(_present(arr), pc.invert(fits)))
        if self.rule.range is not None:
            lo, hi = self.rule.range
            self.out_of_range += _count(pc.or_(pc.less(arr, lo), pc.greater(arr, hi)))
        if self.rule.categories is not None:
            if self.value_set is None:
                self.value_set = _value_set(self.rule.categories, arr.type)
            allowed = pc.is_in(arr, value_set=self.value_set)
            self.not_in_categories += _count(pc.and_(_present(arr), pc.invert(allowed)))

    @property
    def type_ok(self) -> bool:
        return self.status != "bad" and self.wrong_values == 0


@dataclass
class _LabelTally:
    """Class sizes of the binary label `label > threshold`, ignoring missing labels."""

    threshold: float
    positive: int = 0
    negative: int = 0

    def update(self, arr: pa.Array) -> None:
        if pa.types.is_null(arr.type):
            return
        self.positive += _count(pc.greater(arr, self.threshold))
        self.negative += _count(pc.less_equal(arr, self.threshold))


@dataclass
class _IdTally:
    """64-bit keys of every non-null patient id, in one array preallocated to the row count.

    Memory: 8 bytes per row (80 MB for 10 million rows), plus a transient mask of one byte
    per row at the end; the sort is in place. Integer ids are used exactly (no collisions);
    other ids are hashed to 64 bits, where a false duplicate among 10 million distinct ids
    has a probability of about 3e-6.
    """

    capacity: int
    keys: np.ndarray = field(init=False)
    used: int = 0

    def __post_init__(self) -> None:
        self.keys = np.empty(self.capacity, dtype=np.uint64)

    def update(self, arr: pa.Array) -> None:
        valid = arr.drop_null()
        if len(valid) == 0:
            return
        if pa.types.is_integer(valid.type):
            keys = valid.to_numpy().astype(np.uint64, copy=False)
        else:
            keys = hash_array(valid.to_numpy(zero_copy_only=False), categorize=False)
        self.keys[self.used : self.used + len(keys)] = keys
        self.used += len(keys)

    def duplicate_rows(self) -> int:
        """Rows whose id repeats an earlier row's id (so n copies count n - 1)."""
        keys = self.keys[: self.used]
        keys.sort()
        return int(np.count_nonzero(keys[1:] == keys[:-1])) if self.used > 1 else 0


# ---------------------------------------------------------------- rule texts


def _num(x: float) -> str:
    return f"{x:g}"


def _range_text(rule: ColumnRule) -> str:
    lo, hi = rule.range  # type: ignore[misc]
    unit = f" {rule.unit}" if rule.unit else ""
    return f"values must lie in [{_num(lo)}, {_num(hi)}]{unit}"


def _categories_text(rule: ColumnRule) -> str:
    return "values must be one of " + ", ".join(str(c) for c in rule.categories or [])


_TYPE_TEXT = {
    "integer": "values must be integers (any integer type, or floats holding whole numbers)",
    "float": "values must be finite numbers (any floating or integer type; NaN counts as missing)",
    "string": "values must be text (string or large_string)",
    "boolean": "values must be booleans",
}


# ---------------------------------------------------------------- rule results


@dataclass
class _Ctx:
    """What every rule builder needs: the study (for k and rules) and the row count."""

    study: StudySpec
    rows: int

    def result(self, rule: str, column: str | None, severity: Severity, passed: bool,
               violations: int, description: str) -> RuleResult:
        return RuleResult(rule=rule, column=column, severity=severity, passed=passed,
                          violations=suppress(violations, self.study.small_cell_min),
                          description=description)


def _absent_column_results(ctx: _Ctx, name: str, rule: ColumnRule) -> list[RuleResult]:
    if rule.required:
        return [ctx.result(f"column.{name}.present", name, "error", False, 0,
                           "required column must be present; no other rule for it was evaluated")]
    return [ctx.result(f"column.{name}.present", name, "warning", True, 0,
                       "optional column may be absent")]


def _type_result(ctx: _Ctx, name: str, tally: _ColumnTally, arrow_type: pa.DataType) -> RuleResult:
    text = _TYPE_TEXT[tally.rule.type]
    if tally.status == "bad":
        return ctx.result(f"column.{name}.type", name, "error", False, ctx.rows,
                          f"{text}; the file stores {arrow_type}, so every row counts")
    return ctx.result(f"column.{name}.type", name, "error", tally.type_ok, tally.wrong_values, text)


def _missing_result(ctx: _Ctx, name: str, tally: _ColumnTally) -> RuleResult:
    share = tally.rule.max_missing_share
    passed = ctx.rows == 0 or tally.missing / ctx.rows <= share
    return ctx.result(f"column.{name}.missing_share", name, tally.rule.missing_severity, passed,
                      0 if passed else tally.missing,
                      f"at most {_num(share * 100)}% of values may be missing (null or NaN)")


def _value_results(ctx: _Ctx, name: str, tally: _ColumnTally) -> list[RuleResult]:
    """Range and category checks; meaningless once the type rule failed, so then not evaluated."""
    rule, out = tally.rule, []
    skip = "" if tally.type_ok else "not evaluated (type rule failed): "
    if rule.range is not None:
        out.append(ctx.result(f"column.{name}.range", name, rule.range_severity,
                              tally.type_ok and tally.out_of_range == 0,
                              tally.out_of_range if tally.type_ok else 0, skip + _range_text(rule)))
    if rule.categories is not None:
        out.append(ctx.result(f"column.{name}.categories", name, rule.categories_severity,
                              tally.type_ok and tally.not_in_categories == 0,
                              tally.not_in_categories if tally.type_ok else 0, skip + _categories_text(rule)))
    return out


def _column_results(ctx: _Ctx, name: str, tally: _ColumnTally, arrow_type: pa.DataType) -> list[RuleResult]:
    return [
        ctx.result(f"column.{name}.present", name, "error" if tally.rule.required else "warning", True, 0,
                   "required column must be present" if tally.rule.required else "optional column may be absent"),
        _type_result(ctx, name, tally, arrow_type),
        _missing_result(ctx, name, tally),
        *_value_results(ctx, name, tally),
    ]


def _min_rows_result(ctx: _Ctx) -> RuleResult:
    need = ctx.study.cohort.min_rows
    passed = ctx.rows >= need
    return ctx.result("cohort.min_rows", None, "error", passed, 0 if passed else ctx.rows,
                      f"cohort must have at least {need} rows (count shown: rows present)")


def _max_rows_result(ctx: _Ctx) -> RuleResult:
    """Aggregation weights and CKKS bounds are scaled by the study's declared largest cohort:
    a bigger one would overflow them, so it is refused here rather than mid-study."""
    limit = ctx.study.cohort.max_rows
    passed = ctx.rows <= limit
    return ctx.result("cohort.max_rows", None, "error", passed, 0 if passed else ctx.rows,
                      f"cohort must have at most {limit} rows, the study's declared largest cohort "
                      "(count shown: rows present)")


def _label_result(ctx: _Ctx, label: _LabelTally | None, usable: bool) -> RuleResult:
    schema = ctx.study.cohort
    col, need, thr = schema.label_column, schema.min_rows_per_class, _num(ctx.study.features.label_threshold)
    text = (f"each label class ({col} > {thr} and {col} <= {thr}) must have at least {need} "
            "non-missing rows (count shown: rows in the smallest short class)")
    if label is None or not usable:
        return ctx.result("cohort.label_classes", col, "error", False, 0,
                          f"not evaluated (label column absent or not numeric): {text}")
    short = [n for n in (label.positive, label.negative) if n < need]
    return ctx.result("cohort.label_classes", col, "error", not short, min(short, default=0), text)


def _duplicate_result(ctx: _Ctx, ids: _IdTally | None) -> RuleResult | None:
    col = ctx.study.cohort.patient_id_column
    if col is None:
        return None
    text = f"values of {col} must be unique (count shown: rows repeating an earlier id)"
    if ids is None:
        return ctx.result("cohort.duplicate_patients", col, "error", False, 0,
                          f"not evaluated (column absent or of the wrong type): {text}")
    dup = ids.duplicate_rows()
    return ctx.result("cohort.duplicate_patients", col, "error", dup == 0, dup, text)


# ---------------------------------------------------------------- driver


@dataclass
class _Scan:
    """All tallies for one file, built from the Parquet schema before any row is read."""

    tallies: dict[str, _ColumnTally]
    label_column: str
    label: _LabelTally | None = None
    id_column: str | None = None
    ids: _IdTally | None = None

    def columns(self) -> list[str]:
        return list(self.tallies)

    def update(self, batch: pa.RecordBatch) -> None:
        for name, tally in self.tallies.items():
            tally.update(batch.column(name))
        if self.label is not None:
            self.label.update(batch.column(self.label_column))
        if self.ids is not None and self.id_column is not None:
            self.ids.update(batch.column(self.id_column))


def _plan(study: StudySpec, arrow_schema: pa.Schema, rows: int, path: Path) -> _Scan:
    cohort = study.cohort
    present = set(arrow_schema.names)
    for name in cohort.columns:
        if arrow_schema.get_all_field_indices(name)[1:]:
            raise PolicyError(f"{path}: column '{name}' appears more than once in the file")
    tallies = {
        name: _ColumnTally(rule, _type_status(rule.type, arrow_schema.field(name).type))
        for name, rule in cohort.columns.items() if name in present
    }
    scan = _Scan(tallies, cohort.label_column, id_column=cohort.patient_id_column)
    if cohort.label_column in present and _numeric(arrow_schema.field(cohort.label_column).type):
        scan.label = _LabelTally(study.features.label_threshold)  # the label is compared with a number
    id_tally = tallies.get(cohort.patient_id_column or "")
    if id_tally is not None and id_tally.status != "bad":  # ids of an unexpected type may not hash
        scan.ids = _IdTally(rows)
    return scan


def _stream(pf: pq.ParquetFile, scan: _Scan, batch_rows: int, path: Path) -> None:
    """Read only the schema's columns, one bounded batch at a time, row group by row group
    (so a damaged file is reported with the row group that could not be read)."""
    if not scan.columns():
        return
    groups = pf.num_row_groups
    for group in range(groups):
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=scan.columns()):
                scan.update(batch)
        except (pa.ArrowException, OSError) as exc:
            raise PolicyError(f"{path}: Parquet file could not be read to the end: row group {group + 1} of {groups} "
                              f"is damaged or truncated ({type(exc).__name__})") from None


def _numeric(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_null(arrow_type)


def _label_usable(study: StudySpec, scan: _Scan) -> bool:
    """Class sizes mean nothing if the label column failed its own type rule."""
    tally = scan.tallies.get(study.cohort.label_column)
    return scan.label is not None and tally is not None and tally.type_ok


def validate_cohort(path: str | Path, study: StudySpec, batch_rows: int = 65536) -> ValidationReport:
    """Check a Parquet cohort against the study's CohortSchema in bounded memory.

    Only the schema's columns are read, `batch_rows` rows at a time (Arrow may hold one
    row group's pages while slicing it), so memory does not grow with the file's length;
    the one exception is the duplicate-patient check, 8 bytes per row (see `_IdTally`).
    Raises PolicyError for a missing or unreadable file.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    path = Path(path)
    pf = open_parquet(path)
    arrow_schema = pf.schema_arrow
    rows = pf.metadata.num_rows
    scan = _plan(study, arrow_schema, rows, path)
    _stream(pf, scan, batch_rows, path)
    ctx = _Ctx(study, rows)
    k = study.small_cell_min

    results: list[RuleResult] = []
    for name, rule in study.cohort.columns.items():
        tally = scan.tallies.get(name)
        if tally is None:
            results += _absent_column_results(ctx, name, rule)
        else:
            results += _column_results(ctx, name, tally, arrow_schema.field(name).type)
    results.append(_min_rows_result(ctx))
    results.append(_max_rows_result(ctx))
    results.append(_label_result(ctx, scan.label, _label_usable(study, scan)))
    dup = _duplicate_result(ctx, scan.ids)
    if dup is not None:
        results.append(dup)

    return ValidationReport(
        file=str(path),
        study_id=study.id,
        policy_hash=study.policy_hash(),
        small_cell_min=k,
        rows=suppress(rows, k),
        results=results,
        missing_per_column={name: suppress(t.missing, k) for name, t in scan.tallies.items()},
    )
