"""Store fixtures: every store test runs against SQLite and PostgreSQL.

`db_url` is a fresh, empty (unmigrated) database; `store` is a `Store` on it. PostgreSQL
isolation: each test gets a schema of its own (tests.support.postgres_schema).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.support import postgres_schema, require_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, empty database on each backend (no tables yet)."""
    # Keep artifact dirs and any default-path database out of the real ~/.orch.
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "orch_home"))
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/db/orch.db"
        return
    require_postgres()
    with postgres_schema(f"orch_test_{os.getpid()}") as url:
        yield url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()
