"""The database engine: SQLite or PostgreSQL, configured for orch's concurrency model, and
the schema upgrade (Alembic migrations) that every Store runs on open."""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url

MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
_MIGRATION_LOCK_KEY = 0x6F726368  # pg_advisory lock id: "orch" in ASCII
_SQLITE_BUSY_TIMEOUT_S = 30
READ_ONLY = "orch_read_only"  # execution option: SQLite read transactions begin DEFERRED
# Alembic's `context` is process-global, so one upgrade at a time per process.
_upgrade_lock = threading.Lock()


def make_engine(url: str) -> Engine:
    """An engine configured for orch's concurrency model on SQLite or PostgreSQL."""
    u = make_url(url)
    if u.drivername == "postgresql":  # psycopg 3 is the driver orch ships with
        u = u.set(drivername="postgresql+psycopg")
    # NaN/Infinity are not JSON; PostgreSQL would reject them, so refuse them everywhere.
    json_serializer = functools.partial(json.dumps, allow_nan=False)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True, json_serializer=json_serializer)
    if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        u, json_serializer=json_serializer, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S}
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module so that _sqlite_on_begin
    # decides how each transaction starts (SQLAlchemy's documented pysqlite recipe).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock other processes may hold.
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys = ON")
        _enable_wal(cursor)
    finally:
        cursor.close()


def _enable_wal(cursor: Any) -> None:
    # WAL: readers never block the writer and the writer never blocks readers. The mode
    # is persistent in the file, so this only does work on a brand-new database, but
    # there the switch fails at once with "database is locked" (SQLite does not call
    # the busy handler for it) while another process is switching too: retry.
    deadline = time.monotonic() + _SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_on_begin(conn: Connection) -> None:
    # A deferred transaction that reads and then writes must upgrade its lock, and that
    # upgrade fails at once with "database is locked" under contention (waiting could
    # deadlock). BEGIN IMMEDIATE takes the write lock up front, so concurrent writers
    # queue on busy_timeout instead. Pure reads stay deferred and never wait in WAL mode.
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migration_lock(conn: Connection) -> None:
    """Serialise schema upgrades across processes until `conn`'s transaction ends."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    # SQLite: the transaction began with BEGIN IMMEDIATE and so already holds the
    # database's single write lock; other processes wait on busy_timeout.


def upgrade_schema(engine: Engine) -> None:
    """`alembic upgrade head`, in one transaction holding the migration lock."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with _upgrade_lock, engine.begin() as conn:
        migration_lock(conn)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
