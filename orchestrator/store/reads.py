"""Read queries for views that show many jobs or long curves at once (the web dashboard).

Each is shaped so that its cost does not grow with the size of the store: job pages are
keyset ranges on the primary key, a metric's latest value is one backward step on the
(job_id, name, step) index, and a curve is one range scan of that index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlmodel import col

from orchestrator.models import Job, Metric
from orchestrator.states import JobState
from orchestrator.store.base import StoreBase

MAX_LINEAGE = 100  # parent links followed at most (a chain of resumes, not a cycle)
# Built once and run with new parameters for each (job, metric) of a page: building a
# statement costs more than running this one.
_LATEST_VALUE = (select(col(Metric.step), col(Metric.value))
                 .where(col(Metric.job_id) == bindparam("job"),
                        col(Metric.name) == bindparam("name"), ~col(Metric.superseded))
                 .order_by(col(Metric.step).desc(), col(Metric.attempt).desc(),
                           col(Metric.id).desc())
                 .limit(1))
_RECENT_POINTS = (select(col(Metric.step), col(Metric.attempt), col(Metric.at))
                  .where(col(Metric.job_id) == bindparam("job"),
                         col(Metric.name) == bindparam("name"), ~col(Metric.superseded))
                  .order_by(col(Metric.step).desc(), col(Metric.attempt).desc(),
                            col(Metric.id).desc())
                  .limit(bindparam("points")))
_METRIC_NAMES = text(
    "WITH RECURSIVE names(name) AS ("
    " SELECT min(name) FROM metrics WHERE job_id = :job"
    " UNION ALL"
    " SELECT (SELECT min(m.name) FROM metrics m WHERE m.job_id = :job AND m.name > names.name)"
    " FROM names WHERE names.name IS NOT NULL)"
    " SELECT name FROM names")


@dataclass
class Series:
    """One metric's points, as columns (a chart wants arrays, and 100,000 small objects
    cost more than the query)."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    superseded: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)


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

    def jobs_by_ids(self, job_ids: Sequence[int]) -> list[Job]:
        """These jobs, in the order given (ids with no job are left out)."""
        if not job_ids:
            return []
        query = select(Job).where(col(Job.id).in_(list(job_ids)))
        with self._read() as session:
            found = {int(j.id or 0): j for j in session.scalars(query)}
        return [found[i] for i in job_ids if i in found]

    def job_counts(self, owner: str | None = None) -> dict[JobState, int]:
        """How many jobs are in each state (states with none are left out)."""
        query = select(col(Job.state), func.count()).group_by(col(Job.state))
        if owner is not None:
            query = query.where(col(Job.owner) == owner)
        with self._read() as session:
            return {JobState(state): int(n) for state, n in session.execute(query)}

    def job_owners(self, limit: int = 500) -> list[str]:
        """Owners of jobs, alphabetically."""
        query = select(col(Job.owner)).distinct().order_by(col(Job.owner)).limit(limit)
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
            conn = session.connection()
            for job_id, names in wanted.items():
                for name in names:
                    row = conn.execute(_LATEST_VALUE, {"job": job_id, "name": name}).first()
                    if row is not None:
                        found[job_id][name] = (int(row[0]), float(row[1]))
        return found

    def recent_points(self, job_ids: Sequence[int], name: str,
                      points: int) -> dict[int, list[tuple[int, int, datetime]]]:
        """job id -> (step, attempt, recorded at) of its latest `points` live values of
        `name`, newest first: a job's recent pace (orchestrator.progress). One short
        backward scan of the (job_id, name, step) index per job."""
        found: dict[int, list[tuple[int, int, datetime]]] = {}
        with self._read() as session:
            for job_id in job_ids:
                rows = session.execute(_RECENT_POINTS, {"job": job_id, "name": name,
                                                        "points": points})
                found[job_id] = [(int(step), int(attempt), at) for step, attempt, at in rows]
        return found

    def metric_names(self, job_ids: Sequence[int]) -> list[str]:
        """The names of every metric these jobs recorded, alphabetically. A skip scan: one
        index seek per name, however many values each has (a DISTINCT would read them all)."""
        names: set[str] = set()
        with self._read() as session:
            conn = session.connection()
            for job_id in job_ids:
                names.update(n for (n,) in conn.execute(_METRIC_NAMES, {"job": job_id})
                             if n is not None)
        return sorted(names)

    def metric_series(self, job_id: int, names: Sequence[str], *,
                      after_step: int | None = None, max_step: int | None = None,
                      include_superseded: bool = False) -> dict[str, Series]:
        """name -> the job's points of that metric by step, with step in
        (`after_step`, `max_step`]. Live points only, unless `include_superseded`. One
        range scan of the (job_id, name, step) index per name."""
        series = {name: Series() for name in names}
        with self._read() as session:
            conn = session.connection()
            for name in names:
                columns: list[Any] = [col(Metric.step), col(Metric.value)]
                if include_superseded:
                    columns.append(col(Metric.superseded))
                query = select(*columns).where(col(Metric.job_id) == job_id,
                                               col(Metric.name) == name)
                if after_step is not None:
                    query = query.where(col(Metric.step) > after_step)
                if max_step is not None:
                    query = query.where(col(Metric.step) <= max_step)
                if not include_superseded:
                    query = query.where(~col(Metric.superseded))
                result = conn.execute(query.order_by(col(Metric.step), col(Metric.attempt),
                                                     col(Metric.id)))
                # A series can be 100,000 rows: read them as the driver's plain tuples (a
                # third of the time of building Row objects); the columns need no conversion
                # beyond bool() for SQLite's 0/1.
                rows = result.cursor.fetchall() if result.cursor is not None else []
                result.close()
                if not rows:
                    continue
                found = Series()
                if include_superseded:
                    steps, values, superseded = zip(*rows, strict=True)
                    found.superseded = list(map(bool, superseded))
                else:
                    steps, values = zip(*rows, strict=True)
                    found.superseded = [False] * len(steps)
                found.steps, found.values = list(steps), list(values)
                series[name] = found
        return series

    def metric_counts(self, job_id: int, names: Sequence[str], *,
                      include_superseded: bool = False) -> dict[str, int]:
        """name -> how many values of it the job has (live ones unless asked)."""
        query = (select(col(Metric.name), func.count())
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
        query = select(col(Job.id)).where(col(Job.parent_job_id) == job_id).order_by(col(Job.id))
        with self._read() as session:
            return [int(i or 0) for i in session.scalars(query)]
