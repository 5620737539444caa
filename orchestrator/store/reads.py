"""Read queries for views that show many jobs or long curves at once (the web dashboard).

Each is shaped so that its cost does not grow with the size of the store: job pages are
keyset ranges on the primary key, a metric's latest value is one backward step on the
(job_id, name, step) index, and a curve is one range scan of that index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlmodel import col

from orchestrator.models import Job, Metric
from orchestrator.states import JobState
from orchestrator.store.base import StoreBase

MAX_LINEAGE = 100  # parent links followed at most (a chain of resumes, not a cycle)


@dataclass(frozen=True)
class SeriesPoint:
    step: int
    value: float
    superseded: bool


class ReadsStore(StoreBase):
    def job_page(self, *, states: Iterable[JobState] | None = None, owner: str | None = None,
                 before_id: int | None = None, after_id: int | None = None,
                 limit: int = 50) -> list[Job]:
        """One page of jobs, newest first. `before_id`: the page of older jobs below that id;
        `after_id`: the page of newer jobs just above it (for "newer" links)."""
        query = select(Job)
        if states is not None:
            query = query.where(col(Job.state).in_([JobState(s) for s in states]))
        if owner is not None:
            query = query.where(col(Job.owner) == owner)
        if after_id is not None:
            # The `limit` jobs right above after_id, read upwards, then shown newest first.
            query = query.where(col(Job.id) > after_id).order_by(col(Job.id).asc()).limit(limit)
            with self._read() as session:
                return list(reversed(list(session.scalars(query))))
        if before_id is not None:
            query = query.where(col(Job.id) < before_id)
        query = query.order_by(col(Job.id).desc()).limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def job_counts(self, owner: str | None = None) -> dict[JobState, int]:
        """How many jobs are in each state (states with none are left out)."""
        query = select(Job.state, func.count()).group_by(col(Job.state))
        if owner is not None:
            query = query.where(col(Job.owner) == owner)
        with self._read() as session:
            return {JobState(state): int(n) for state, n in session.execute(query)}

    def job_owners(self, limit: int = 500) -> list[str]:
        """Owners of jobs, alphabetically."""
        query = select(Job.owner).distinct().order_by(col(Job.owner)).limit(limit)
        with self._read() as session:
            return list(session.scalars(query))

    def latest_values(self, wanted: Mapping[int, Sequence[str]]
                      ) -> dict[int, dict[str, tuple[int, float]]]:
        """job id -> name -> (step, value) of the newest live value of each metric named
        for that job, for a page of jobs. Each lookup is one backward step on the
        (job_id, name, step) index, so a page costs the same whether its jobs logged ten
        values or a million."""
        found: dict[int, dict[str, tuple[int, float]]] = {job_id: {} for job_id in wanted}
        with self._read() as session:
            for job_id, names in wanted.items():
                for name in names:
                    row = session.execute(
                        select(Metric.step, Metric.value)
                        .where(col(Metric.job_id) == job_id, col(Metric.name) == name,
                               ~col(Metric.superseded))
                        .order_by(col(Metric.step).desc(), col(Metric.attempt).desc(),
                                  col(Metric.id).desc())
                        .limit(1)).one_or_none()
                    if row is not None:
                        found[job_id][name] = (int(row[0]), float(row[1]))
        return found

    def metric_names(self, job_ids: Sequence[int]) -> list[str]:
        """The names of every metric these jobs recorded, alphabetically."""
        if not job_ids:
            return []
        query = (select(Metric.name).distinct().where(col(Metric.job_id).in_(list(job_ids)))
                 .order_by(col(Metric.name)))
        with self._read() as session:
            return list(session.scalars(query))

    def metric_series(self, job_id: int, names: Sequence[str], *,
                      after_step: int | None = None, max_step: int | None = None,
                      include_superseded: bool = False) -> dict[str, list[SeriesPoint]]:
        """name -> the job's points of that metric by step, with step in
        (`after_step`, `max_step`]. Live points only, unless `include_superseded`."""
        series: dict[str, list[SeriesPoint]] = {name: [] for name in names}
        if not names:
            return series
        query = select(Metric.name, Metric.step, Metric.value, Metric.superseded).where(
            col(Metric.job_id) == job_id, col(Metric.name).in_(list(names)))
        if after_step is not None:
            query = query.where(col(Metric.step) > after_step)
        if max_step is not None:
            query = query.where(col(Metric.step) <= max_step)
        if not include_superseded:
            query = query.where(~col(Metric.superseded))
        query = query.order_by(col(Metric.name), col(Metric.step), col(Metric.attempt),
                               col(Metric.id))
        with self._read() as session:
            for name, step, value, superseded in session.execute(query):
                series[name].append(SeriesPoint(int(step), float(value), bool(superseded)))
        return series

    def metric_counts(self, job_id: int, names: Sequence[str], *,
                      include_superseded: bool = False) -> dict[str, int]:
        """name -> how many values of it the job has (live ones unless asked)."""
        query = (select(Metric.name, func.count())
                 .where(col(Metric.job_id) == job_id, col(Metric.name).in_(list(names)))
                 .group_by(col(Metric.name)))
        if not include_superseded:
            query = query.where(~col(Metric.superseded))
        with self._read() as session:
            counts = {name: n for name, n in session.execute(query)}
        return {name: int(counts.get(name, 0)) for name in names}

    def lineage(self, job_id: int) -> list[Job]:
        """The chain of `orch resume`s that leads to this job: its oldest ancestor first,
        the job itself last (just the job when it resumes nothing)."""
        chain: list[Job] = []
        seen: set[int] = set()
        next_id: int | None = job_id
        with self._read() as session:
            while next_id is not None and next_id not in seen and len(chain) < MAX_LINEAGE:
                job = session.get(Job, next_id)
                if job is None:
                    break
                chain.append(job)
                seen.add(next_id)
                next_id = job.parent_job_id
        return list(reversed(chain))

    def resumed_by(self, job_id: int) -> list[int]:
        """Ids of the jobs that resume this one."""
        query = select(Job.id).where(col(Job.parent_job_id) == job_id).order_by(col(Job.id))
        with self._read() as session:
            return [int(i) for i in session.scalars(query)]
