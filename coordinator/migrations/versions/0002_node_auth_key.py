"""Silos: the public key each silo's SuperNode authenticates with.

Registering a silo (`coordinator certs register`) records its name, this key (one
OpenSSH line, as registered with the SuperLink) and the Flower node id the SuperLink
gave it, which already has a column. Additive and nullable: silos of stores made
before node authentication keep working until they are registered.

Revision ID: 0002_node_auth_key
Revises: 0001_initial
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_node_auth_key"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("silos") as batch:
        batch.add_column(sa.Column("node_auth_key", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("silos") as batch:
        batch.drop_column("node_auth_key")
