"""Model releases: the lead's request, the silos' consents, and the released model and card.

One row per study version (its latest attempt). The weights are the safetensors file
the consenting silos sent (rounded there); the card is JSON. Additive: older stores gain
an empty table.

Revision ID: 0003_model_release
Revises: 0002_node_auth_key
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_model_release"
down_revision: str | None = "0002_node_auth_key"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RELEASE_STATUSES = ("requested", "released", "failed")


def upgrade() -> None:
    op.create_table(
        "model_releases",
        sa.Column("study_id", sa.String(length=63), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requested_by", sa.Text(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("consents", sa.JSON(), nullable=False),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("model_card", sa.JSON(), nullable=True),
        sa.Column("weights", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint("status IN ('requested', 'released', 'failed')", name=op.f("ck_model_releases_status")),
        sa.ForeignKeyConstraint(["study_id", "study_version"], ["studies.id", "studies.version"],
                                name=op.f("fk_model_releases_study_id_studies"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_id", "study_version", name=op.f("pk_model_releases")),
    )


def downgrade() -> None:
    op.drop_table("model_releases")
