"""The coordinator's memory: studies, silos, rounds, approvals, evaluations, spend, audit.

Why a SQL database and not files: the ServerApp process, the Streamlit UI and the CLI
read and write the same study at the same time (a lead approves round 3 in the UI while
the ServerApp waits for exactly that). So every public method of `Store` is one short
transaction, nothing keeps a session open, and each process opens its own `Store`.

SQLite (the default) runs in WAL mode with foreign keys on; writers take the write lock
at BEGIN (`BEGIN IMMEDIATE`), so two processes never deadlock upgrading a read lock.
PostgreSQL (any SQLAlchemy URL) works the same way; status changes lock their row.

Flower run and node ids are unsigned 64-bit: they are stored as TEXT and come back as
the exact Python int. Timestamps are UTC. JSON has no NaN: non-finite floats in metrics
are stored as null.

The schema is owned by Alembic (`coordinator/migrations`); `open_store` upgrades it to
head, so a new release migrates an existing store on first open.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKeyConstraint,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator

from coordinator import lifecycle
from coordinator.lifecycle import StatusChange, StudyStatus
from policies.errors import PolicyError
from policies.study import StudySpec, load_study_text

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "fedcohort_schema_version"  # not "alembic_version": a shared PostgreSQL database stays unambiguous
DEFAULT_DB = Path("coordinator") / "fedcohort.db"
SQLITE_BUSY_SECONDS = 30.0
_WRITE = "fedcohort_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
U64_MAX = 2**64 - 1
# Alembic loads env.py and the revisions as modules, which is not thread-safe: threads of one
# process (Streamlit sessions) migrate one at a time. Processes are serialised by the database.
_MIGRATE_LOCK = threading.Lock()

RoundStatus = Literal["waiting_approval", "approved", "held", "rejected", "running", "finished", "failed"]
Decision = Literal["approve", "hold", "reject"]
EnrolmentStatus = Literal["pending", "validated", "failed", "withdrawn", "revoked"]
KeyCeremony = Literal["not_started", "in_progress", "done", "failed"]
Role = Literal["lead", "auditor", "admin"]
ReleaseStatus = Literal["requested", "released", "failed"]

_DECISION_STATUS: Mapping[str, RoundStatus] = {"approve": "approved", "hold": "held", "reject": "rejected"}


# ----------------------------------------------------------------------------- column types


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the store keeps UTC only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class U64Text(TypeDecorator[int]):
    """Flower's unsigned 64-bit ids as TEXT: SQLite's INTEGER and PostgreSQL's BIGINT are signed."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: int | str | None, dialect: Dialect) -> str | None:
        return None if value is None else str(as_u64(value))

    def process_result_value(self, value: str | None, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


def as_u64(value: int | str) -> int:
    """Accept a Flower id as int or decimal text; refuse anything outside 0..2**64-1."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PolicyError(f"'{value}' is not a Flower id (an unsigned 64-bit integer)") from None
    if isinstance(value, bool) or not 0 <= number <= U64_MAX:
        raise PolicyError(f"'{value}' is not a Flower id (an unsigned 64-bit integer)")
    return number


# ----------------------------------------------------------------------------- tables

_NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, choices: tuple[str, ...]) -> CheckConstraint:
    listed = ", ".join(f"'{c}'" for c in choices)
    return CheckConstraint(f"{column} IN ({listed})", name=column)


def _study_fk() -> ForeignKeyConstraint:
    return ForeignKeyConstraint(["study_id", "study_version"], ["studies.id", "studies.version"], ondelete="CASCADE")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=_NAMING)


class Study(Base):
    """One version of a study policy; (id, version) is the study's name in every other table."""

    __tablename__ = "studies"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    policy_yaml: Mapped[str] = mapped_column(Text)
    policy_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (_one_of("status", lifecycle.STATUSES),)


class Silo(Base):
    __tablename__ = "silos"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    key_fingerprint: Mapped[str | None] = mapped_column(String(200))
    flower_node_id: Mapped[int | None] = mapped_column(U64Text())
    online: Mapped[bool] = mapped_column(Boolean)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    node_auth_key: Mapped[str | None] = mapped_column(Text)  # SuperNode auth public key (OpenSSH line)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # `coordinator silo revoke`
    revoked_reason: Mapped[str | None] = mapped_column(Text)


class Enrolment(Base):
    __tablename__ = "enrolments"
    study_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    study_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    silo: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    validation_report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    key_ceremony: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (
        _study_fk(),
        ForeignKeyConstraint(["silo"], ["silos.name"], ondelete="CASCADE"),
        _one_of("status", get_args(EnrolmentStatus)),
        _one_of("key_ceremony", get_args(KeyCeremony)),
    )


class Round(Base):
    __tablename__ = "rounds"
    study_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    study_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(24))
    asked: Mapped[list[str]] = mapped_column(JSON)
    replied: Mapped[list[str]] = mapped_column(JSON)
    refused: Mapped[dict[str, str]] = mapped_column(JSON)
    flower_run_id: Mapped[int | None] = mapped_column(U64Text())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (_study_fk(), _one_of("status", get_args(RoundStatus)))


class Approval(Base):
    __tablename__ = "approvals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(String(63))
    study_version: Mapped[int] = mapped_column(Integer)
    round_no: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(8))
    user: Mapped[str] = mapped_column("user_name", Text)  # "user" is reserved in PostgreSQL
    note: Mapped[str] = mapped_column(Text)
    policy_hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (
        ForeignKeyConstraint(
            ["study_id", "study_version", "round_no"],
            ["rounds.study_id", "rounds.study_version", "rounds.round_no"],
            ondelete="CASCADE",
        ),
        _one_of("decision", get_args(Decision)),
    )


class Evaluation(Base):
    """Metrics of the model after `round_no` training rounds (0 = the initial model)."""

    __tablename__ = "evaluations"
    study_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    study_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(200), primary_key=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (_study_fk(),)


