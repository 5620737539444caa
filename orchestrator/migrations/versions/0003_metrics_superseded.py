"""Metrics rolled back by a resume are marked superseded instead of counted twice.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NOT NULL needs a value for the rows already there: the server default makes them
    # live, which they are (nothing was superseded before this column existed).
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("superseded", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    # Batch mode: SQLite rebuilds the table where it cannot drop a column in place.
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("superseded")
