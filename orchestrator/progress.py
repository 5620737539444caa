"""The one definition of a job's progress: step of total, how long it waited and ran, an ETA
from its recent pace, and why it waits. The API (`orch list`, `orch status`), the CLI's live
progress and the dashboard's rows all take it from here, so they never disagree.

The ETA comes from the job's recent steps per second: the last few `train_loss` points of its
current attempt and the times the store recorded them, not the whole run's average (which
counts loading the model, evaluations long past, and a retried attempt's restart). Without
two such points recorded at different times there is no ETA.

Cheap to import (the CLI formats durations with it); the store and tables are only named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from orchestrator.states import JobState

if TYPE_CHECKING:
    from orchestrator.models import Job
    from orchestrator.scheduler import Scheduler
    from orchestrator.store import Store

# The metric a job is judged by, per objective: what `best_metric` usually names.
HEADLINE = {"clm": "eval_loss", "mlm": "eval_accuracy", "seq2seq": "eval_rougeL"}
# The metric whose recorded times give the pace: logged every `logging_steps`.
PACE_METRIC = "train_loss"
# How many of its latest points the pace is measured over.
PACE_POINTS = 10
# Why a pending job is not running yet (the scheduler explains queued ones).
PENDING_REASON = "admitted; waiting for Ray to start its workers"

# (step, attempt, recorded at) of a job's latest PACE_METRIC points, newest first.
PacePoint = tuple[int, int, datetime]


def headline(objective: str) -> str:
    return HEADLINE.get(objective, "eval_loss")


def progress_metrics(objective: str) -> list[str]:
    """The metrics whose latest values a job's progress (and a row of a job list) needs."""
    return ["train_loss", headline(objective), "total_steps"]


@dataclass(frozen=True)
class Progress:
    step: int | None  # the latest step the job recorded a metric at
    total: int | None  # the step training ends at
    queued_for: float | None  # seconds in the queue (until it started, or so far)
    ran_for: float | None  # seconds since it started (until it ended, or so far)
    steps_per_second: float | None  # the recent pace
    eta_seconds: float | None  # to the last step at the recent pace; only while running
    waiting_reason: str | None  # why a queued or pending job is not running yet


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def timing(job: Job, now: datetime) -> dict[str, float | None]:
    """How long the job waited in the queue and how long it has run (so far)."""
    if job.started_at is None:
        return {"queued_for": _seconds(job.created_at, job.finished_at or now), "ran_for": None}
    return {"queued_for": _seconds(job.created_at, job.started_at),
            "ran_for": _seconds(job.started_at, job.finished_at or now)}


def total_steps(job: Job, latest: Mapping[str, tuple[int, float]]) -> int | None:
    """The run's own count (the Trainer's max_steps, recorded at its start), else the
    spec's `training.max_steps`."""
    if "total_steps" in latest:
        return int(latest["total_steps"][1])
    max_steps = (job.spec.get("training") or {}).get("max_steps")
    return int(max_steps) if isinstance(max_steps, int) and max_steps > 0 else None


def steps_per_second(points: Sequence[PacePoint]) -> float | None:
    """The pace over the given points (newest first) of the newest point's attempt: a
    retried attempt starts over from a checkpoint, so an older attempt's points would
    count its restart as training time. None without two points at different times (the
    worker sends its metrics in batches, so neighbours may share a time)."""
    if not points:
        return None
    attempt = points[0][1]
    same = [p for p in points if p[1] == attempt]
    newest, oldest = same[0], same[-1]
    elapsed = (newest[2] - oldest[2]).total_seconds()
    steps = newest[0] - oldest[0]
    if elapsed <= 0 or steps <= 0:
        return None
    return steps / elapsed


def eta_seconds(step: int | None, total: int | None, pace: float | None) -> float | None:
    if step is None or total is None or not pace:
        return None
    return max(0, total - step) / pace


def progress_of(job: Job, latest: Mapping[str, tuple[int, float]], pace: Sequence[PacePoint],
                wait_reason: str | None, now: datetime) -> Progress:
    """A job's progress from what the store holds: `latest` (name -> (step, value)) of at
    least `progress_metrics`, its latest PACE_METRIC points, and the scheduler's reason
    when it is queued."""
    state = JobState(job.state)
    steps = [latest[name][0] for name in progress_metrics(job.objective) if name in latest]
    step = max(steps) if steps else None
    total = total_steps(job, latest)
    rate = steps_per_second(pace) if state == JobState.RUNNING else None
    if state == JobState.QUEUED:
        reason = wait_reason
    elif state == JobState.PENDING:
        reason = PENDING_REASON
    else:
        reason = None
    times = timing(job, now)
    return Progress(step=step, total=total, queued_for=times["queued_for"],
                    ran_for=times["ran_for"], steps_per_second=rate,
                    eta_seconds=eta_seconds(step, total, rate), waiting_reason=reason)


def progress_of_jobs(store: Store, scheduler: Scheduler, jobs: Sequence[Job], now: datetime,
                     latest: Mapping[int, Mapping[str, tuple[int, float]]] | None = None
                     ) -> dict[int, Progress]:
    """The progress of a page of jobs, in a bounded number of index reads: one latest value
    per (job, metric), the pace points of the running jobs only, one walk of the queue.
    `latest` when the caller already read it (with at least `progress_metrics`)."""
    ids = [int(j.id or 0) for j in jobs]
    if latest is None:
        latest = store.latest_values({int(j.id or 0): progress_metrics(j.objective) for j in jobs})
    running = [i for i, j in zip(ids, jobs, strict=True) if j.state == JobState.RUNNING]
    pace = store.recent_points(running, PACE_METRIC, PACE_POINTS) if running else {}
    queued = [j for j in jobs if j.state == JobState.QUEUED]
    reasons = scheduler.wait_reasons(queued) if queued else {}
    return {i: progress_of(j, latest.get(i, {}), pace.get(i, []), reasons.get(i), now)
            for i, j in zip(ids, jobs, strict=True)}


# -- for people ------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    """4m12s, 1h05m, 2d03h: two units at most, so a column stays narrow."""
    if seconds is None:
        return ""
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def ago(moment: datetime, now: datetime) -> str:
    """How long ago, in words a column can hold: "just now", "42s ago", "3 min ago",
    "5 h ago", "4 d ago"."""
    seconds = (now - moment).total_seconds()
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def step_of(step: int | None, total: int | None) -> str:
    """120/300, or 120 when the total is unknown."""
    if step is None:
        return ""
    return f"{step}/{total}" if total else str(step)
