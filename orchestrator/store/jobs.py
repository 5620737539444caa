"""Jobs, their state machine moves, their events and their attempts.

Every state change is a guarded compare-and-set (`UPDATE ... WHERE id = ? AND state = ?`)
recorded as a JobEvent in the same transaction; admission claims a whole tick's jobs that
way in one transaction (`claim_jobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, String, bindparam, cast, func, literal, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlmodel import col

from orchestrator.errors import InvalidRequest, InvalidTransition, NotFound
from orchestrator.models import Attempt, AttemptOutcome, Job, JobEvent, UserAccount, utcnow
from orchestrator.settings import get_settings
from orchestrator.states import ACTIVE_STATES, JobState, can_transition
from orchestrator.store.base import StoreBase, check_aware, check_json
from orchestrator.store.metrics import supersede_in
from orchestrator.tokens import WORKER_PREFIX, new_token, token_hash

_TRANSITION_FIELDS = frozenset({"ray_submission_id", "error", "attempts", "started_at"})
# Managed by the store itself; everything else on a job is bookkeeping update_job may set.
_MANAGED_FIELDS = frozenset({"id", "state", "created_at", "updated_at"})


def submission_id(job_id: int, attempt: int) -> str:
    """The Ray Job submission id of a job's attempt: deterministic, so a restarted control
    plane finds its jobs again."""
    return f"orch-{job_id}-{attempt}"


@dataclass(frozen=True)
class QueuedJob:
    """What admission needs of a queued job (the spec stays in the database)."""

    id: int
    owner: str
    priority: int
    gpus: int
    cpus: int


@dataclass(frozen=True)
class Claimed:
    """A job admission claimed (queued -> pending), ready to hand to Ray."""

    job_id: int
    attempt: int
    submission_id: str
    gpus: int
    cpus: int
    workers: int  # data-parallel workers, from the spec
    # The attempt's worker token, in plain text this once: it goes into the Ray Job's
    # environment and nowhere else; the database keeps only its hash.
    token: str
    previous_submission_id: str | None


@dataclass(frozen=True)
class Supersede:
    """A run about to start from `after_step` (None: from the beginning) will write the
    job's later metrics again: mark the rows already there (and those at `after_step`
    named in `restated`) superseded, in the same transaction as the move that starts it."""

    after_step: int | None
    restated: Sequence[str] = ()


_QUEUED = col(Job.state) == JobState.QUEUED
_QUEUE_COLUMNS = (col(Job.id), col(Job.owner), col(Job.priority), col(Job.gpus), col(Job.cpus))


def _queue_level(priority: Any, *where: Any) -> Any:
    """Queued jobs of one priority level, oldest first, at most :n of them."""
    return (select(*_QUEUE_COLUMNS).where(_QUEUED, col(Job.priority) == priority, *where)
            .order_by(col(Job.id)).limit(bindparam("n", type_=Integer)))


# Built once (building a statement costs more than running one of these). The max() of a
# prefix of ix_jobs_queue is one index seek on both databases.
_QUEUE_TOP = _queue_level(select(func.max(col(Job.priority))).where(_QUEUED).scalar_subquery())
_QUEUE_LEVEL = _queue_level(bindparam("p", type_=Integer),
                            col(Job.id) > bindparam("after", type_=Integer))
_QUEUE_BELOW = _queue_level(select(func.max(col(Job.priority)))
                            .where(_QUEUED, col(Job.priority) < bindparam("p", type_=Integer))
                            .scalar_subquery())


_USAGE = (select(col(Job.owner), func.sum(col(Job.gpus)), func.sum(col(Job.cpus)))
          .where(col(Job.state).in_(list(ACTIVE_STATES))).group_by(col(Job.owner)))
_GPU_CAPS = select(col(UserAccount.name), col(UserAccount.gpu_cap)).where(
    col(UserAccount.gpu_cap).is_not(None))
# Admission (claim_jobs), built once. Core, not ORM: the ORM's bulk paths cost more per
# row than the database does here.
_JOBS = Job.metadata.tables[Job.__tablename__]
_EVENTS = JobEvent.metadata.tables[JobEvent.__tablename__]
_ATTEMPTS = Attempt.metadata.tables[Attempt.__tablename__]
_CLAIM = (
    update(_JOBS)
    # The state test wrapped so no index can serve it: a bare `state = 'queued'` lets
    # SQLite (no statistics) pick ix_jobs_queue and scan every queued job, instead of
    # looking up the few ids by primary key. Same meaning: state is never NULL.
    .where(_JOBS.c.id.in_(bindparam("ids", expanding=True)),
           func.coalesce(_JOBS.c.state, "") == JobState.QUEUED)
    .values(state=JobState.PENDING, attempts=_JOBS.c.attempts + 1, updated_at=bindparam("now"))
    # How many workers the (validated, defaults filled in) spec asks for, read in the
    # database: decoding every claimed job's whole spec would cost more than the claim.
    .returning(_JOBS.c.id, _JOBS.c.attempts, _JOBS.c.gpus, _JOBS.c.cpus,
               _JOBS.c.spec[("resources", "workers")].as_integer(),
               _JOBS.c.ray_submission_id))
# submission_id(id, attempts), in SQL.
_NAME_SUBMISSIONS = (
    update(_JOBS).where(_JOBS.c.id.in_(bindparam("ids", expanding=True)))
    .values(ray_submission_id=literal("orch-") + cast(_JOBS.c.id, String) + literal("-")
            + cast(_JOBS.c.attempts, String)))


def _usage_in(conn: Connection) -> dict[str, tuple[int, int]]:
    return {owner: (int(g or 0), int(c or 0)) for owner, g, c in conn.execute(_USAGE)}


def _queue_page_in(conn: Connection, limit: int,
                   after: tuple[int, int] | None) -> list[QueuedJob]:
    found: list[Any] = []
    if after is not None:
        found += conn.execute(_QUEUE_LEVEL, {"p": after[0], "after": after[1], "n": limit}).all()
    while len(found) < limit:
        # The levels read so far are exhausted: go on with the next lower one.
        if found or after is not None:
            below = found[-1][2] if found else after[0]  # type: ignore[index]
            rows = conn.execute(_QUEUE_BELOW, {"p": below, "n": limit - len(found)}).all()
        else:
            rows = conn.execute(_QUEUE_TOP, {"n": limit}).all()
        if not rows:
            break
        found += rows
    return [QueuedJob(id=int(job_id), owner=owner, priority=int(priority), gpus=int(gpus),
                      cpus=int(cpus))
            for job_id, owner, priority, gpus, cpus in found]


class JobsStore(StoreBase):
    # -- jobs -------------------------------------------------------------------------
    def create_job(
        self,
        *,
        name: str,
        objective: str,
        owner: str,
        spec: dict[str, Any],
        spec_yaml: str,
        gpus: int,
        cpus: int,
        priority: int = 0,
        max_attempts: int = 1,
        artifact_root: Path | None = None,
        parent_job_id: int | None = None,
        resume_from: str | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        on_created: Callable[[Job], None] | None = None,
    ) -> Job:
        for label, value in (("name", name), ("objective", objective), ("owner", owner)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidRequest(f"{label} must be a non-empty string")
        check_json("spec", spec)
        if gpus < 0 or cpus < 0:
            raise InvalidRequest(f"gpus and cpus must be >= 0, got gpus={gpus} cpus={cpus}")
        if max_attempts < 1:
            raise InvalidRequest(f"max_attempts must be >= 1, got {max_attempts}")
        root = (Path(artifact_root) if artifact_root else get_settings().home_dir() / "jobs")
        now = utcnow()
        job = Job(
            name=name, objective=objective, owner=owner, state=JobState.QUEUED,
            priority=int(priority), spec=spec, spec_yaml=spec_yaml, gpus=int(gpus),
            cpus=int(cpus), max_attempts=int(max_attempts), parent_job_id=parent_job_id,
            resume_from=resume_from,
            artifact_dir="",  # needs the id; set after the INSERT, same transaction
            created_at=now, updated_at=now,
        )
        with self._writing() as session:
            session.add(job)
            session.flush()
            assert job.id is not None
            job.artifact_dir = str(root.absolute() / str(job.id))
            if on_created is not None:
                on_created(job)  # e.g. make the job's directory; raising rolls all back
            session.add(JobEvent(job_id=job.id, from_state=None, to_state=JobState.QUEUED,
                                 reason=reason or f"submitted by {owner}", at=now,
                                 details={"user": owner, **(details or {})}))
        return job

    def get_job(self, job_id: int) -> Job | None:
        with self._read() as session:
            return session.get(Job, job_id)

    def job_state(self, job_id: int) -> JobState | None:
        """Only the job's state (None: no such job): what a waiting status request rereads."""
        with self._read() as session:
            state = session.execute(select(col(Job.state)).where(col(Job.id) == job_id)).scalar()
            return None if state is None else JobState(state)

    def require_job(self, job_id: int) -> Job:
        """The job, or NotFound."""
        job = self.get_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def list_jobs(
        self,
        *,
        states: Iterable[JobState] | None = None,
        owner: str | None = None,
        limit: int | None = None,
        before_id: int | None = None,
    ) -> list[Job]:
        """Newest first; `before_id` pages backwards (jobs with a smaller id)."""
        query = select(Job).order_by(col(Job.id).desc())
        if states is not None:
            query = query.where(col(Job.state).in_([JobState(s) for s in states]))
        if owner is not None:
            query = query.where(col(Job.owner) == owner)
        if before_id is not None:
            query = query.where(col(Job.id) < before_id)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def queued_jobs(self, limit: int | None = None) -> list[Job]:
        """The queue in scheduling order: priority high to low, then first come first."""
        query = (select(Job).where(col(Job.state) == JobState.QUEUED)
                 .order_by(col(Job.priority).desc(), col(Job.id).asc()).limit(limit))
        with self._read() as session:
            return list(session.scalars(query))

    def queue_page(self, limit: int, after: tuple[int, int] | None = None) -> list[QueuedJob]:
        """A page of the queue in scheduling order, without the specs: `limit` jobs after
        the (priority, id) position `after`.

        Read one priority level at a time (`_QUEUE_*`): within a level, id order is the
        order of ix_jobs_queue (state, priority, id), so a page is an index range scan that
        stops after `limit` rows, however long the queue. One query over all levels
        (ORDER BY priority DESC, id ASC) mixes directions, which the index cannot serve:
        both databases would then read and sort every queued job for every page."""
        with self._read() as session:
            return _queue_page_in(session.connection(), limit, after)

    def usage(self) -> dict[str, tuple[int, int]]:
        """owner -> (GPUs, CPUs) their pending and running jobs hold: one aggregate query."""
        with self._read() as session:
            return _usage_in(session.connection())

    def admission_view(self, limit: int) -> tuple[dict[str, tuple[int, int]], dict[str, int],
                                                  list[QueuedJob]]:
        """What a scheduler tick reads before it claims, in one read transaction (one
        round trip each, not one transaction each): `usage()`, `gpu_caps()` and the first
        `queue_page(limit)`."""
        with self._read() as session:
            conn = session.connection()
            caps = {name: int(cap) for name, cap in conn.execute(_GPU_CAPS) if cap is not None}
            return _usage_in(conn), caps, _queue_page_in(conn, limit, None)

    def update_job(self, job_id: int, **fields: Any) -> None:
        """Set non-state bookkeeping fields (e.g. ray_submission_id, error)."""
        if "state" in fields:
            raise InvalidRequest("update_job() cannot set state; use transition()")
        bad = (set(fields) & _MANAGED_FIELDS) | (set(fields) - set(Job.model_fields))
        if bad:
            raise InvalidRequest(f"update_job() cannot set {sorted(bad)}")
        if not fields:
            return
        for name in ("started_at", "finished_at"):
            check_aware(name, fields.get(name))
        if "spec" in fields:
            check_json("spec", fields["spec"])
        with self._writing() as session:
            result = session.execute(
                update(Job).where(col(Job.id) == job_id).values(**fields, updated_at=utcnow())
                .execution_options(synchronize_session=False))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"job {job_id} not found")

    # -- the state machine --------------------------------------------------------------
    def transition(
        self,
        job_id: int,
        target: JobState,
        reason: str,
        *,
        expected: Iterable[JobState] | None = None,
        attempt_started: str | None = None,
        attempt_ended: tuple[AttemptOutcome, str | None] | None = None,
        details: dict[str, Any] | None = None,
        supersede: Supersede | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job to `target` if the state machine allows it; True when it moved.

        Returns False, changing nothing, when the job is missing or terminal, its state is
        not in `expected`, the move is not allowed, or a concurrent writer changed the state
        first.

        In the same transaction: `attempt_started` (a Ray submission id) opens the row of
        attempt `fields["attempts"]`; `attempt_ended` (outcome, cause) closes the row of the
        job's current attempt (and with it the attempt's worker token); `supersede` marks
        the metrics the run now starting will write again.
        """
        try:
            target = JobState(target)
        except ValueError:
            raise InvalidRequest(f"no state {target!r}") from None
        unknown = set(fields) - _TRANSITION_FIELDS
        if unknown:
            raise InvalidRequest(f"transition() cannot set {sorted(unknown)}")
        check_aware("started_at", fields.get("started_at"))
        if details is not None:
            check_json("details", details)
        if attempt_started is not None and "attempts" not in fields:
            raise InvalidRequest("attempt_started needs attempts=<the attempt's number>")
        allowed_from: frozenset[JobState] | None = None
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
            if (current.is_terminal or (allowed_from is not None and current not in allowed_from)
                    or not can_transition(current, target)):
                return False
            now = utcnow()
            values: dict[str, Any] = {"state": target, "updated_at": now, **fields}
            if target is JobState.RUNNING and started_at is None:
                values.setdefault("started_at", now)
            if target.is_terminal:
                values["finished_at"] = now
            # The compare-and-set: only moves the job if nobody moved it since we read it.
            result = session.execute(
                update(Job).where(col(Job.id) == job_id, col(Job.state) == current)
                .values(**values).execution_options(synchronize_session=False))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            session.add(JobEvent(job_id=job_id, from_state=current, to_state=target,
                                 reason=reason, at=now, details=details))
            if attempt_started is not None:
                session.add(Attempt(job_id=job_id, attempt=int(fields["attempts"]),
                                    ray_submission_id=attempt_started, started_at=now))
            if attempt_ended is not None:
                self._end_attempt(session, job_id, attempt_ended, now)
            if supersede is not None:
                supersede_in(session, job_id, supersede.after_step, supersede.restated)
        self._announce([job_id])
        return True

    @staticmethod
    def _end_attempt(session: Session, job_id: int,
                     ended: tuple[AttemptOutcome, str | None], now: datetime) -> None:
        number = session.execute(
            select(col(Job.attempts)).where(col(Job.id) == job_id)).scalar_one()
        session.execute(
            update(Attempt)
            .where(col(Attempt.job_id) == job_id, col(Attempt.attempt) == number,
                   col(Attempt.ended_at).is_(None))
            .values(ended_at=now, outcome=AttemptOutcome(ended[0]), cause=ended[1])
            .execution_options(synchronize_session=False))

    @staticmethod
    def _read_state(session: Session, job_id: int) -> tuple[JobState, datetime | None] | None:
        row = session.execute(
            select(col(Job.state), col(Job.started_at)).where(col(Job.id) == job_id)).one_or_none()
        return None if row is None else (JobState(row[0]), row[1])

    def claim_jobs(self, job_ids: Sequence[int]) -> list[Claimed]:
        """Admit these jobs (queued -> pending) in one transaction: one compare-and-set
        UPDATE for all of them, then their events and attempt rows in bulk. A job another
        writer moved first (cancelled, say) is left out. Returns the claimed attempts, each
        with a new worker token, in the order given."""
        if not job_ids:
            return []
        now = utcnow()
        with self._writing() as session:
            conn = session.connection()
            # The compare-and-set for all of them at once. RETURNING reads the row after the
            # UPDATE, and this one leaves ray_submission_id alone: it still names the
            # previous attempt (what a retry must stop first).
            rows = conn.execute(_CLAIM, {"ids": list(job_ids), "now": now}).all()
            by_id = {row[0]: row for row in rows}
            claimed = [
                Claimed(job_id=jid, attempt=attempt, submission_id=submission_id(jid, attempt),
                        gpus=gpus, cpus=cpus, workers=int(workers or 1),
                        token=new_token(WORKER_PREFIX), previous_submission_id=previous)
                for jid, attempt, gpus, cpus, workers, previous
                in (by_id[j] for j in job_ids if j in by_id)
            ]
            if not claimed:
                return []
            # One statement, however many jobs (not one UPDATE per job).
            conn.execute(_NAME_SUBMISSIONS, {"ids": [c.job_id for c in claimed]})
            conn.execute(_EVENTS.insert(), [
                {"job_id": c.job_id, "from_state": JobState.QUEUED, "to_state": JobState.PENDING,
                 "reason": (f"admitted: {c.gpus} GPU(s), {c.cpus} CPU(s); Ray job "
                            f"{c.submission_id}"),
                 "at": now, "details": {"attempt": c.attempt, "submission_id": c.submission_id}}
                for c in claimed])
            conn.execute(_ATTEMPTS.insert(), [
                {"job_id": c.job_id, "attempt": c.attempt, "ray_submission_id": c.submission_id,
                 "started_at": now, "outcome": AttemptOutcome.RUNNING,
                 "token_hash": token_hash(c.token)}
                for c in claimed])
        self._announce([c.job_id for c in claimed])
        return claimed

    # -- events -----------------------------------------------------------------------
    def add_event(self, job_id: int, reason: str, *, details: dict[str, Any] | None = None,
                  request: tuple[int, str] | None = None,
                  supersede: Supersede | None = None) -> bool:
        """A note in the job's history without a state change (e.g. a restarted worker
        group). Only for active jobs; False, writing nothing, when the job is not active.
        `request` (attempt row id, key): a worker's report, applied at most once."""
        if details is not None:
            check_json("details", details)
        with self._writing() as session:
            row = self._read_state(session, job_id)
            if row is None or row[0] not in ACTIVE_STATES:
                return False
            if not self._first_time(session, *(request or (None, None))):
                return True  # applied already; this is the worker retrying it
            session.add(JobEvent(job_id=job_id, from_state=row[0], to_state=row[0],
                                 reason=reason, at=utcnow(), details=details))
            if supersede is not None:
                supersede_in(session, job_id, supersede.after_step, supersede.restated)
        return True

    def events(self, job_id: int) -> list[JobEvent]:
        """Oldest first."""
        query = select(JobEvent).where(col(JobEvent.job_id) == job_id).order_by(col(JobEvent.id))
        with self._read() as session:
            return list(session.scalars(query))

    # -- attempts ---------------------------------------------------------------------
    def attempts(self, job_id: int) -> list[Attempt]:
        """Every try at running the job, oldest first."""
        query = select(Attempt).where(col(Attempt.job_id) == job_id).order_by(col(Attempt.attempt))
        with self._read() as session:
            return list(session.scalars(query))

    def set_attempt_cause(self, job_id: int, attempt: int, cause: str) -> bool:
        """Record why a live attempt is about to end badly, in its driver's words; the
        control plane uses it when it settles the attempt. False when the attempt ended."""
        with self._writing() as session:
            result = session.execute(
                update(Attempt)
                .where(col(Attempt.job_id) == job_id, col(Attempt.attempt) == attempt,
                       col(Attempt.ended_at).is_(None))
                .values(cause=cause).execution_options(synchronize_session=False))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def live_attempt_for_token(self, token: str) -> tuple[Job, Attempt] | None:
        """The job and attempt a worker token belongs to, while that attempt is live (not
        ended, and the job's current one); None otherwise."""
        query = (select(Job, Attempt).join(Attempt, col(Attempt.job_id) == col(Job.id))
                 .where(col(Attempt.token_hash) == token_hash(token),
                        col(Attempt.ended_at).is_(None),
                        col(Attempt.attempt) == col(Job.attempts)))
        with self._read() as session:
            row = session.execute(query).one_or_none()
        return None if row is None else (row[0], row[1])
