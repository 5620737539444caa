"""What every part of the Store shares: the engine, one transaction per public method,
and the checks that refuse bad input before the database is touched."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.models import Job, WorkerRequest, utcnow
from orchestrator.settings import get_settings
from orchestrator.store.engine import READ_ONLY, make_engine, upgrade_schema

log = logging.getLogger("orch.store")


class StoreBase:
    """The engine and the two kinds of transaction. Each public Store method is one
    transaction, so bad input or a lost race changes nothing."""

    def __init__(self, url: str | None = None) -> None:
        self.url: str = url or get_settings().database()
        self.engine: Engine = make_engine(self.url)
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        self._read = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}),
                                  expire_on_commit=False)
        # Told the ids of jobs whose state this Store moved, after the commit (the server's
        # JobWatch: waiting status requests answer at once).
        self._state_listeners: list[Callable[[Sequence[int]], None]] = []
        try:
            upgrade_schema(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def on_state_change(self, listener: Callable[[Sequence[int]], None]) -> None:
        """Call `listener(job_ids)` after each committed change of those jobs' states."""
        self._state_listeners.append(listener)

    def _announce(self, job_ids: Sequence[int]) -> None:
        for listener in self._state_listeners:
            try:
                listener(job_ids)
            except Exception:  # the move is committed; a listener's bug must not undo it
                log.exception("a state-change listener failed")

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """One write transaction: commit on success, roll back on any exception."""
        with self._write.begin() as session:
            yield session

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _insert(self, table: Any) -> Any:
        """An INSERT that can say ON CONFLICT DO NOTHING on either backend."""
        return (postgresql.insert(table) if self.dialect == "postgresql"
                else sqlite.insert(table))

    @staticmethod
    def _lock_job(session: Session, job_id: int) -> None:
        """Row-lock the job so concurrent writers for it serialise (SQLite's BEGIN
        IMMEDIATE serialises anyway); NotFound when there is no such job."""
        found = session.execute(
            select(col(Job.id)).where(col(Job.id) == job_id).with_for_update()
        ).scalar_one_or_none()
        if found is None:
            raise NotFound(f"job {job_id} not found")

    def _first_time(self, session: Session, attempt_id: int | None, key: str | None) -> bool:
        """Record a worker report's key; False when it was recorded before (a retry of a
        report already applied, whose answer was lost). No key: always the first time."""
        if attempt_id is None or key is None:
            return True
        if not 1 <= len(key) <= 64:
            raise InvalidRequest("request key: 1 to 64 characters")
        stmt = self._insert(WorkerRequest).values(attempt_id=attempt_id, key=key, at=utcnow())
        done = session.execute(stmt.on_conflict_do_nothing().returning(col(WorkerRequest.id)))
        return done.scalar_one_or_none() is not None


def check_aware(name: str, value: Any) -> None:
    if isinstance(value, datetime) and value.utcoffset() is None:
        raise InvalidRequest(f"{name} must be a timezone-aware datetime, got {value!r}")


def check_json(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{name} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{name} is not JSON-serialisable: {exc}") from exc
