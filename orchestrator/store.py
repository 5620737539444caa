"""The job store: orch's durable source of truth (SQLite or PostgreSQL).

Every state change is a guarded compare-and-set recorded as a JobEvent in the same
transaction. Writes validate their input before touching the database, and each
public method is one transaction, so bad input or a lost race changes nothing.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, func, insert, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlmodel import col

from orchestrator.config import database_url, orch_home
from orchestrator.models import Attempt, Checkpoint, Job, JobEvent, Metric, utcnow
from orchestrator.states import ACTIVE_STATES, JobState, can_transition

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
_MIGRATION_LOCK_KEY = 0x6F726368  # pg_advisory lock id: "orch" in ASCII
_SQLITE_BUSY_TIMEOUT_S = 30
_READ_ONLY = "orch_read_only"  # execution option: SQLite read transactions begin DEFERRED
_METRIC_CHUNK = 1000  # rows per INSERT; stays far below SQLite's bound-parameter limit
_CHECKPOINT_KINDS = ("checkpoint", "final")
_TRANSITION_FIELDS = frozenset({"ray_submission_id", "error", "attempts", "started_at"})
# Managed by the store itself; everything else on a job is bookkeeping update_job may set.
_MANAGED_FIELDS = frozenset({"id", "state", "created_at", "updated_at"})
# Alembic's `context` is process-global, so one upgrade at a time per process.
_upgrade_lock = threading.Lock()


class InvalidTransition(Exception):
    """The state machine forbids the requested move (a programming error)."""


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
    if conn.get_execution_options().get(_READ_ONLY):
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


def _check_aware(name: str, value: Any) -> None:
    if isinstance(value, datetime) and value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")


def _check_json(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not JSON-serialisable: {exc}") from exc


class Store:
    """All of orch's reads and writes of jobs, events, metrics and checkpoints."""

    def __init__(self, url: str | None = None) -> None:
        self.url: str = url or database_url()
        self.engine: Engine = make_engine(self.url)
        self._write = sessionmaker(self.engine, expire_on_commit=False)
        self._read = sessionmaker(self.engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False)
        try:
            upgrade_schema(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """One write transaction: commit on success, roll back on any exception."""
        with self._write.begin() as session:
            yield session

    # -- jobs -------------------------------------------------------------------------

    def create_job(
        self,
        *,
        name: str,
        objective: str,
        owner: str,
        spec: dict,
        spec_yaml: str,
        gpus: int,
        cpus: int,
        priority: int = 0,
        max_attempts: int = 1,
        artifact_root: Path | None = None,
        parent_job_id: int | None = None,
        resume_from: str | None = None,
        reason: str | None = None,
    ) -> Job:
        for label, value in (("name", name), ("objective", objective), ("owner", owner)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{label} must be a non-empty string")
        _check_json("spec", spec)
        if gpus < 0 or cpus < 0:
            raise ValueError(f"gpus and cpus must be >= 0, got gpus={gpus} cpus={cpus}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        root = (Path(artifact_root) if artifact_root else orch_home() / "jobs").absolute()
        now = utcnow()
        job = Job(
            name=name,
            objective=objective,
            owner=owner,
            state=JobState.QUEUED.value,
            priority=int(priority),
            spec=spec,
            spec_yaml=spec_yaml,
            gpus=int(gpus),
            cpus=int(cpus),
            max_attempts=int(max_attempts),
            parent_job_id=parent_job_id,
            resume_from=resume_from,
            artifact_dir="",  # needs the id; set after the INSERT, same transaction
            created_at=now,
            updated_at=now,
        )
        with self._writing() as session:
            session.add(job)
            session.flush()
            assert job.id is not None
            job.artifact_dir = str(root / str(job.id))
            session.add(
                JobEvent(
                    job_id=job.id,
                    from_state=None,
                    to_state=JobState.QUEUED.value,
                    reason=reason or f"submitted by {owner}",
                    at=now,
                )
            )
        return job

    def get_job(self, job_id: int) -> Job | None:
        with self._read() as session:
            return session.get(Job, job_id)

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] | None = None,
        owner: str | None = None,
        limit: int | None = None,
    ) -> list[Job]:
        """Newest first."""
        query = select(Job).order_by(col(Job.id).desc())
        if states is not None:
            query = query.where(col(Job.state).in_([JobState(s).value for s in states]))
        if owner is not None:
            query = query.where(col(Job.owner) == owner)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def queued_jobs(self) -> list[Job]:
        """The queue in scheduling order: priority high to low, then first come first."""
        query = (
            select(Job)
            .where(col(Job.state) == JobState.QUEUED.value)
            .order_by(col(Job.priority).desc(), col(Job.id).asc())
        )
        with self._read() as session:
            return list(session.scalars(query))

    def transition(
        self,
        job_id: int,
        target: JobState,
        reason: str,
        *,
        expected: Iterable[JobState] | None = None,
        attempt_started: str | None = None,
        attempt_ended: tuple[str, str | None] | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job to `target` if the state machine allows it; True when it moved.

        Returns False, changing nothing, when the job is missing or terminal, its
        state is not in `expected`, the move is not allowed, or a concurrent writer
        changed the state first.

        In the same transaction: `attempt_started` (a Ray submission id) opens the row of
        attempt `fields["attempts"]`; `attempt_ended` (outcome, cause) closes the row of
        the job's current attempt.
        """
        target = JobState(target)
        unknown = set(fields) - _TRANSITION_FIELDS
        if unknown:
            raise ValueError(f"transition() cannot set {sorted(unknown)}")
        _check_aware("started_at", fields.get("started_at"))
        allowed_from: frozenset[JobState] | None = None
        if attempt_started is not None and "attempts" not in fields:
            raise ValueError("attempt_started needs attempts=<the attempt's number>")
        if expected is not None:
            allowed_from = frozenset(JobState(s) for s in expected)
            impossible = sorted(s.value for s in allowed_from if not can_transition(s, target))
            if impossible:
                raise InvalidTransition(f"{target.value} cannot be reached from {impossible}")

        with self._writing() as session:
            row = self._read_state(session, job_id)
            if row is None:
                return False
            current, started_at = row
            if (
                current.is_terminal
                or (allowed_from is not None and current not in allowed_from)
                or not can_transition(current, target)
            ):
                return False
            now = utcnow()
            values: dict[str, Any] = {"state": target.value, "updated_at": now, **fields}
            if target is JobState.RUNNING and started_at is None:
                values.setdefault("started_at", now)
            if target.is_terminal:
                values["finished_at"] = now
            # The compare-and-set: only moves the job if nobody moved it since we read it.
            result = session.execute(
                update(Job)
                .where(col(Job.id) == job_id, col(Job.state) == current.value)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            session.add(
                JobEvent(
                    job_id=job_id,
                    from_state=current.value,
                    to_state=target.value,
                    reason=reason,
                    at=now,
                )
            )
            if attempt_started is not None:
                session.add(Attempt(job_id=job_id, attempt=int(fields["attempts"]),
                                    ray_submission_id=attempt_started, started_at=now))
            if attempt_ended is not None:
                number = session.execute(
                    select(Job.attempts).where(col(Job.id) == job_id)).scalar_one()
                session.execute(
                    update(Attempt)
                    .where(col(Attempt.job_id) == job_id, col(Attempt.attempt) == number,
                           col(Attempt.ended_at).is_(None))
                    .values(ended_at=now, outcome=attempt_ended[0], cause=attempt_ended[1])
                    .execution_options(synchronize_session=False)
                )
        return True

    def add_event(self, job_id: int, reason: str) -> bool:
        """A note in the job's history without a state change (e.g. a restarted worker
        group). Only for active jobs; False, writing nothing, when the job is not active."""
        with self._writing() as session:
            row = self._read_state(session, job_id)
            if row is None or row[0] not in ACTIVE_STATES:
                return False
            state = row[0].value
            session.add(JobEvent(job_id=job_id, from_state=state, to_state=state, reason=reason,
                                 at=utcnow()))
        return True

    def attempts(self, job_id: int) -> list[Attempt]:
        """Every try at running the job, oldest first."""
        query = select(Attempt).where(col(Attempt.job_id) == job_id).order_by(col(Attempt.attempt))
        with self._read() as session:
            return list(session.scalars(query))

    @staticmethod
    def _read_state(session: Session, job_id: int) -> tuple[JobState, datetime | None] | None:
        row = session.execute(select(Job.state, Job.started_at).where(col(Job.id) == job_id)).one_or_none()
        return None if row is None else (JobState(row[0]), row[1])

    def update_job(self, job_id: int, **fields: Any) -> None:
        """Set non-state bookkeeping fields (e.g. ray_submission_id, error)."""
        if "state" in fields:
            raise ValueError("update_job() cannot set state; use transition()")
        bad = (set(fields) & _MANAGED_FIELDS) | (set(fields) - set(Job.model_fields))
        if bad:
            raise ValueError(f"update_job() cannot set {sorted(bad)}")
        if not fields:
            return
        for name in ("started_at", "finished_at"):
            _check_aware(name, fields.get(name))
        if "spec" in fields:
            _check_json("spec", fields["spec"])
        with self._writing() as session:
            result = session.execute(
                update(Job)
                .where(col(Job.id) == job_id)
                .values(**fields, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise KeyError(f"no job {job_id}")

    def events(self, job_id: int) -> list[JobEvent]:
        """Oldest first."""
        query = select(JobEvent).where(col(JobEvent.job_id) == job_id).order_by(col(JobEvent.id))
        with self._read() as session:
            return list(session.scalars(query))

    # -- metrics ----------------------------------------------------------------------

    def add_metrics(self, job_id: int, attempt: int, rows: Sequence[tuple[int, str, float]]) -> None:
        """Record (step, name, value) rows in one transaction."""
        now = utcnow()
        params: list[dict[str, Any]] = []
        for step, name, value in rows:
            number = float(value)
            # SQLite silently stores NaN as NULL, which the NOT NULL column rejects
            # mid-batch; refuse it up front, identically on both backends.
            if math.isnan(number):
                raise ValueError(f"metric {name!r} at step {step} is NaN")
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric name must be a non-empty string, got {name!r}")
            params.append(
                {
                    "job_id": job_id,
                    "attempt": int(attempt),
                    "step": int(step),
                    "name": name,
                    "value": number,
                    "at": now,
                }
            )
        if not params:
            return
        with self._writing() as session:
            for start in range(0, len(params), _METRIC_CHUNK):
                session.execute(insert(Metric).values(params[start : start + _METRIC_CHUNK]))

    def supersede_metrics(self, job_id: int, after_step: int | None,
                          restated: Sequence[str] = ()) -> int:
        """Mark the job's live metrics with step > `after_step` (None: all of them) as
        superseded, because a run starting from that step is about to write them again;
        also those at `after_step` itself named in `restated` (what every run writes at its
        starting step). Returns how many rows were marked; the rows themselves are kept."""
        query = update(Metric).where(col(Metric.job_id) == job_id, ~col(Metric.superseded))
        if after_step is not None:
            later = col(Metric.step) > int(after_step)
            if restated:
                later = later | ((col(Metric.step) == int(after_step))
                                 & col(Metric.name).in_(list(restated)))
            query = query.where(later)
        with self._writing() as session:
            result = session.execute(
                query.values(superseded=True).execution_options(synchronize_session=False))
        return int(result.rowcount)  # type: ignore[attr-defined]

    def metrics(self, job_id: int, name: str | None = None,
                include_superseded: bool = False) -> list[Metric]:
        """By step, then name (attempt and insertion order break ties). Rows a resumed run
        rewrote (superseded) only with `include_superseded`."""
        query = select(Metric).where(col(Metric.job_id) == job_id)
        if not include_superseded:
            query = query.where(~col(Metric.superseded))
        if name is not None:
            query = query.where(col(Metric.name) == name)
        query = query.order_by(col(Metric.step), col(Metric.name), col(Metric.attempt), col(Metric.id))
        with self._read() as session:
            return list(session.scalars(query))

    def latest_metrics(self, job_id: int) -> dict[str, tuple[int, float]]:
        """name -> (step, value) of each metric's newest live value: the latest attempt's
        highest step (a retried attempt may restart its step count). Superseded rows are
        ignored: a resumed run's step S+1 is newer than the dead run's step S+5."""
        newest_first = func.row_number().over(
            partition_by=col(Metric.name),
            order_by=(col(Metric.attempt).desc(), col(Metric.step).desc(), col(Metric.id).desc()),
        )
        ranked = (
            select(Metric.name, Metric.step, Metric.value, newest_first.label("rank"))
            .where(col(Metric.job_id) == job_id, ~col(Metric.superseded))
            .subquery()
        )
        query = select(ranked.c.name, ranked.c.step, ranked.c.value).where(ranked.c.rank == 1)
        with self._read() as session:
            return {name: (step, value) for name, step, value in session.execute(query)}

    # -- checkpoints ------------------------------------------------------------------

    @staticmethod
    def _lock_job(session: Session, job_id: int) -> None:
        """Row-lock the job so concurrent checkpoint writers for it serialise.

        Without it two PostgreSQL transactions could each clear the others' flags and
        both insert a 'latest' row (SQLite's BEGIN IMMEDIATE serialises anyway)."""
        found = session.execute(
            select(Job.id).where(col(Job.id) == job_id).with_for_update()
        ).scalar_one_or_none()
        if found is None:
            raise KeyError(f"no job {job_id}")

    def add_checkpoint(
        self,
        job_id: int,
        *,
        attempt: int,
        step: int,
        path: str,
        size_bytes: int,
        metrics: dict,
        kind: str = "checkpoint",
    ) -> Checkpoint:
        """Record a checkpoint. A "checkpoint" becomes the job's latest (the resume
        point); a "final" model is not a resume point and leaves is_latest alone."""
        if kind not in _CHECKPOINT_KINDS:
            raise ValueError(f"kind must be one of {_CHECKPOINT_KINDS}, got {kind!r}")
        _check_json("metrics", metrics)
        latest = kind == "checkpoint"
        checkpoint = Checkpoint(
            job_id=job_id,
            attempt=int(attempt),
            step=int(step),
            path=str(path),
            size_bytes=int(size_bytes),
            metrics=metrics,
            kind=kind,
            is_latest=latest,
            created_at=utcnow(),
        )
        with self._writing() as session:
            self._lock_job(session, job_id)
            if latest:
                session.execute(
                    update(Checkpoint)
                    .where(col(Checkpoint.job_id) == job_id, col(Checkpoint.is_latest))
                    .values(is_latest=False)
                    .execution_options(synchronize_session=False)
                )
            session.add(checkpoint)
        return checkpoint

    def set_best_checkpoint(self, job_id: int, checkpoint_id: int | None) -> None:
        """Make `checkpoint_id` the job's only best checkpoint (None: no best)."""
        with self._writing() as session:
            self._lock_job(session, job_id)
            if checkpoint_id is not None:
                owner = session.execute(
                    select(Checkpoint.job_id).where(col(Checkpoint.id) == checkpoint_id)
                ).scalar_one_or_none()
                if owner != job_id:
                    raise ValueError(f"checkpoint {checkpoint_id} is not a checkpoint of {job_id}")
            # Clear first: the partial unique index allows only one is_best row per job.
            session.execute(
                update(Checkpoint)
                .where(col(Checkpoint.job_id) == job_id, col(Checkpoint.is_best))
                .values(is_best=False)
                .execution_options(synchronize_session=False)
            )
            if checkpoint_id is not None:
                session.execute(
                    update(Checkpoint)
                    .where(col(Checkpoint.id) == checkpoint_id)
                    .values(is_best=True)
                    .execution_options(synchronize_session=False)
                )

    def mark_checkpoint_deleted(self, checkpoint_id: int) -> None:
        """Retention removed the files; the row stays for history."""
        with self._writing() as session:
            result = session.execute(
                update(Checkpoint)
                .where(col(Checkpoint.id) == checkpoint_id)
                .values(deleted=True)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise KeyError(f"no checkpoint {checkpoint_id}")

    def checkpoints(self, job_id: int, *, include_deleted: bool = False) -> list[Checkpoint]:
        """By step (then insertion order)."""
        query = select(Checkpoint).where(col(Checkpoint.job_id) == job_id)
        if not include_deleted:
            query = query.where(~col(Checkpoint.deleted))
        query = query.order_by(col(Checkpoint.step), col(Checkpoint.id))
        with self._read() as session:
            return list(session.scalars(query))
