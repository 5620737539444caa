"""What the dashboard shows, as plain JSON-ready data: job rows, a job's detail, its curves
(a resumed job's chain joined, downsampled), the cluster and its queue.

Pages and their live updates read the same functions, so a row looks the same whether the
page was just loaded or refreshed itself a minute later.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.auth import User
from orchestrator.downsample import downsample
from orchestrator.models import Checkpoint, CheckpointKind, Job, utcnow
from orchestrator.progress import HEADLINE, Progress, headline, progress_metrics, progress_of_jobs
from orchestrator.states import JobState

if TYPE_CHECKING:
    from orchestrator.server import ControlPlane
    from orchestrator.store import Store

# Lower is better for these; for the rest higher is.
LOWER_IS_BETTER = ("loss", "perplexity")
# Bookkeeping the Trainer logs with every evaluation; not a quality metric to chart.
EVAL_TIMING = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
MAX_POINTS = 1000  # per series on a chart
QUEUE_ROWS = 50  # queued jobs the cluster page lists
__all__ = ["HEADLINE", "headline"]  # the dashboard's names for orchestrator.progress's


def may_act(user: User, job: Job) -> bool:
    """Cancel and resume are for the job's owner and admins (the API enforces the same
    rule; the page only hides buttons that would be refused)."""
    return user.is_admin or user.name == job.owner


def first_line(text: str | None, limit: int = 300) -> str | None:
    """The first line of a (possibly multi-line) message, for a table cell."""
    lines = (text or "").strip().splitlines()
    return lines[0][:limit] if lines else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def job_row(job: Job, latest: dict[str, tuple[int, float]], user: User,
            progress: Progress) -> dict[str, Any]:
    """One job as the jobs list shows it (its progress as the API and CLI give it)."""
    main = headline(job.objective)
    state = JobState(job.state)
    return {
        "id": job.id, "name": job.name, "state": state.value, "owner": job.owner,
        "objective": job.objective, "model": str(job.spec.get("model") or ""),
        "gpus": job.gpus, "cpus": job.cpus, "priority": job.priority,
        "step": progress.step, "total_steps": progress.total,
        "train_loss": latest["train_loss"][1] if "train_loss" in latest else None,
        "headline": main, "headline_value": latest[main][1] if main in latest else None,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at), "queued_for": progress.queued_for,
        "ran_for": progress.ran_for, "eta_seconds": progress.eta_seconds,
        "wait_reason": progress.waiting_reason, "error": first_line(job.error),
        "attempts": job.attempts, "parent_job_id": job.parent_job_id,
        "can_cancel": not state.is_terminal and may_act(user, job),
    }


def job_rows(plane: ControlPlane, jobs: Sequence[Job], user: User) -> list[dict[str, Any]]:
    latest = plane.store.latest_values({int(j.id or 0): progress_metrics(j.objective)
                                        for j in jobs})
    progress = progress_of_jobs(plane.store, plane.scheduler, jobs, utcnow(), latest)
    return [job_row(j, latest.get(int(j.id or 0), {}), user, progress[int(j.id or 0)])
            for j in jobs]


# -- one job ---------------------------------------------------------------------------
def spec_text(job: Job) -> str:
    """The spec as the user wrote it (with any --set overrides noted), else as stored."""
    if job.spec_yaml.strip():
        return job.spec_yaml
    return yaml.safe_dump(job.spec, sort_keys=False)


def checkpoint_view(ckpt: Checkpoint, main: str) -> dict[str, Any]:
    shown = {k: v for k, v in ckpt.metrics.items()
             if k in (main, "eval_loss") or k.startswith("eval_") and k not in EVAL_TIMING}
    return {
        "id": ckpt.id, "step": ckpt.step, "kind": CheckpointKind(ckpt.kind).value,
        "path": ckpt.path, "size_bytes": ckpt.size_bytes, "is_best": ckpt.is_best,
        "is_latest": ckpt.is_latest, "deleted": ckpt.deleted, "attempt": ckpt.attempt,
        "created_at": _iso(ckpt.created_at), "metrics": shown,
    }


def job_detail(plane: ControlPlane, job: Job, user: User) -> dict[str, Any]:
    """Everything the job page shows besides its curves and logs."""
    store = plane.store
    assert job.id is not None
    row = job_rows(plane, [job], user)[0]
    checkpoints = store.checkpoints(job.id)
    state = JobState(job.state)
    resumable = any(c.kind == CheckpointKind.CHECKPOINT for c in checkpoints)
    events = [{
        "at": _iso(e.at), "from": e.from_state.value if e.from_state else None,
        "to": e.to_state.value, "reason": e.reason,
        "user": (e.details or {}).get("user"), "attempt": (e.details or {}).get("attempt"),
    } for e in store.events(job.id)]
    attempts = [{
        "attempt": a.attempt, "submission_id": a.ray_submission_id,
        "started_at": _iso(a.started_at), "ended_at": _iso(a.ended_at),
        "outcome": a.outcome.value if hasattr(a.outcome, "value") else str(a.outcome),
        "cause": first_line(a.cause),
    } for a in store.attempts(job.id)]
    return {
        **row,
        "error_full": job.error, "resume_from": job.resume_from,
        "artifact_dir": job.artifact_dir, "max_attempts": job.max_attempts,
        "events": events, "attempt_history": attempts,
        "checkpoints": [checkpoint_view(c, row["headline"]) for c in checkpoints],
        "resumed_by": store.resumed_by(job.id),
        "can_resume": state in (JobState.FAILED, JobState.CANCELLED) and resumable
        and may_act(user, job),
    }


# -- curves ----------------------------------------------------------------------------
_CHECKPOINT_STEP = re.compile(r"checkpoint-(\d+)/?$")


def resume_step(store: Store, job: Job) -> int | None:
    """The step a resumed job started from: recorded when it was created, else read from
    the checkpoint's directory name."""
    if job.parent_job_id is None:
        return None
    assert job.id is not None
    first = store.events(job.id)[:1]
    if first and isinstance((first[0].details or {}).get("resume_step"), int):
        return int((first[0].details or {})["resume_step"])
    found = _CHECKPOINT_STEP.search(job.resume_from or "")
    return int(found.group(1)) if found else None


