"""The job store: orch's durable source of truth (SQLite or PostgreSQL).

One `Store` object, put together from one module per concern:

  engine.py       the engine (SQLite pragmas, BEGIN IMMEDIATE) and schema upgrades
  jobs.py         jobs, the state machine's compare-and-set moves, events, attempts,
                  batched admission (claim_jobs)
  metrics.py      metrics, each (attempt, step, name) once, superseded rows kept
  checkpoints.py  checkpoints, best/latest, retention
  users.py        users of a team server, their API tokens (hashed), the audit trail
  reads.py        reads for views of many jobs or long curves (job pages, downsampled charts)

Writes validate their input before touching the database (InvalidRequest), and each
public method is one transaction, so bad input or a lost race changes nothing.
"""

from __future__ import annotations

from orchestrator.errors import InvalidTransition
from orchestrator.store.checkpoints import CheckpointsStore, pick_best
from orchestrator.store.engine import MIGRATIONS_DIR, make_engine, migration_lock, upgrade_schema
from orchestrator.store.jobs import Claimed, JobsStore, QueuedJob, Supersede, submission_id
from orchestrator.store.metrics import MetricsStore
from orchestrator.store.reads import ReadsStore
from orchestrator.store.users import Issued, UsersStore


class Store(JobsStore, MetricsStore, CheckpointsStore, UsersStore, ReadsStore):
    """All of orch's reads and writes of jobs, events, attempts, metrics, checkpoints,
    users and their tokens."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["MIGRATIONS_DIR", "Claimed", "InvalidTransition", "Issued", "QueuedJob", "Store",
           "Supersede", "make_engine", "migration_lock", "pick_best", "submission_id",
           "upgrade_schema"]
