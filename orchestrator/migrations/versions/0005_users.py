"""Users of a team server, their API tokens, and the audit trail of changes to them.

- users: name (unique), role (admin | user), per-user gpu_cap and max_priority (null: the
  server's defaults), created_at, disabled_at;
- user_tokens: several per user, each with a name (unique among the user's live tokens),
  the token's sha256 (unique; the token itself is never stored), created_at, expires_at,
  revoked_at;
- audit_events: who created, disabled, issued or revoked what, and when.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    tstz = sa.DateTime(timezone=True)
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("gpu_cap", sa.Integer(), nullable=True),
        sa.Column("max_priority", sa.Integer(), nullable=True),
        sa.Column("created_at", tstz, nullable=False),
        sa.Column("disabled_at", tstz, nullable=True),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "user_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", tstz, nullable=False),
        sa.Column("expires_at", tstz, nullable=True),
        sa.Column("revoked_at", tstz, nullable=True),
        sa.UniqueConstraint("token_hash", name="uq_user_tokens_hash"),
    )
    op.create_index("ix_user_tokens_user_id", "user_tokens", ["user_id"])
    op.create_index("uq_user_tokens_live_name", "user_tokens", ["user_id", "name"], unique=True,
                    sqlite_where=sa.text("revoked_at IS NULL"),
                    postgresql_where=sa.text("revoked_at IS NULL"))
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", tstz, nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_index("uq_user_tokens_live_name", table_name="user_tokens")
    op.drop_index("ix_user_tokens_user_id", table_name="user_tokens")
    op.drop_table("user_tokens")
    op.drop_table("users")