class PrivacySpend(Base):
    __tablename__ = "privacy_spend"
    study_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    study_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    silo: Mapped[str] = mapped_column(String(200), primary_key=True)
    round_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    epsilon_spent_total: Mapped[float] = mapped_column(Float)
    epsilon_budget: Mapped[float] = mapped_column(Float)
    rounds_left: Mapped[int | None] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (_study_fk(), ForeignKeyConstraint(["silo"], ["silos.name"], ondelete="CASCADE"))


class User(Base):
    __tablename__ = "users"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    failed_attempts: Mapped[int] = mapped_column(Integer)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (_one_of("role", get_args(Role)),)


class AuditEntry(Base):
    """A copy of one party's hash-chained audit entry; the signed original stays with the party."""

    __tablename__ = "audit_entries"
    party: Mapped[str] = mapped_column(String(200), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(128))
    prev_hash: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    entry: Mapped[dict[str, Any]] = mapped_column(JSON)
    mirrored_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Checkpoint(Base):
    """What the coordinator may hold to resume: aggregate ciphertext sums and public history."""

    __tablename__ = "checkpoints"
    study_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    study_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    encrypted_state: Mapped[bytes] = mapped_column(LargeBinary)
    silos_in: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    __table_args__ = (_study_fk(),)


class ModelRelease(Base):
    """A study version's model release: requested by the lead, then released or failed.

    One row per study version, the latest attempt (the audit log keeps every attempt). The
    weights (a safetensors file, rounded at the silos) and the card are set only when the
    release succeeded; a failed attempt keeps the consents and the reason, nothing else.
    """

    __tablename__ = "model_releases"
    study_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    study_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    requested_by: Mapped[str] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    reason: Mapped[str] = mapped_column(Text)
    consents: Mapped[dict[str, str]] = mapped_column(JSON)  # silo -> "consented" or why not
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    model_card: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    weights: Mapped[bytes | None] = mapped_column(LargeBinary)
    __table_args__ = (_study_fk(), _one_of("status", get_args(ReleaseStatus)))


TABLES: tuple[str, ...] = tuple(Base.metadata.tables)

# ----------------------------------------------------------------------------- returned rows
# Plain frozen records, not ORM objects: a session never outlives one method, and a
# caller mutating a returned row must not look like a write.


@dataclass(frozen=True)
class StudyRow:
    id: str
    version: int
    name: str
    policy_yaml: str
    policy_hash: str
    status: StudyStatus
    created_by: str
    created_at: datetime
    updated_at: datetime

    @property
    def label(self) -> str:
        """How people name a study version in messages: "heart-disease v1"."""
        return f"{self.id} v{self.version}"

    @cached_property
    def spec(self) -> StudySpec:
        return load_study_text(self.policy_yaml, self.label)


@dataclass(frozen=True)
class SiloRow:
    name: str
    key_fingerprint: str | None
    flower_node_id: int | None
    online: bool
    last_seen: datetime | None
    created_at: datetime
    node_auth_key: str | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


@dataclass(frozen=True)
class EnrolmentRow:
    study_id: str
    study_version: int
    silo: str
    status: EnrolmentStatus
    validation_report: dict[str, Any] | None
    key_ceremony: KeyCeremony
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class RoundRow:
    study_id: str
    study_version: int
    round_no: int
    status: RoundStatus
    asked: list[str]
    replied: list[str]
    refused: dict[str, str]
    flower_run_id: int | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True)
class ApprovalRow:
    id: int
    study_id: str
    study_version: int
    round_no: int
    decision: Decision
    user: str
    note: str
    policy_hash: str
    at: datetime


@dataclass(frozen=True)
class EvaluationRow:
    study_id: str
    study_version: int
    round_no: int
    scope: str
    metrics: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class PrivacySpendRow:
    study_id: str
    study_version: int
    silo: str
    round_no: int
    epsilon_spent_total: float
    epsilon_budget: float
    rounds_left: int | None
    recorded_at: datetime


@dataclass(frozen=True)
class UserRow:
    name: str
    role: Role
    password_hash: str
    failed_attempts: int
    locked_until: datetime | None
    created_at: datetime

    def is_locked(self, now: datetime | None = None) -> bool:
        return self.locked_until is not None and (now or _now()) < self.locked_until


@dataclass(frozen=True)
class AuditRow:
    party: str
    seq: int
    hash: str
    prev_hash: str
    action: str
    actor: str
    entry: dict[str, Any]
    mirrored_at: datetime


@dataclass(frozen=True)
class CheckpointRow:
    study_id: str
    study_version: int
    round_no: int
    encrypted_state: bytes
    silos_in: list[str]
    created_at: datetime


@dataclass(frozen=True)
class ModelReleaseRow:
    study_id: str
    study_version: int
    status: ReleaseStatus
    requested_by: str
    requested_at: datetime
    finished_at: datetime | None
    reason: str
    consents: dict[str, str]
    model_sha256: str | None
    model_card: dict[str, Any] | None
    weights: bytes | None


R = TypeVar("R")


def _row(cls: type[R], obj: Base) -> R:
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- small helpers


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _choice(value: str, options: Any, what: str) -> str:
    allowed = get_args(options)
    if value not in allowed:
        raise PolicyError(f"'{value}' is not a valid {what}; use one of: {', '.join(allowed)}")
    return value


