"""Initial coordinator store: studies, silos, enrolments, rounds, approvals, evaluations,
privacy spend, users, audit mirror, checkpoints.

Plain SQLAlchemy types only (no imports from the application), so this revision keeps
meaning the same schema whatever the models become. Flower run and node ids are TEXT
(unsigned 64-bit); timestamps are timezone-aware and written in UTC.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STUDY_STATUSES = ("draft", "open", "running", "completed", "stopped")
ENROLMENT_STATUSES = ("pending", "validated", "failed", "withdrawn")
KEY_CEREMONY = ("not_started", "in_progress", "done", "failed")
ROUND_STATUSES = ("waiting_approval", "approved", "held", "rejected", "running", "finished", "failed")
DECISIONS = ("approve", "hold", "reject")
ROLES = ("lead", "auditor", "admin")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _one_of(column: str, table: str, choices: tuple[str, ...]) -> sa.CheckConstraint:
    listed = ", ".join(f"'{c}'" for c in choices)
    return sa.CheckConstraint(f"{column} IN ({listed})", name=op.f(f"ck_{table}_{column}"))


def _study_columns() -> list[sa.Column]:
    return [
        sa.Column("study_id", sa.String(length=63), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
    ]


def _study_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["study_id", "study_version"], ["studies.id", "studies.version"],
        name=op.f(f"fk_{table}_study_id_studies"), ondelete="CASCADE",
    )


def _silo_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["silo"], ["silos.name"], name=op.f(f"fk_{table}_silo_silos"), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.String(length=63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("policy_yaml", sa.Text(), nullable=False),
        sa.Column("policy_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _one_of("status", "studies", STUDY_STATUSES),
        sa.PrimaryKeyConstraint("id", "version", name=op.f("pk_studies")),
    )
    op.create_index(op.f("ix_studies_policy_hash"), "studies", ["policy_hash"], unique=False)

    op.create_table(
        "silos",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_fingerprint", sa.String(length=200), nullable=True),
        sa.Column("flower_node_id", sa.Text(), nullable=True),
        sa.Column("online", sa.Boolean(), nullable=False),
        _ts("last_seen", nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_silos")),
    )

    op.create_table(
        "enrolments",
        *_study_columns(),
        sa.Column("silo", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("validation_report", sa.JSON(), nullable=True),
        sa.Column("key_ceremony", sa.String(length=16), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _one_of("key_ceremony", "enrolments", KEY_CEREMONY),
        _one_of("status", "enrolments", ENROLMENT_STATUSES),
        _silo_fk("enrolments"),
        _study_fk("enrolments"),
        sa.PrimaryKeyConstraint("study_id", "study_version", "silo", name=op.f("pk_enrolments")),
    )

    op.create_table(
        "rounds",
        *_study_columns(),
        sa.Column("round_no", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("asked", sa.JSON(), nullable=False),
        sa.Column("replied", sa.JSON(), nullable=False),
        sa.Column("refused", sa.JSON(), nullable=False),
        sa.Column("flower_run_id", sa.Text(), nullable=True),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        _ts("updated_at"),
        _one_of("status", "rounds", ROUND_STATUSES),
        _study_fk("rounds"),
        sa.PrimaryKeyConstraint("study_id", "study_version", "round_no", name=op.f("pk_rounds")),
    )

    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        *_study_columns(),
        sa.Column("round_no", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=8), nullable=False),
        sa.Column("user_name", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("policy_hash", sa.String(length=64), nullable=False),
        _ts("at"),
        _one_of("decision", "approvals", DECISIONS),
        sa.ForeignKeyConstraint(
            ["study_id", "study_version", "round_no"], ["rounds.study_id", "rounds.study_version", "rounds.round_no"],
            name=op.f("fk_approvals_study_id_rounds"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_approvals")),
    )

    op.create_table(
        "evaluations",
        *_study_columns(),
        sa.Column("round_no", sa.Integer(), nullable=False),
        sa.Column("scope", sa.String(length=200), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _ts("created_at"),
        _study_fk("evaluations"),
        sa.PrimaryKeyConstraint("study_id", "study_version", "round_no", "scope", name=op.f("pk_evaluations")),
    )

    op.create_table(
        "privacy_spend",
        *_study_columns(),
        sa.Column("silo", sa.String(length=200), nullable=False),
        sa.Column("round_no", sa.Integer(), nullable=False),
        sa.Column("epsilon_spent_total", sa.Float(), nullable=False),
        sa.Column("epsilon_budget", sa.Float(), nullable=False),
        sa.Column("rounds_left", sa.Integer(), nullable=True),
        _ts("recorded_at"),
        _silo_fk("privacy_spend"),
        _study_fk("privacy_spend"),
        sa.PrimaryKeyConstraint("study_id", "study_version", "silo", "round_no", name=op.f("pk_privacy_spend")),
    )

    op.create_table(
        "users",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("failed_attempts", sa.Integer(), nullable=False),
        _ts("locked_until", nullable=True),
        _ts("created_at"),
        _one_of("role", "users", ROLES),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_users")),
    )

    op.create_table(
        "audit_entries",
        sa.Column("party", sa.String(length=200), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=128), nullable=False),
        sa.Column("prev_hash", sa.String(length=128), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("entry", sa.JSON(), nullable=False),
        _ts("mirrored_at"),
        sa.PrimaryKeyConstraint("party", "seq", name=op.f("pk_audit_entries")),
    )

    op.create_table(
        "checkpoints",
        *_study_columns(),
        sa.Column("round_no", sa.Integer(), nullable=False),
        sa.Column("encrypted_state", sa.LargeBinary(), nullable=False),
        sa.Column("silos_in", sa.JSON(), nullable=False),
        _ts("created_at"),
        _study_fk("checkpoints"),
        sa.PrimaryKeyConstraint("study_id", "study_version", "round_no", name=op.f("pk_checkpoints")),
    )


def downgrade() -> None:
    for table in ("checkpoints", "audit_entries", "users", "privacy_spend", "evaluations", "approvals",
                  "rounds", "enrolments", "silos"):
        op.drop_table(table)
    op.drop_index(op.f("ix_studies_policy_hash"), table_name="studies")
    op.drop_table("studies")
