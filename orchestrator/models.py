"""Database tables. The schema itself is created by the Alembic migrations in
`orchestrator/migrations`; keep the two in step (tests compare them)."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from orchestrator.states import AttemptOutcome, CheckpointKind, JobState

__all__ = ["AttemptOutcome", "CheckpointKind"]  # re-exported: enums of these tables


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite has no timezone type and hands back naive values; PostgreSQL hands back
    values in the session's TimeZone. Both are normalised to UTC on read. Naive
    values are refused on write: guessing their zone is how silent skew gets in.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite: stored as UTC without an offset
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class EnumText(sa.TypeDecorator[Any]):
    """A Python enum stored as its value in a plain string column (no database enum type,
    so adding a member needs no migration), and read back as the enum member."""

    impl = sa.String
    cache_ok = True

    def __init__(self, enum: type[Enum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else self.enum(value)


def _job_fk() -> Any:
    return Field(foreign_key="jobs.id", ondelete="CASCADE", index=True)


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    # Serves the scheduler's queue scan (state = 'queued' ORDER BY priority, id) and, by
    # its leading column, every filter on state; a separate state index would be redundant.
    __table_args__ = (sa.Index("ix_jobs_queue", "state", "priority", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str
    objective: str
    owner: str
    state: JobState = Field(sa_type=EnumText(JobState))
    priority: int = 0
    spec: dict[str, Any] = Field(sa_type=sa.JSON)
    spec_yaml: str = Field(sa_type=sa.Text)
    gpus: int
    cpus: int
    attempts: int = 0
    max_attempts: int = 1
    ray_submission_id: str | None = None
    error: str | None = Field(default=None, sa_type=sa.Text)
    artifact_dir: str
    # `orch resume`: the job this one continues, and the checkpoint it starts from.
    parent_job_id: int | None = Field(default=None, foreign_key="jobs.id", ondelete="SET NULL")
    resume_from: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class JobEvent(SQLModel, table=True):
    __tablename__ = "job_events"

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = _job_fk()
    from_state: JobState | None = Field(default=None, sa_type=EnumText(JobState))  # None: created
    to_state: JobState = Field(sa_type=EnumText(JobState))
    reason: str = Field(sa_type=sa.Text)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # Structured facts about the move, for code and tests to read instead of the prose:
    # "user" (who acted), "pid", "host", "node", "resume_step", "resume_from", "ranks", ...
    details: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)


class Metric(SQLModel, table=True):
    __tablename__ = "metrics"
    # Covers "one metric's series of a job" and, by prefix, "all metrics of a job".
    __table_args__ = (
        sa.Index("ix_metrics_job_name_step", "job_id", "name", "step"),
        # At most one live value per (attempt, step, name): a worker's retried report (the
        # control plane was down, the answer lost) is ignored instead of counted twice.
        sa.Index("uq_metrics_live", "job_id", "attempt", "step", "name", unique=True,
                 sqlite_where=sa.text("NOT superseded"),
                 postgresql_where=sa.text("NOT superseded")),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", ondelete="CASCADE")
    attempt: int
    step: int
    name: str
    value: float
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # A run that resumes from step S (or starts over) writes steps > S again: the rows an
    # earlier run wrote there are marked rather than deleted, so reads see each step once
    # and the rolled-back history stays inspectable. Set only by Store.supersede_metrics.
    superseded: bool = Field(default=False, sa_column_kwargs={"server_default": sa.false()})


class Checkpoint(SQLModel, table=True):
    __tablename__ = "checkpoints"
    # The database itself guarantees at most one best and one latest checkpoint per job.
    __table_args__ = (
        sa.Index(
            "uq_checkpoints_best",
            "job_id",
            unique=True,
            sqlite_where=sa.text("is_best"),
            postgresql_where=sa.text("is_best"),
        ),
        sa.Index(
            "uq_checkpoints_latest",
            "job_id",
            unique=True,
            sqlite_where=sa.text("is_latest"),
            postgresql_where=sa.text("is_latest"),
        ),
        # One row per location: registering a path again (a retried report, or a later
        # attempt writing the same step) updates that row instead of adding a second.
        sa.UniqueConstraint("job_id", "path", name="uq_checkpoints_path"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = _job_fk()
    attempt: int
    step: int
    path: str
    size_bytes: int = Field(sa_type=sa.BigInteger)  # model weights exceed 2 GiB
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
    kind: CheckpointKind = Field(default=CheckpointKind.CHECKPOINT,
                                 sa_type=EnumText(CheckpointKind))
    is_best: bool = False
    is_latest: bool = False
    deleted: bool = False  # files removed from disk by retention; the row stays as history
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Attempt(SQLModel, table=True):
    """One try at running a job: one Ray Job, from admission to its end and why."""

    __tablename__ = "attempts"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "attempt", name="uq_attempts_job_attempt"),
        sa.UniqueConstraint("token_hash", name="uq_attempts_token_hash"),
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id", ondelete="CASCADE")
    attempt: int
    ray_submission_id: str
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    outcome: AttemptOutcome = Field(default=AttemptOutcome.RUNNING,
                                    sa_type=EnumText(AttemptOutcome))
    cause: str | None = Field(default=None, sa_type=sa.Text)
    # sha256 of the attempt's worker token: the one credential its Ray Job carries, good for
    # reporting on this attempt only, and only until the attempt ends (never stored plain).
    token_hash: str | None = Field(default=None, sa_type=sa.String(64))


class WorkerRequest(SQLModel, table=True):
    """Reports a worker sent that must not be applied twice when it retries them (the
    answer was lost): the key the worker chose for each, per attempt."""

    __tablename__ = "worker_requests"
    __table_args__ = (sa.UniqueConstraint("attempt_id", "key", name="uq_worker_requests_key"),)

    id: int | None = Field(default=None, primary_key=True)
    attempt_id: int = Field(foreign_key="attempts.id", ondelete="CASCADE")
    key: str = Field(sa_type=sa.String(64))
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# -- people: accounts, their tokens, and the audit trail of changes to them -----------------
class UserRole(str, Enum):
    ADMIN = "admin"  # manages users and tokens; may cancel and resume anyone's jobs
    USER = "user"  # submits jobs; cancels and resumes their own


class UserAccount(SQLModel, table=True):
    """A person of a team server (`orch server --auth users`)."""

    __tablename__ = "users"
    __table_args__ = (sa.UniqueConstraint("name", name="uq_users_name"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_type=sa.String(64))
    role: UserRole = Field(sa_type=EnumText(UserRole))
    # None: the server's default (ORCH_USER_GPU_CAP, ORCH_MAX_PRIORITY).
    gpu_cap: int | None = None
    max_priority: int | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # Set once: a disabled user's tokens are all refused (and revoked).
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class UserToken(SQLModel, table=True):
    """One of a user's API tokens. Only its sha256 is kept; the token itself is shown once,
    when it is made."""

    __tablename__ = "user_tokens"
    __table_args__ = (
        sa.UniqueConstraint("token_hash", name="uq_user_tokens_hash"),
        # A name picks one live token (`orch users revoke alice/laptop`); a revoked token's
        # name may be used again.
        sa.Index("uq_user_tokens_live_name", "user_id", "name", unique=True,
                 sqlite_where=sa.text("revoked_at IS NULL"),
                 postgresql_where=sa.text("revoked_at IS NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="users.id", ondelete="CASCADE", index=True)
    name: str = Field(sa_type=sa.String(64))
    token_hash: str = Field(sa_type=sa.String(64))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class AuditEvent(SQLModel, table=True):
    """Who changed which account or token, and when (job actions are recorded in the job's
    own events, with `details.user`)."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    actor: str  # the user who acted; "<os user> (--database)" for `orch users add --database`
    action: str  # user.create | user.disable | token.issue | token.revoke
    target: str  # the user acted on
    details: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
