"""Revocation: a silo's revocation, and enrolments that ended because of it.

`coordinator silo revoke` unregisters a silo's SuperNode key from the SuperLink and
records here when and why (`silos.revoked_at`, `silos.revoked_reason`); its enrolments in
studies still running become `revoked`. A revoked silo's row stays (its history, node id
and keys are what audits refer to). Additive: nullable columns, and one more allowed
enrolment status.

Revision ID: 0004_revocation
Revises: 0003_model_release
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_revocation"
down_revision: str | None = "0003_model_release"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = ("pending", "validated", "failed", "withdrawn")
AFTER = (*BEFORE, "revoked")


def _status_check(batch: object, choices: tuple[str, ...]) -> None:
    listed = ", ".join(f"'{c}'" for c in choices)
    batch.drop_constraint(op.f("ck_enrolments_status"), type_="check")
    batch.create_check_constraint(op.f("ck_enrolments_status"), f"status IN ({listed})")


def upgrade() -> None:
    with op.batch_alter_table("silos") as batch:
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revoked_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("enrolments") as batch:
        _status_check(batch, AFTER)


def downgrade() -> None:
    op.execute("UPDATE enrolments SET status = 'withdrawn' WHERE status = 'revoked'")
    with op.batch_alter_table("enrolments") as batch:
        _status_check(batch, BEFORE)
    with op.batch_alter_table("silos") as batch:
        batch.drop_column("revoked_reason")
        batch.drop_column("revoked_at")
