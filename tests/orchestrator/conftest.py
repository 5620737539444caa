"""Store fixtures: every store test runs against SQLite and PostgreSQL.

`db_url` is a fresh, empty (unmigrated) database; `store` is a `Store` on it.
PostgreSQL isolation: each test gets its own schema (`orch_test_<pid>`, dropped and
recreated around the test) selected through `search_path` in the URL, so tests in
parallel processes, and other users of the `test` database, never see each other.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

# --import-mode=importlib does not put the repository root on sys.path; make a plain
# checkout work without `pip install -e .`.
REPO_ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("orchestrator") is None:
    sys.path.insert(0, str(REPO_ROOT))

import psycopg  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from orchestrator.store import Store  # noqa: E402

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _libpq_dsn(url: str) -> str:
    """The psycopg DSN for a SQLAlchemy URL (drops the +driver part)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@cache
def _pg_unreachable_reason() -> str | None:
    url = os.environ.get("ORCH_TEST_POSTGRES_URL", DEFAULT_PG_URL)
    try:
        psycopg.connect(_libpq_dsn(url), connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL at {url} unreachable: {exc}"
    return None


def _pg_fresh_schema_url() -> Iterator[str]:
    """Yield a URL whose connections use a brand-new schema; drop it afterwards."""
    reason = _pg_unreachable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (a skipped PostgreSQL test in CI is a failure)")
        pytest.skip(reason)
    base = os.environ.get("ORCH_TEST_POSTGRES_URL", DEFAULT_PG_URL)
    schema = f"orch_test_{os.getpid()}"
    drop = f"DROP SCHEMA IF EXISTS {schema} CASCADE"
    with psycopg.connect(_libpq_dsn(base), autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(f"CREATE SCHEMA {schema}")
    url = make_url(base)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    # Unqualified names (the orch tables, alembic_version) resolve in this schema only.
    url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with psycopg.connect(_libpq_dsn(base), autocommit=True) as conn:
        conn.execute(drop)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty database on each backend (no tables yet)."""
    # Keep artifact dirs and any default-path database out of the real ~/.orch.
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "orch_home"))
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/db/orch.db"
    else:
        yield from _pg_fresh_schema_url()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()
