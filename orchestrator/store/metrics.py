"""Metrics: what a run reports per step, written in bulk, each (attempt, step, name) once.

A run that resumes from step S (or starts over) writes the steps after S again. The rows an
earlier run wrote there are marked `superseded` rather than deleted, so reads see each step
once and the rolled-back history stays inspectable (`include_superseded`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from orchestrator.errors import InvalidRequest
from orchestrator.models import Metric, utcnow
from orchestrator.store.base import StoreBase

MAX_METRIC_NAME = 100


def supersede_in(session: Session, job_id: int, after_step: int | None,
                 restated: Sequence[str] = ()) -> int:
    """Inside a transaction: mark the job's live metrics with step > `after_step` (None: all
    of them) superseded, and those at `after_step` named in `restated` (what every run
    writes at its starting step). Returns how many rows were marked."""
    query = update(Metric).where(col(Metric.job_id) == job_id, ~col(Metric.superseded))
    if after_step is not None:
        later = col(Metric.step) > int(after_step)
        if restated:
            later = later | ((col(Metric.step) == int(after_step))
                             & col(Metric.name).in_(list(restated)))
        query = query.where(later)
    result = session.execute(
        query.values(superseded=True).execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


def metric_rows(job_id: int, attempt: int,
                rows: Sequence[tuple[int, str, float]]) -> list[dict[str, Any]]:
    """Checked INSERT parameters for (step, name, value) rows; InvalidRequest on the first
    bad one, before anything is written."""
    now = utcnow()
    params: list[dict[str, Any]] = []
    for step, name, value in rows:
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_METRIC_NAME:
            raise InvalidRequest(f"metric name must be 1 to {MAX_METRIC_NAME} characters, "
                                 f"got {name!r}")
        try:
            number = float(value)
            step = int(step)
        except (TypeError, ValueError):
            raise InvalidRequest(f"metric {name!r}: step and value must be numbers") from None
        # SQLite silently stores NaN as NULL, which the NOT NULL column rejects mid-batch;
        # refuse non-finite values up front, identically on both backends.
        if not math.isfinite(number):
            raise InvalidRequest(f"metric {name!r} at step {step} is {number}")
        if step < 0:
            raise InvalidRequest(f"metric {name!r}: step must be >= 0, got {step}")
        params.append({"job_id": job_id, "attempt": int(attempt), "step": step, "name": name,
                       "value": number, "at": now})
    return params


class MetricsStore(StoreBase):
    def add_metrics(self, job_id: int, attempt: int,
                    rows: Sequence[tuple[int, str, float]]) -> int:
        """Record (step, name, value) rows in one transaction. A row whose (attempt, step,
        name) already has a live value is skipped: the first value stands, so a report sent
        twice is counted once. Returns how many rows were new."""
        params = metric_rows(job_id, attempt, rows)
        if not params:
            return 0
        # One statement for every batch (compiled once and cached), executed over the rows:
        # SQLAlchemy sends them in pages ("insertmanyvalues"), counting what was inserted.
        table = Metric.metadata.tables[Metric.__tablename__]
        stmt = self._insert(table).on_conflict_do_nothing().returning(table.c.id)
        with self._writing() as session:
            return len(session.execute(stmt, params).all())

    def supersede_metrics(self, job_id: int, after_step: int | None,
                          restated: Sequence[str] = ()) -> int:
        """`supersede_in`, as a transaction of its own."""
        with self._writing() as session:
            return supersede_in(session, job_id, after_step, restated)

    def metrics(self, job_id: int, name: str | None = None,
                include_superseded: bool = False) -> list[Metric]:
        """By step, then name (attempt and insertion order break ties). Rows a resumed run
        rewrote (superseded) only with `include_superseded`."""
        query = select(Metric).where(col(Metric.job_id) == job_id)
        if not include_superseded:
            query = query.where(~col(Metric.superseded))
        if name is not None:
            query = query.where(col(Metric.name) == name)
        query = query.order_by(col(Metric.step), col(Metric.name), col(Metric.attempt),
                               col(Metric.id))
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
            select(col(Metric.name), col(Metric.step), col(Metric.value), newest_first.label("rank"))
            .where(col(Metric.job_id) == job_id, ~col(Metric.superseded))
            .subquery()
        )
        query = select(ranked.c.name, ranked.c.step, ranked.c.value).where(ranked.c.rank == 1)
        with self._read() as session:
            return {name: (step, value) for name, step, value in session.execute(query)}