def _text(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PolicyError(f"{what} must be a non-empty text")
    return value


def plain_json(value: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays become Python numbers and lists, NaN/inf null, keys text."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):
        return plain_json(value.tolist())  # numpy array or scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise PolicyError(f"cannot store {type(value).__name__} as JSON")


def needs_manual_approval(spec: StudySpec, round_no: int) -> bool:
    """Policy rule: "manual" gates every round; "auto" lets rounds up to auto_rounds through.

    Round 0 is the statistics round; under "auto" it never needs approval, under "manual"
    it does like any other round (data summaries leave the silos in it too).
    """
    return spec.approval.mode == "manual" or round_no > spec.approval.auto_rounds


# ----------------------------------------------------------------------------- engine + migrations


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_engine(url: str) -> Engine:
    """SQLite for several processes: WAL, foreign keys, a busy timeout, BEGIN IMMEDIATE on writes."""
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we say BEGIN ourselves (pysqlite's implicit one is lazy)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    return engine


def make_engine(url: str) -> Engine:
    """An engine for `url`; plain postgresql:// URLs use psycopg 3 (the driver we ship)."""
    if _is_sqlite(url):
        return _sqlite_engine(url)
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True)


def alembic_config(url: str | None = None) -> Any:
    """Alembic's Config built in code (no alembic.ini on disk), pointing at our migrations."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema in one write transaction (PostgreSQL: under an advisory lock)."""
    from alembic import command

    cfg = alembic_config()
    with _MIGRATE_LOCK, engine.execution_options(**{_WRITE: True}).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def default_url(state_dir: Path) -> str:
    db = (Path(state_dir) / DEFAULT_DB).resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def open_store(url: str | None, state_dir: Path) -> Store:
    """Open (and migrate to head) the store at `url`, or SQLite under `state_dir` by default."""
    engine = make_engine(url or default_url(state_dir))
    try:
        migrate(engine)
    except Exception:
        engine.dispose()
        raise
    return Store(engine)


# ----------------------------------------------------------------------------- the store


class Store:
    """Typed access to the coordinator's database; every method is one short transaction.

    Study-scoped methods take `study_id` and an optional keyword `version`; without it the
    latest version is meant. A ServerApp should pass the version it runs (`spec.version`).
    Threads of one process may share a Store (the engine pools connections); each process
    opens its own (never carry one across fork).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        self._specs: dict[str, StudySpec] = {}

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transactions -------------------------------------------------------------------
    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        try:
            with Session(self._writer, expire_on_commit=False) as s, s.begin():
                yield s
        except IntegrityError as exc:
            raise PolicyError(
                f"the store refused a conflicting write ({exc.orig}); another process may have written it first"
            ) from None

    # ---- lookups used inside transactions ---------------------------------------------------
    def _study(self, s: Session, study_id: str, version: int | None, *, lock: bool = False) -> Study:
        q = select(Study).where(Study.id == study_id)
        q = q.where(Study.version == version) if version is not None else q.order_by(Study.version.desc()).limit(1)
        row = s.scalars(q.with_for_update() if lock else q).first()
        if row is None:
            named = study_id if version is None else f"{study_id} v{version}"
            raise PolicyError(f"no study {named} in the store")
        return row

    def _spec(self, study: Study) -> StudySpec:
        """Parsed policy, cached by hash (the hash names the content, so the cache cannot go stale)."""
        spec = self._specs.get(study.policy_hash)
        if spec is None:
            spec = self._specs[study.policy_hash] = load_study_text(study.policy_yaml, f"{study.id} v{study.version}")
        return spec

    def _check_round_no(self, study: Study, round_no: int) -> None:
        planned = self._spec(study).training.rounds
        if not isinstance(round_no, int) or not 0 <= round_no <= planned:
            raise PolicyError(f"study {study.id} v{study.version} has rounds 0..{planned}; there is no round {round_no}")

    def _round(self, s: Session, study: Study, round_no: int, *, create: bool, lock: bool = False) -> Round | None:
        q = select(Round).where(Round.study_id == study.id, Round.study_version == study.version, Round.round_no == round_no)
        row = s.scalars(q.with_for_update() if lock else q).first()
        if row is None and create:
            status: RoundStatus = "approved" if not needs_manual_approval(self._spec(study), round_no) else "waiting_approval"
            row = Round(study_id=study.id, study_version=study.version, round_no=round_no, status=status,
                        asked=[], replied=[], refused={}, updated_at=_now())
            s.add(row)
            s.flush()
        return row

    def _latest_approval(self, s: Session, study: Study, round_no: int) -> Approval | None:
        q = (select(Approval)
             .where(Approval.study_id == study.id, Approval.study_version == study.version,
                    Approval.round_no == round_no, Approval.policy_hash == study.policy_hash)
             .order_by(Approval.id.desc()).limit(1))
        return s.scalars(q).first()

    def _approved(self, s: Session, study: Study, round_no: int) -> bool:
        latest = self._latest_approval(s, study, round_no)
        if latest is not None:  # an explicit decision (even a hold on an auto round) wins
            return latest.decision == "approve"
        return not needs_manual_approval(self._spec(study), round_no)

    # ---- studies ------------------------------------------------------------------------------
    def create_study(self, spec_yaml_text: str, created_by: str) -> StudyRow:
        """Register a new study (as a draft) from its policy YAML, validated and hashed."""
        spec = load_study_text(spec_yaml_text, "new study policy")
        _text(created_by, "created_by")
        with self._write() as s:
            existing = s.scalars(select(func.max(Study.version)).where(Study.id == spec.id)).first()
            if existing is not None:
                raise PolicyError(f"study {spec.id} already exists (latest v{existing}); publish a change as a new version")
            return _row(StudyRow, self._insert_study(s, spec, spec_yaml_text, created_by))

    def new_version(self, study_id: str, new_yaml: str, user: str) -> StudyRow:
        """Publish a changed policy as the next version (a draft with its own hash)."""
        spec = load_study_text(new_yaml, f"{study_id} (new version)")
        _text(user, "user")
        if spec.id != study_id:
            raise PolicyError(f"the new policy is for study '{spec.id}', not '{study_id}'")
        with self._write() as s:
            latest = self._study(s, study_id, None)
            if spec.version <= latest.version:
                raise PolicyError(f"study {study_id} is at v{latest.version}; the changed policy must say "
                                  f"version: {latest.version + 1}")
            if _same_apart_from_version(self._spec(latest), spec):
                raise PolicyError(f"the policy for {study_id} is unchanged from v{latest.version}; nothing to publish")
            return _row(StudyRow, self._insert_study(s, spec, new_yaml, user))

    def _insert_study(self, s: Session, spec: StudySpec, text: str, user: str) -> Study:
        now = _now()
        row = Study(id=spec.id, version=spec.version, name=spec.name, policy_yaml=text, policy_hash=spec.policy_hash(),
                    status="draft", created_by=user, created_at=now, updated_at=now)
        s.add(row)
        s.flush()
        return row

    def edit_draft(self, study_id: str, new_yaml: str, user: str, *, version: int | None = None) -> StudyRow:
        """Replace a draft's policy in place; refused once the study is open (use new_version)."""
        spec = load_study_text(new_yaml, f"{study_id} (edited draft)")
        _text(user, "user")
        with self._write() as s:
            row = self._study(s, study_id, version, lock=True)
            lifecycle.check_editable(f"{row.id} v{row.version}", row.status)  # type: ignore[arg-type]
            if (spec.id, spec.version) != (row.id, row.version):
                raise PolicyError(f"the edited policy says {spec.id} v{spec.version}; it must stay {row.id} v{row.version}")
            row.policy_yaml, row.policy_hash, row.name, row.updated_at = new_yaml, spec.policy_hash(), spec.name, _now()
            return _row(StudyRow, row)

    def get_study(self, study_id: str, version: int | None = None) -> StudyRow:
        with self._read() as s:
            return _row(StudyRow, self._study(s, study_id, version))

    def list_studies(self, *, all_versions: bool = False) -> list[StudyRow]:
        """Studies by id; only the latest version of each unless `all_versions`."""
        with self._read() as s:
            rows = [_row(StudyRow, r) for r in s.scalars(select(Study).order_by(Study.id, Study.version))]
        if all_versions:
            return rows
        return list({r.id: r for r in rows}.values())

    def set_status(self, study_id: str, to: str, user: str, reason: str = "", *,
                   version: int | None = None) -> StatusChange:
        """Apply a lifecycle transition; use `coordinator.lifecycle.transition` to call it."""
        _text(user, "user")
        with self._write() as s:
            row = self._study(s, study_id, version, lock=True)
            validated = s.scalar(select(func.count()).select_from(Enrolment).where(
                Enrolment.study_id == row.id, Enrolment.study_version == row.version, Enrolment.status == "validated"))
            others = s.scalars(select(Study.version).where(
                Study.id == row.id, Study.version != row.version, Study.status.in_(lifecycle.ACTIVE))).all()
            current: StudyStatus = row.status  # type: ignore[assignment]
            target = lifecycle.check_transition(
                f"{row.id} v{row.version}", current, to, min_silos=self._spec(row).min_silos,
                validated_silos=int(validated or 0), other_active_versions=list(others), reason=reason)
            row.status, row.updated_at = target, _now()
            return StatusChange(row.id, row.version, current, target, user, reason, row.updated_at)

    # ---- silos and enrolments -------------------------------------------------------------------
    def register_silo(self, name: str, key_fingerprint: str | None = None,
                      node_id: int | str | None = None) -> SiloRow:
        """Add or update a silo. Its enrolment key fingerprint, once set, never changes silently."""
        _text(name, "silo name")
        with self._write() as s:
            row = s.get(Silo, name) or self._new_silo(s, name)
            if key_fingerprint is not None:
                if row.key_fingerprint not in (None, key_fingerprint):
                    raise PolicyError(f"silo {name} is registered with key fingerprint {row.key_fingerprint}; "
                                      f"a different key ({key_fingerprint}) needs a new enrolment, checked out of band")
                row.key_fingerprint = key_fingerprint
            if node_id is not None:
                row.flower_node_id = as_u64(node_id)
            return _row(SiloRow, row)

    def register_node_key(self, name: str, node_auth_key: str, node_id: int | str) -> SiloRow:
        """Record the SuperNode key a silo authenticates with and the node id the SuperLink
        gave it. A silo's key, once registered, never changes silently, and no two silos
        share a key or a node id."""
        _text(name, "silo name")
        node_id = as_u64(node_id)
        with self._write() as s:
            row = s.get(Silo, name) or self._new_silo(s, name)
            if row.node_auth_key not in (None, node_auth_key):
                raise PolicyError(f"silo {name} is registered with another SuperNode key; unregister it "
                                  "(`flwr supernode unregister`) and check the new one out of band first")
            other = s.scalars(select(Silo).where(Silo.name != name, (Silo.node_auth_key == node_auth_key)
                                                 | (Silo.flower_node_id == node_id))).first()
            if other is not None:
                raise PolicyError(f"this SuperNode key or node id {node_id} is already registered for silo {other.name}")
            row.node_auth_key, row.flower_node_id = node_auth_key, node_id
            return _row(SiloRow, row)

    def _new_silo(self, s: Session, name: str) -> Silo:
        row = Silo(name=name, key_fingerprint=None, flower_node_id=None, online=False, last_seen=None, created_at=_now())
        s.add(row)
        s.flush()
        return row

    def mark_silo_seen(self, name: str, online: bool = True, node_id: int | str | None = None) -> SiloRow:
        """Heartbeat from the ServerApp: which silos are connected now, under which node id."""
        with self._write() as s:
            row = s.get(Silo, name) or self._new_silo(s, _text(name, "silo name"))
            row.online = online
            row.last_seen = _now()
            if node_id is not None:
                row.flower_node_id = as_u64(node_id)
            return _row(SiloRow, row)

    def revoke_silo(self, name: str, reason: str) -> tuple[SiloRow, list[str]]:
        """Mark a silo revoked (when, why) and end its enrolments in active studies as `revoked`;
        returns the row and the studies (`id vN`) whose enrolment ended. Revoking twice is refused."""
        reason = _text(reason, "revocation reason")
        with self._write() as s:
            row = s.get(Silo, name)
            if row is None:
                raise PolicyError(f"no silo named {name!r} is registered in this store")
            if row.revoked_at is not None:
                raise PolicyError(f"silo {name} was already revoked at {row.revoked_at:%Y-%m-%d %H:%M:%S} UTC "
                                  f"({row.revoked_reason})")
            now = _now()
            row.revoked_at, row.revoked_reason = now, reason
            ended = []
            q = select(Enrolment, Study).join(Study, (Study.id == Enrolment.study_id)
                                              & (Study.version == Enrolment.study_version)).where(Enrolment.silo == name)
            for enrolment, study in s.execute(q):
                if study.status in lifecycle.ACTIVE and enrolment.status != "revoked":
                    enrolment.status, enrolment.updated_at = "revoked", now
                    ended.append(f"{study.id} v{study.version}")
            s.flush()
            return _row(SiloRow, row), ended

    def get_silo(self, name: str) -> SiloRow | None:
        with self._read() as s:
            row = s.get(Silo, name)
            return None if row is None else _row(SiloRow, row)

    def list_silos(self) -> list[SiloRow]:
        with self._read() as s:
            return [_row(SiloRow, r) for r in s.scalars(select(Silo).order_by(Silo.name))]

    def record_enrolment(self, study_id: str, silo: str, status: str, report: Mapping[str, Any] | None = None,
                         key_ceremony: str | None = None, *, version: int | None = None) -> EnrolmentRow:
        """Record a silo's enrolment and its counts-only validation report (insert or update).

        A silo may enrol while the study is open or running; "validated" needs a report that
        does not say ok: false, since `running` counts validated enrolments.
        """
        _choice(status, EnrolmentStatus, "enrolment status")
        if key_ceremony is not None:
            _choice(key_ceremony, KeyCeremony, "key ceremony status")
        if status == "validated" and report is not None and report.get("ok") is False:
            raise PolicyError(f"silo {silo}: its validation report failed, so the enrolment cannot be 'validated'")
        with self._write() as s:
            study = self._study(s, study_id, version)
            if study.status not in lifecycle.ACTIVE:
                raise PolicyError(f"study {study.id} v{study.version} is {study.status}; it takes no enrolments")
            if s.get(Silo, silo) is None:
                self._new_silo(s, _text(silo, "silo name"))
            row = s.get(Enrolment, (study.id, study.version, silo))
            now = _now()
            if row is None:
                row = Enrolment(study_id=study.id, study_version=study.version, silo=silo, status=status,
                                validation_report=None, key_ceremony="not_started", created_at=now, updated_at=now)
                s.add(row)
            row.status, row.updated_at = status, now
            if report is not None:
                row.validation_report = plain_json(report)
            if key_ceremony is not None:
                row.key_ceremony = key_ceremony
            s.flush()
            return _row(EnrolmentRow, row)

    def list_enrolments(self, study_id: str, *, version: int | None = None) -> list[EnrolmentRow]:
        with self._read() as s:
            study = self._study(s, study_id, version)
            q = select(Enrolment).where(Enrolment.study_id == study.id, Enrolment.study_version == study.version)
            return [_row(EnrolmentRow, r) for r in s.scalars(q.order_by(Enrolment.silo))]

    # ---- approvals ----------------------------------------------------------------------------
    def request_approval(self, study_id: str, round_no: int, *, version: int | None = None) -> RoundRow:
        """Make round `round_no` visible (waiting_approval, or approved if the policy auto-approves it)."""
        with self._write() as s:
            study = self._study(s, study_id, version)
            if study.status not in lifecycle.ACTIVE:
                raise PolicyError(f"study {study.id} v{study.version} is {study.status}; round {round_no} will not run")
            self._check_round_no(study, round_no)
            return _row(RoundRow, self._round(s, study, round_no, create=True))

    def record_approval(self, study_id: str, round_no: int, decision: str, user: str, note: str = "", *,
                        version: int | None = None) -> ApprovalRow:
        """A lead's approve/hold/reject for one round, bound to the study's policy hash.

        The latest decision counts. A round that already started cannot be re-decided.
        """
        _choice(decision, Decision, "decision")
        _text(user, "user")
        with self._write() as s:
            study = self._study(s, study_id, version)
            label = f"{study.id} v{study.version}"
            if study.status not in lifecycle.ACTIVE:
                raise PolicyError(f"study {label} is {study.status}; its rounds can no longer be approved")
            self._check_round_no(study, round_no)
            rnd = self._round(s, study, round_no, create=True, lock=True)
            assert rnd is not None
            if rnd.status in ("running", "finished", "failed"):
                raise PolicyError(f"round {round_no} of {label} is {rnd.status}; a decision can no longer change it")
            row = Approval(study_id=study.id, study_version=study.version, round_no=round_no, decision=decision,
                           user=user, note=note, policy_hash=study.policy_hash, at=_now())
            s.add(row)
            rnd.status, rnd.updated_at = _DECISION_STATUS[decision], row.at
            s.flush()
            return _row(ApprovalRow, row)

    def approval_for(self, study_id: str, round_no: int, *, version: int | None = None) -> ApprovalRow | None:
        """The latest explicit decision on a round, or None (auto rounds have none)."""
        with self._read() as s:
            study = self._study(s, study_id, version)
            row = self._latest_approval(s, study, round_no)
            return None if row is None else _row(ApprovalRow, row)

    def list_approvals(self, study_id: str, round_no: int | None = None, *,
                       version: int | None = None) -> list[ApprovalRow]:
        with self._read() as s:
            study = self._study(s, study_id, version)
            q = select(Approval).where(Approval.study_id == study.id, Approval.study_version == study.version)
            if round_no is not None:
                q = q.where(Approval.round_no == round_no)
            return [_row(ApprovalRow, r) for r in s.scalars(q.order_by(Approval.id))]

    def is_round_approved(self, study_id: str, round_no: int, *, version: int | None = None) -> bool:
        """May round `round_no` run? The latest explicit decision, else the policy's approval mode."""
        with self._read() as s:
            study = self._study(s, study_id, version)
            self._check_round_no(study, round_no)
            return self._approved(s, study, round_no)

    def _gate(self, study_id: str, version: int, round_no: int) -> Decision | None:
        """One poll of the approval gate: approve, reject, hold, or None (nobody decided yet)."""
        with self._read() as s:
            study = self._study(s, study_id, version)
            if study.status not in lifecycle.ACTIVE:
                raise PolicyError(f"study {study.id} v{study.version} is {study.status}; round {round_no} will not run")
            if self._approved(s, study, round_no):
                return "approve"
            latest = self._latest_approval(s, study, round_no)
            return None if latest is None else latest.decision  # type: ignore[return-value]

    def wait_for_approval(self, study_id: str, round_no: int, poll: float = 1.0, timeout: float | None = None, *,
                          version: int | None = None) -> Decision:
        """Block until round `round_no` is approved ("approve") or rejected ("reject").

        A hold keeps waiting. Polls with a sleep (each poll one short read), so the lead
        can decide from another process. Raises TimeoutError after `timeout` seconds and
        PolicyError if the study stops meanwhile.
        """
        if poll <= 0:
            raise ValueError("poll must be positive")
        version = self.request_approval(study_id, round_no, version=version).study_version
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            decision = self._gate(study_id, version, round_no)
            if decision in ("approve", "reject"):
                return decision
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                state = "on hold" if decision == "hold" else "waiting for approval"
                raise TimeoutError(f"round {round_no} of {study_id} v{version} is still {state} after {timeout} s")
            time.sleep(poll if left is None else min(poll, left))

    # ---- rounds ---------------------------------------------------------------------------------
    def record_round_start(self, study_id: str, round_no: int, asked: Sequence[str],
                           flower_run_id: int | str | None = None, *, version: int | None = None) -> RoundRow:
        """Mark a round running. Refused unless the study runs and the round is approved."""
        run_id = None if flower_run_id is None else as_u64(flower_run_id)
        with self._write() as s:
            study = self._study(s, study_id, version)
            label = f"{study.id} v{study.version}"
            if study.status != "running":
                raise PolicyError(f"study {label} is {study.status}; round {round_no} cannot start")
            self._check_round_no(study, round_no)
            rnd = self._round(s, study, round_no, create=True, lock=True)
            assert rnd is not None
            if rnd.status in ("running", "finished"):
                raise PolicyError(f"round {round_no} of {label} is already {rnd.status}")
            if not self._approved(s, study, round_no):
                raise PolicyError(f"round {round_no} of {label} is not approved ({rnd.status}); it cannot start")
            now = _now()
            rnd.status, rnd.asked, rnd.replied, rnd.refused = "running", [str(a) for a in asked], [], {}
            rnd.flower_run_id, rnd.started_at, rnd.finished_at, rnd.updated_at = run_id, now, None, now
            return _row(RoundRow, rnd)

    def record_round_finish(self, study_id: str, round_no: int, replied: Sequence[str], refused: Mapping[str, str],
                            *, failed: bool = False, version: int | None = None) -> RoundRow:
        """Close a running round: who replied, who refused and why ({silo: reason})."""
        both = set(map(str, replied)) & set(map(str, refused))
        if both:
            raise PolicyError(f"silos cannot both reply and refuse in one round: {', '.join(sorted(both))}")
        with self._write() as s:
            study = self._study(s, study_id, version)
            rnd = self._round(s, study, round_no, create=False, lock=True)
            if rnd is None or rnd.status != "running":
                state = "unknown" if rnd is None else rnd.status
                raise PolicyError(f"round {round_no} of {study.id} v{study.version} is {state}, not running")
            now = _now()
            rnd.replied, rnd.refused = [str(r) for r in replied], {str(k): str(v) for k, v in refused.items()}
            rnd.status, rnd.finished_at, rnd.updated_at = ("failed" if failed else "finished"), now, now
            return _row(RoundRow, rnd)

    def reopen_rounds_after(self, study_id: str, round_no: int, *, version: int | None = None) -> list[int]:
        """After a restart from the checkpoint of round `round_no`: later rounds that were
        running or even finished (but not checkpointed) are marked failed, so they run again
        under the same round number and approval. Returns their numbers."""
        with self._write() as s:
            study = self._study(s, study_id, version)
            q = (select(Round).where(Round.study_id == study.id, Round.study_version == study.version,
                                     Round.round_no > round_no, Round.status.in_(("running", "finished")))
                 .with_for_update())
            now, reopened = _now(), []
            for rnd in s.scalars(q.order_by(Round.round_no)):
                rnd.status, rnd.finished_at, rnd.updated_at = "failed", rnd.finished_at or now, now
                reopened.append(rnd.round_no)
            return reopened

    def get_round(self, study_id: str, round_no: int, *, version: int | None = None) -> RoundRow | None:
        with self._read() as s:
            rnd = self._round(s, self._study(s, study_id, version), round_no, create=False)
            return None if rnd is None else _row(RoundRow, rnd)

    def list_rounds(self, study_id: str, *, version: int | None = None) -> list[RoundRow]:
        with self._read() as s:
            study = self._study(s, study_id, version)
            q = select(Round).where(Round.study_id == study.id, Round.study_version == study.version)
            return [_row(RoundRow, r) for r in s.scalars(q.order_by(Round.round_no))]

    # ---- evaluations and privacy ---------------------------------------------------------------
    def record_evaluation(self, study_id: str, round_no: int, scope: str, metrics: Mapping[str, Any], *,
                          version: int | None = None) -> EvaluationRow:
        """Metrics of the model after `round_no` training rounds, "pooled" or one silo's (suppressed) report."""
        _text(scope, "evaluation scope")
        with self._write() as s:
            study = self._study(s, study_id, version)
            self._check_round_no(study, round_no)
            row = s.get(Evaluation, (study.id, study.version, round_no, scope))
            if row is None:
                row = Evaluation(study_id=study.id, study_version=study.version, round_no=round_no, scope=scope)
                s.add(row)
            row.metrics, row.created_at = plain_json(metrics), _now()
            s.flush()
            return _row(EvaluationRow, row)

    def list_evaluations(self, study_id: str, *, version: int | None = None) -> list[EvaluationRow]:
        with self._read() as s:
            study = self._study(s, study_id, version)
            q = select(Evaluation).where(Evaluation.study_id == study.id, Evaluation.study_version == study.version)
            return [_row(EvaluationRow, r) for r in s.scalars(q.order_by(Evaluation.round_no, Evaluation.scope))]

    def record_privacy_spend(self, study_id: str, silo: str, round_no: int, epsilon_spent_total: float,
                             epsilon_budget: float, rounds_left: int | None = None, *,
                             version: int | None = None) -> PrivacySpendRow:
        """A silo's reported cumulative epsilon after a round (its ledger is the authority)."""
        spent, budget = _epsilon(epsilon_spent_total, "epsilon_spent_total"), _epsilon(epsilon_budget, "epsilon_budget")
        with self._write() as s:
            study = self._study(s, study_id, version)
            self._check_round_no(study, round_no)
            if s.get(Silo, silo) is None:
                self._new_silo(s, _text(silo, "silo name"))
            row = s.get(PrivacySpend, (study.id, study.version, silo, round_no))
            if row is None:
                row = PrivacySpend(study_id=study.id, study_version=study.version, silo=silo, round_no=round_no)
                s.add(row)
            row.epsilon_spent_total, row.epsilon_budget, row.rounds_left, row.recorded_at = spent, budget, rounds_left, _now()
            s.flush()
            return _row(PrivacySpendRow, row)

    def list_privacy_spend(self, study_id: str, *, version: int | None = None) -> list[PrivacySpendRow]:
        with self._read() as s:
            study = self._study(s, study_id, version)
            q = select(PrivacySpend).where(PrivacySpend.study_id == study.id, PrivacySpend.study_version == study.version)
            return [_row(PrivacySpendRow, r) for r in s.scalars(q.order_by(PrivacySpend.silo, PrivacySpend.round_no))]

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, study_id: str, round_no: int, encrypted_state: bytes, silos_in: Sequence[str], *,
                        version: int | None = None) -> CheckpointRow:
        """Keep what a new run needs to resume after round `round_no`: sums only, never a secret key."""
        if not isinstance(encrypted_state, (bytes, bytearray, memoryview)):
            raise PolicyError("a checkpoint's state must be bytes (serialised aggregate ciphertexts)")
        with self._write() as s:
            study = self._study(s, study_id, version)
            self._check_round_no(study, round_no)
            row = s.get(Checkpoint, (study.id, study.version, round_no))
            if row is None:
                row = Checkpoint(study_id=study.id, study_version=study.version, round_no=round_no)
                s.add(row)
            row.encrypted_state, row.silos_in, row.created_at = bytes(encrypted_state), [str(x) for x in silos_in], _now()
            s.flush()
            return _row(CheckpointRow, row)

    def load_last_checkpoint(self, study_id: str, *, version: int | None = None) -> CheckpointRow | None:
        with self._read() as s:
            study = self._study(s, study_id, version)
            q = (select(Checkpoint).where(Checkpoint.study_id == study.id, Checkpoint.study_version == study.version)
                 .order_by(Checkpoint.round_no.desc()).limit(1))
            row = s.scalars(q).first()
            return None if row is None else _row(CheckpointRow, row)

    # ---- model release ------------------------------------------------------------------------
    def request_release(self, study_id: str, user: str, *, version: int | None = None,
                        allow_running: bool = False) -> ModelReleaseRow:
        """The lead asks for the final model: a completed study (or, with `allow_running`, a
        running one, delivered when its run ends); not while a request is pending or once
        released; after a failed attempt a new request replaces it."""
        _text(user, "user name")
        with self._write() as s:
            study = self._study(s, study_id, version, lock=True)
            label = f"{study.id} v{study.version}"
            if study.status != "completed" and not (allow_running and study.status == "running"):
                raise PolicyError(f"study {label} is {study.status}: a model is released only after the last round "
                                  "of a completed study")
            row = s.get(ModelRelease, (study.id, study.version))
            if row is not None and row.status in ("requested", "released"):
                raise PolicyError(f"study {label}: the model release is already {row.status} "
                                  f"(by {row.requested_by}); nothing changed")
            if row is None:
                row = ModelRelease(study_id=study.id, study_version=study.version)
                s.add(row)
            row.status, row.requested_by, row.requested_at, row.finished_at = "requested", user, _now(), None
            row.reason, row.consents, row.model_sha256, row.model_card, row.weights = "", {}, None, None, None
            s.flush()
            return _row(ModelReleaseRow, row)

    def finish_release(self, study_id: str, status: ReleaseStatus, consents: Mapping[str, str], reason: str = "", *,
                       weights: bytes | None = None, model_card: Mapping[str, Any] | None = None,
                       version: int | None = None) -> ModelReleaseRow:
        """Record the outcome of a pending request: the model and card only when released."""
        _choice(status, ReleaseStatus, "release outcome")
        if status == "requested":
            raise PolicyError("a release ends as released or failed")
        if (status == "released") != (weights is not None and model_card is not None):
            raise PolicyError("a released model needs its weights and card; a failed release stores neither")
        with self._write() as s:
            study = self._study(s, study_id, version, lock=True)
            row = s.get(ModelRelease, (study.id, study.version))
            if row is None or row.status != "requested":
                raise PolicyError(f"study {study.id} v{study.version}: no pending release request to finish")
            row.status, row.finished_at, row.reason, row.consents = status, _now(), reason[:2000], plain_json(dict(consents))
            if weights is not None and model_card is not None:
                row.weights, row.model_card = bytes(weights), plain_json(dict(model_card))
                row.model_sha256 = hashlib.sha256(row.weights).hexdigest()
            s.flush()
            return _row(ModelReleaseRow, row)

    def get_release(self, study_id: str, *, version: int | None = None) -> ModelReleaseRow | None:
        with self._read() as s:
            study = self._study(s, study_id, version)
            row = s.get(ModelRelease, (study.id, study.version))
            return None if row is None else _row(ModelReleaseRow, row)

    # ---- users (hashing is the caller's job; this only stores the hash string) ------------------
    def add_user(self, name: str, role: str, password_hash: str) -> UserRow:
        _text(name, "user name")
        _choice(role, Role, "role")
        _text(password_hash, "password hash")
        with self._write() as s:
            if s.get(User, name) is not None:
                raise PolicyError(f"user {name} already exists")
            row = User(name=name, role=role, password_hash=password_hash, failed_attempts=0, locked_until=None,
                       created_at=_now())
            s.add(row)
            s.flush()
            return _row(UserRow, row)

    def get_user(self, name: str) -> UserRow | None:
        with self._read() as s:
            row = s.get(User, name)
            return None if row is None else _row(UserRow, row)

    def list_users(self) -> list[UserRow]:
        with self._read() as s:
            return [_row(UserRow, r) for r in s.scalars(select(User).order_by(User.name))]

    def set_password_hash(self, name: str, password_hash: str) -> UserRow:
        _text(password_hash, "password hash")
        with self._write() as s:
            row = self._user(s, name)
            row.password_hash = password_hash
            return _row(UserRow, row)

    def note_login_failure(self, name: str, *, max_attempts: int = 5,
                           lock_for: timedelta = timedelta(minutes=15)) -> UserRow | None:
        """Count a failed login atomically; lock the account for `lock_for` at `max_attempts`."""
        with self._write() as s:
            row = s.get(User, name, with_for_update=True)
            if row is None:
                return None
            row.failed_attempts += 1
            if row.failed_attempts >= max_attempts:
                row.failed_attempts, row.locked_until = 0, _now() + lock_for
            return _row(UserRow, row)

    def note_login_success(self, name: str) -> UserRow:
        with self._write() as s:
            row = self._user(s, name)
            row.failed_attempts, row.locked_until = 0, None
            return _row(UserRow, row)

    def _user(self, s: Session, name: str) -> User:
        row = s.get(User, name, with_for_update=True)
        if row is None:
            raise PolicyError(f"no user {name}")
        return row

    # ---- audit mirror ------------------------------------------------------------------------------
    def append_audit_mirror(self, entry: Mapping[str, Any], party: str = "coordinator") -> AuditRow:
        """Mirror one audit entry of `party`'s chain, so the UI can show and export it.

        Entries must arrive in order and chain (seq + 1, prev_hash = last hash); sending
        the same entry again is a no-op, a different entry under a used seq is refused.
        """
        seq, digest, prev = _audit_fields(entry)
        _text(party, "audit party")
        with self._write() as s:
            same = s.get(AuditEntry, (party, seq))
            if same is not None:
                if same.hash != digest:
                    raise PolicyError(f"audit {party}: entry {seq} is already mirrored with hash {same.hash[:12]}; "
                                      f"refusing a different one ({digest[:12]})")
                return _row(AuditRow, same)
            last = s.scalars(select(AuditEntry).where(AuditEntry.party == party)
                             .order_by(AuditEntry.seq.desc()).limit(1)).first()
            if last is not None and (seq != last.seq + 1 or prev != last.hash):
                raise PolicyError(f"audit {party}: entry {seq} does not follow entry {last.seq} "
                                  f"(expected seq {last.seq + 1} with prev_hash {last.hash[:12]})")
            row = AuditEntry(party=party, seq=seq, hash=digest, prev_hash=prev, action=str(entry.get("action", "")),
                             actor=str(entry.get("actor", "")), entry=plain_json(entry), mirrored_at=_now())
            s.add(row)
            s.flush()
            return _row(AuditRow, row)

    def audit_mirror(self, party: str = "coordinator", after_seq: int | None = None) -> list[AuditRow]:
        with self._read() as s:
            q = select(AuditEntry).where(AuditEntry.party == party)
            if after_seq is not None:
                q = q.where(AuditEntry.seq > after_seq)
            return [_row(AuditRow, r) for r in s.scalars(q.order_by(AuditEntry.seq))]

    def audit_head(self, party: str = "coordinator") -> AuditRow | None:
        with self._read() as s:
            row = s.scalars(select(AuditEntry).where(AuditEntry.party == party)
                            .order_by(AuditEntry.seq.desc()).limit(1)).first()
            return None if row is None else _row(AuditRow, row)


def _same_apart_from_version(a: StudySpec, b: StudySpec) -> bool:
    return a.model_dump(mode="json", exclude={"version"}) == b.model_dump(mode="json", exclude={"version"})


def _epsilon(value: float, what: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise PolicyError(f"{what} must be a finite number >= 0, not {value}")
    return number


def _audit_fields(entry: Mapping[str, Any]) -> tuple[int, str, str]:
    missing = [k for k in ("seq", "hash", "prev_hash") if k not in entry]
    if missing:
        raise PolicyError(f"audit entry lacks {', '.join(missing)}")
    seq = entry["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise PolicyError(f"audit entry seq must be an integer >= 0, not {seq!r}")
    return seq, str(entry["hash"]), str(entry["prev_hash"])


__all__ = [
    "TABLES", "VERSION_TABLE", "ApprovalRow", "AuditRow", "CheckpointRow", "Decision", "EnrolmentRow",
    "EvaluationRow", "PrivacySpendRow", "RoundRow", "SiloRow", "Store", "StudyRow", "UserRow", "alembic_config",
    "as_u64", "make_engine", "migrate", "needs_manual_approval", "open_store", "plain_json",
]
