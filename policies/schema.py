"""Cohort schema: what every silo's table must look like, rule by rule.

Each rule carries a severity: `error` blocks joining the study, `warning` is reported.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Severity = Literal["error", "warning"]
ColumnType = Literal["integer", "float", "string", "boolean"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # a rule bound of .inf/.nan checks nothing


class ColumnRule(_Strict):
    """Rules for one column. Ranges are inclusive; categories are exact values."""

    type: ColumnType
    required: bool = True
    max_missing_share: float = Field(0.0, ge=0.0, le=1.0)
    missing_severity: Severity = "error"
    range: tuple[float, float] | None = None
    range_severity: Severity = "error"
    categories: list[int | str] | None = None
    categories_severity: Severity = "error"
    unit: str | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ColumnRule":
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError(f"range lower bound {self.range[0]} is above upper bound {self.range[1]}")
        if self.range is not None and self.type in ("string", "boolean"):
            raise ValueError(f"a range makes no sense for a {self.type} column")
        return self


class CohortSchema(_Strict):
    """Per-column rules plus per-cohort rules (size, classes, duplicate patients)."""

    columns: dict[str, ColumnRule]
    label_column: str
    min_rows: int = Field(20, ge=1)
    min_rows_per_class: int = Field(1, ge=1)
    max_rows: int = Field(100_000, ge=1, description="declared largest cohort: aggregation weights are rows / max_rows")
    patient_id_column: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "CohortSchema":
        if self.label_column not in self.columns:
            raise ValueError(f"label_column '{self.label_column}' is not among the schema's columns")
        if self.patient_id_column is not None and self.patient_id_column not in self.columns:
            raise ValueError(f"patient_id_column '{self.patient_id_column}' is not among the schema's columns")
        return self