def chart_names(names: Sequence[str]) -> list[str]:
    """The metrics worth a curve: losses, learning rate, gradient norm, every eval metric."""
    wanted = {"train_loss", "learning_rate", "grad_norm"}
    return [n for n in names
            if n in wanted or (n.startswith("eval_") and n not in EVAL_TIMING)]


def panels(names: Sequence[str], objective: str) -> list[dict[str, Any]]:
    """How the curves are grouped into charts: the losses together, then one chart each."""
    present = set(names)
    main = headline(objective)
    out: list[dict[str, Any]] = []
    losses = [n for n in ("train_loss", "eval_loss") if n in present]
    if losses:
        out.append({"id": "loss", "title": "Loss", "series": losses})
    for name, title in (("learning_rate", "Learning rate"), ("grad_norm", "Gradient norm")):
        if name in present:
            out.append({"id": name, "title": title, "series": [name]})
    evals = sorted((n for n in present if n.startswith("eval_") and n != "eval_loss"),
                   key=lambda n: (n != main, n))
    out.extend({"id": n, "title": n, "series": [n]} for n in evals)
    return out


def _bounded(steps: list[int], values: list[float], max_points: int) -> dict[str, list[Any]]:
    if any(later < earlier for earlier, later in zip(steps, steps[1:], strict=False)):
        # Jobs of a chain overlapping at a resume step: put the points in step order.
        pairs = sorted(zip(steps, values, strict=True), key=lambda p: p[0])
        steps, values = [p[0] for p in pairs], [p[1] for p in pairs]
    kept_steps, kept_values = downsample(steps, values, max_points)
    return {"steps": kept_steps, "values": kept_values}


