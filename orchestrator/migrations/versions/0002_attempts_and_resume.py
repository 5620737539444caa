"""Attempts (one row per try, with its cause) and resume lineage on jobs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tstz = sa.DateTime(timezone=True)
    # Batch mode: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("parent_job_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("resume_from", sa.String(), nullable=True))
        batch.create_foreign_key("fk_jobs_parent_job_id", "jobs", ["parent_job_id"], ["id"],
                                 ondelete="SET NULL")
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("ray_submission_id", sa.String(), nullable=False),
        sa.Column("started_at", tstz, nullable=False),
        sa.Column("ended_at", tstz, nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("cause", sa.Text(), nullable=True),
        sa.UniqueConstraint("job_id", "attempt", name="uq_attempts_job_attempt"),
    )


def downgrade() -> None:
    op.drop_table("attempts")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_parent_job_id", type_="foreignkey")
        batch.drop_column("resume_from")
        batch.drop_column("parent_job_id")
