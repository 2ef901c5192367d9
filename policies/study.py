"""The study contract as typed models, loaded from YAML and identified by a content hash.

Silos and the coordinator each hold a copy of the study policy; the hash of its
canonical JSON form travels in every message, so both sides know they run the same study.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies import PROTOCOL_VERSION
from policies.ckks import CkksParams
from policies.errors import PolicyError
from policies.privacy import PrivacyPolicy
from policies.schema import CohortSchema
from policies.yamlsafe import load_yaml_file, load_yaml_text

STUDIES_DIR = Path(__file__).resolve().parent / "studies"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf / .nan are never a setting


class Governance(_Strict):
    purpose: str
    data_controller: str
    ethics_reference: str
    retention: str


class FeaturePipeline(_Strict):
    """FLamby-style tabular pipeline: drop columns, drop incomplete rows, one-hot, z-score."""

    drop_columns: list[str] = []
    numeric: list[str]
    one_hot: dict[str, list[int]] = {}
    label_threshold: float = 0.0
    normalisation: Literal["pooled", "local", "none"] = "pooled"


class Split(_Strict):
    train_size: float = Field(0.66, gt=0.0, lt=1.0)
    seed: int = 43
    stratify: bool = True


class ModelSpec(_Strict):
    kind: Literal["logistic_regression"] = "logistic_regression"


class Training(_Strict):
    rounds: int = Field(15, ge=1, le=1000)
    local_steps: int = Field(100, ge=1, le=100_000)  # per round; beyond this a round never ends
    batch_size: int = Field(4, ge=1)
    strategy: Literal["fedavg", "fedyogi"] = "fedyogi"
    client_lr: float = Field(0.003162, gt=0)
    server_lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    tau: float = Field(1e-8, gt=0)
    weighting: Literal["train_rows", "uniform"] = "train_rows"


class Approval(_Strict):
    mode: Literal["manual", "auto"] = "auto"
    auto_rounds: int = Field(1000, ge=0)


class StudySpec(_Strict):
    """One study, end to end. Unknown keys are errors, not silently ignored."""

    protocol_version: int
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    name: str = Field(max_length=200)  # shown to every silo's IT: never blank (checked below)
    version: int = Field(1, ge=1)
    governance: Governance
    cohort: CohortSchema
    features: FeaturePipeline
    split: Split = Split()
    model: ModelSpec = ModelSpec()
    training: Training = Training()
    seed: int = 42
    min_silos: int = Field(3, ge=1)
    small_cell_min: int = Field(10, ge=1)  # issue 5: counts below 10 are suppressed unless a study says otherwise
    encryption: Literal["none", "ckks"] = "none"
    ckks: CkksParams = CkksParams()
    privacy: Literal["none"] | PrivacyPolicy = "none"
    approval: Approval = Approval()

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("a study needs a name; it is empty")
        return name

    @model_validator(mode="after")
    def _check(self) -> "StudySpec":
        if self.protocol_version != PROTOCOL_VERSION:
            raise ValueError(
                f"protocol_version {self.protocol_version} is not supported by this fedcohort "
                f"(speaks protocol {PROTOCOL_VERSION}); upgrade or use a matching policy"
            )
        if self.training.batch_size > self.cohort.max_rows:
            raise ValueError(
                f"training.batch_size {self.training.batch_size} is above cohort.max_rows {self.cohort.max_rows}: "
                "no silo could fill one batch"
            )
        known = set(self.cohort.columns)
        for col in [*self.features.numeric, *self.features.one_hot, *self.features.drop_columns]:
            if col not in known:
                raise ValueError(f"features refer to column '{col}' that the cohort schema does not define")
        return self

    @property
    def dp(self) -> PrivacyPolicy | None:
        """The study's DP-SGD budget per silo, or None for a non-private study."""
        return self.privacy if isinstance(self.privacy, PrivacyPolicy) else None

    def feature_names(self) -> list[str]:
        """Model input columns in order: numeric columns, then one-hot levels minus the first."""
        names = list(self.features.numeric)
        for col, levels in self.features.one_hot.items():
            names += [f"{col}_{level}" for level in levels[1:]]
        return names

    def policy_hash(self) -> str:
        """sha256 of the canonical JSON of the whole policy: the study's identity."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _is_union_branch(part: object) -> bool:
    """pydantic names union alternatives in locations (`literal['none']`, `PrivacyPolicy`): not keys."""
    return isinstance(part, str) and (part.startswith("literal[") or part[:1].isupper())


def _format_validation_error(source: str, exc: ValidationError) -> str:
    problems: dict[str, list[str]] = {}
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not _is_union_branch(p)) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")  # our own checks' words, without pydantic's prefix
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the study policy format)"
        problems.setdefault(where, []).append(msg)
    lines = [f"{source}: the study policy is not valid:"]
    lines += [f"  - {where}: {' or '.join(msgs)}" for where, msgs in problems.items()]
    return "\n".join(lines)


def study_from_dict(data: Any, source: str) -> StudySpec:
    if data is None:
        raise PolicyError(f"{source}: the study policy is empty (no YAML mapping in it)")
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a study policy must be a YAML mapping at the top level")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format_validation_error(source, exc)) from None


def load_study(path: str | Path) -> StudySpec:
    """Load and validate a study policy file; raises PolicyError naming the key and rule."""
    return study_from_dict(load_yaml_file(Path(path)), str(path))


def load_study_text(text: str, source: str = "<policy>") -> StudySpec:
    return study_from_dict(load_yaml_text(text, source), source)


def shipped_study(name: str = "heart_disease") -> Path:
    return STUDIES_DIR / f"{name}.yaml"
