"""Workers report through the control plane: attempt tokens, idempotent reports, event details.

- attempts.token_hash: the sha256 of the attempt's worker token (unique);
- worker_requests: keys of reports already applied, so a retried one is not applied twice;
- job_events.details: structured facts about a move (who acted, pid, node, resume step);
- uq_metrics_live: at most one live value per (job, attempt, step, name);
- uq_checkpoints_path: one row per checkpoint location.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("token_hash", sa.String(64), nullable=True))
        batch.create_unique_constraint("uq_attempts_token_hash", ["token_hash"])
    op.create_table(
        "worker_requests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("attempt_id", sa.Integer(), sa.ForeignKey("attempts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("attempt_id", "key", name="uq_worker_requests_key"),
    )
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("details", sa.JSON(), nullable=True))

    # Rows written before these constraints may break them: one run used to record "epoch"
    # several times at a step, and a path could be registered again by a later attempt.
    # Keep the newest of each (the one reads already preferred) and mark or drop the rest.
    op.execute(
        "UPDATE metrics SET superseded = true WHERE NOT superseded AND id NOT IN ("
        " SELECT max(id) FROM metrics WHERE NOT superseded"
        " GROUP BY job_id, attempt, step, name)")
    op.create_index("uq_metrics_live", "metrics", ["job_id", "attempt", "step", "name"],
                    unique=True, sqlite_where=sa.text("NOT superseded"),
                    postgresql_where=sa.text("NOT superseded"))
    op.execute(
        "DELETE FROM checkpoints WHERE id NOT IN ("
        " SELECT max(id) FROM checkpoints GROUP BY job_id, path)")
    with op.batch_alter_table("checkpoints") as batch:
        batch.create_unique_constraint("uq_checkpoints_path", ["job_id", "path"])


def downgrade() -> None:
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint("uq_checkpoints_path", type_="unique")
    op.drop_index("uq_metrics_live", table_name="metrics")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("details")
    op.drop_table("worker_requests")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_constraint("uq_attempts_token_hash", type_="unique")
        batch.drop_column("token_hash")