def job_curves(store: Store, job: Job, *, include_superseded: bool = False,
               after_step: int | None = None,
               max_points: int = MAX_POINTS) -> dict[str, Any]:
    """The job's curves for charting, each at most `max_points` points.

    A resumed job is drawn with the chain of jobs it continues (`orch resume` makes a new
    job): each ancestor contributes its points up to the step its successor resumed from,
    so the curve reads as one run. An ancestor's points after that step were rolled back by
    the resume: with `include_superseded` they come back as a series of their own, with the
    job's own superseded points. With `after_step`, only the job's own live points after
    that step (a live chart's update).
    """
    assert job.id is not None
    chain = [job] if after_step is not None else store.lineage(job.id)
    names = chart_names(store.metric_names([int(j.id or 0) for j in chain]))
    live: dict[str, tuple[list[int], list[float]]] = {n: ([], []) for n in names}
    rolled_back: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    segments = []
    for i, member in enumerate(chain):
        assert member.id is not None
        # Where the next job of the chain took over (None: this is the job itself).
        cut = resume_step(store, chain[i + 1]) if i + 1 < len(chain) else None
        series = store.metric_series(member.id, names, after_step=after_step,
                                     include_superseded=include_superseded)
        for name, points in series.items():
            steps, values = live[name]
            if cut is None and not any(points.superseded):  # the common case: all of it
                steps.extend(points.steps)
                values.extend(points.values)
                continue
            for step, value, superseded in zip(points.steps, points.values, points.superseded,
                                               strict=True):
                if superseded or (cut is not None and step > cut):
                    rolled_back[name].append((step, value))
                else:
                    steps.append(step)
                    values.append(value)
        segments.append({"job_id": member.id, "name": member.name, "until_step": cut})
    counts = {n: len(steps) for n, (steps, _) in live.items()}
    curves = {n: _bounded(steps, values, max_points)
              for n, (steps, values) in live.items() if steps}
    extra = {}
    for name, old in rolled_back.items():
        if old and include_superseded:
            old.sort()
            extra[name] = _bounded([p[0] for p in old], [p[1] for p in old], max_points)
    last_step = max((steps[-1] for steps, _ in live.values() if steps), default=after_step)
    return {
        "job_id": job.id,
        "panels": panels([n for n in names if live[n][0] or rolled_back[n]], job.objective),
        "series": curves, "superseded": extra, "counts": counts, "max_points": max_points,
        "chain": segments, "last_step": last_step, "attempts": job.attempts,
        "state": JobState(job.state).value,
    }


def compare_curves(store: Store, jobs: Sequence[Job],
                   max_points: int = MAX_POINTS) -> dict[str, Any]:
    """Several jobs' curves on shared charts: one chart per metric, one series per job."""
    per_job = {int(j.id or 0): job_curves(store, j, max_points=max_points) for j in jobs}
    names: list[str] = []
    for curves in per_job.values():
        names.extend(n for n in curves["series"] if n not in names)
    mains = {headline(j.objective) for j in jobs}
    order = list(dict.fromkeys(["train_loss", "eval_loss", *sorted(mains), "learning_rate"]))
    ordered = [n for n in order if n in names] + sorted(n for n in names if n not in order)
    return {
        "jobs": [{"id": j.id, "name": j.name, "state": JobState(j.state).value,
                  "objective": j.objective, "owner": j.owner} for j in jobs],
        "metrics": ordered,
        "series": {job_id: c["series"] for job_id, c in per_job.items()},
        "counts": {job_id: c["counts"] for job_id, c in per_job.items()},
    }


# -- the cluster -------------------------------------------------------------------------
def cluster_view(plane: ControlPlane, user: User) -> dict[str, Any]:
    """Capacity and what is in use, the queue in admission order with why each job waits,
    and what each user holds against the per-user cap."""
    scheduler, store = plane.scheduler, plane.store
    cap, free = scheduler.capacity, scheduler.free()
    # The queue's order is the scheduler's; the rows shown are read in full.
    queue = store.jobs_by_ids([int(q.id or 0) for q in islice(scheduler.queue(), QUEUE_ROWS)])
    reasons = scheduler.wait_reasons(queue) if queue else {}
    counts = store.job_counts()
    now = utcnow()
    usage = sorted(store.usage().items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return {
        "capacity": {"gpus": cap.gpus, "cpus": cap.cpus, "nodes": cap.nodes},
        "in_use": {"gpus": cap.gpus - free.gpus, "cpus": cap.cpus - free.cpus},
        "jobs_url": getattr(plane.executor, "jobs_url", None),
        "counts": {s.value: counts.get(s, 0) for s in JobState},
        "queue": [{
            "position": i + 1, "id": j.id, "name": j.name, "owner": j.owner, "gpus": j.gpus,
            "cpus": j.cpus, "priority": j.priority, "reason": reasons.get(int(j.id or 0)),
            "queued_for": _seconds(j.created_at, now),
        } for i, j in enumerate(queue)],
        "queued_total": counts.get(JobState.QUEUED, 0),
        "user_gpu_cap": scheduler.user_gpu_cap,
        "usage": [{"owner": owner, "gpus": g, "cpus": c, "is_you": owner == user.name}
                  for owner, (g, c) in usage],
    }
