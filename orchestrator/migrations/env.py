"""Alembic environment for orch.

`Store` runs migrations programmatically and passes its own connection, already
inside a transaction that holds the migration lock, via `config.attributes`.
The alembic CLI path builds the same engine (SQLite pragmas, BEGIN IMMEDIATE) and
takes the same lock, so both paths are safe against concurrent upgrades.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import orchestrator.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from orchestrator.settings import get_settings

config = context.config
target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from orchestrator.store import make_engine, migration_lock

    engine = make_engine(config.get_main_option("sqlalchemy.url") or get_settings().database())
    try:
        with engine.begin() as conn:
            migration_lock(conn)
            _run(conn)
    finally:
        engine.dispose()


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or get_settings().database(),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
