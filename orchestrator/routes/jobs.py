"""The jobs API people use (through the CLI): submit, list, inspect, cancel, resume.

Who may do what: any authenticated user reads every job (teammates see each other's work);
a job is submitted as the authenticated user, within their priority limit and GPU cap;
cancel and resume are for the job's owner or an admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from orchestrator import cluster
from orchestrator.api import (
    AttemptView,
    CancelResponse,
    CheckpointsResponse,
    CheckpointView,
    ClusterInfo,
    EventView,
    JobDetail,
    JobSummary,
    LogsResponse,
    MetricsResponse,
    MetricValue,
    MetricView,
    SubmitRequest,
)
from orchestrator.auth import (
    User,
    current_user,
    effective_gpu_cap,
    effective_max_priority,
    plane_of,
)
from orchestrator.errors import Conflict, Forbidden, InvalidRequest, SpecError
from orchestrator.joblogs import read_logs
from orchestrator.models import Checkpoint, CheckpointKind, Job, utcnow
from orchestrator.preflight import preflight
from orchestrator.progress import progress_of_jobs
from orchestrator.sandbox import Rules, make_job_dir, new_job_dirs
from orchestrator.spec import JobSpec, spec_from_dict
from orchestrator.states import JobState
from orchestrator.watch import FALLBACK_RECHECK_S

if TYPE_CHECKING:
    from orchestrator.server import ControlPlane

log = logging.getLogger("orch.server")
router = APIRouter(dependencies=[Depends(current_user)])
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
JobId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="a job id")]
CurrentUser = Annotated[User, Depends(current_user)]


def parse_states(text: str | None) -> list[JobState] | None:
    """`running,queued` -> the states; an unknown name is a 422 that lists the valid ones."""
    if not text:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    valid = [s.value for s in JobState]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise InvalidRequest(f"state: unknown {', '.join(unknown)}; use one or more of "
                             f"{', '.join(valid)}")
    return [JobState(n) for n in names]


def priority_problem(priority: int, user: User, limit: int) -> str | None:
    """Why `user` may not submit at this priority, or None."""
    if not INT32_MIN <= priority <= INT32_MAX:
        return f"priority: must fit a 32-bit integer ({INT32_MIN} to {INT32_MAX}), got {priority}"
    if priority > limit:
        return (f"priority: {priority} is above {user.name}'s limit of {limit}; use at most "
                f"{limit} (an admin sets the limit: ORCH_MAX_PRIORITY, or the user's "
                "--max-priority)")
    return None


def may_change(user: User, job: Job, action: str) -> None:
    """Only the job's owner or an admin may cancel or resume it; anyone else is refused
    (and the refusal is logged), before anything changes."""
    if user.is_admin or job.owner == user.name:
        return
    log.warning("%s refused: %s may not %s job %s of %s", action, user.name, action, job.id,
                job.owner)
    raise Forbidden(f"job {job.id} belongs to {job.owner}; only its owner or an admin may "
                    f"{action} it")


def _artifact_root(spec: JobSpec) -> Path | None:
    """Where the job's artifact dir goes: the storage path, or (storage a URL, or none) the
    default root on this node, which then holds only logs and staging."""
    storage = spec.checkpoints.storage
    return Path(storage) if storage and "://" not in storage else None


@router.get("/cluster", response_model=ClusterInfo)
def cluster_info(request: Request) -> ClusterInfo:
    plane = plane_of(request)
    cap, free = plane.scheduler.capacity, plane.scheduler.free()
    return ClusterInfo(gpus=cap.gpus, cpus=cap.cpus, nodes=cap.nodes, free_gpus=free.gpus,
                       free_cpus=free.cpus, jobs_url=getattr(plane.executor, "jobs_url", None))


@router.post("/jobs", status_code=201, response_model=JobSummary)
def submit(body: SubmitRequest, request: Request, user: CurrentUser) -> JobSummary:
    plane = plane_of(request)
    spec = spec_from_dict(body.spec)
    # The cluster's GPUs are not this machine's unless the cluster is local.
    problems = preflight(spec, Rules.from_settings(plane.settings),
                         this_machine_trains=cluster.target().local)
    # The store's gpus/cpus are the whole job's (every worker's), which admission counts.
    gpus, cpus = spec.resources.gpus, spec.resources.total_cpus
    if reason := priority_problem(spec.priority, user,
                                  effective_max_priority(user, plane.settings)):
        problems.append(reason)
    if reason := plane.scheduler.never_fits(gpus, cpus, owner=user.name,
                                            gpu_cap=effective_gpu_cap(user, plane.settings)):
        problems.append(reason)
    if reason := plane.scheduler.multi_node_problem(spec):
        problems.append(reason)
    if problems:
        raise SpecError(problems)
    job = create_job(
        plane, name=spec.name, objective=spec.objective.value, owner=user.name,
        spec=spec.to_dict(), spec_yaml=body.spec_yaml, gpus=gpus, cpus=cpus,
        priority=spec.priority, max_attempts=spec.retries + 1,
        artifact_root=_artifact_root(spec),
    )
    plane.wake()
    return JobSummary.of(job)


def create_job(plane: ControlPlane, **fields: Any) -> Job:
    """A new job row and its directories, or neither. The spec is checked against the
    sandbox rules first (a resumed job's too: the rules may have tightened since). The
    directories (the artifact dir, and the server's `$ORCH_HOME/jobs/<id>` for its logs
    when that is elsewhere) are made 0700 and exclusively inside the row's transaction: one
    that already exists refuses the job and rolls the row back."""
    Rules.from_settings(plane.settings).require(spec_from_dict(fields["spec"]))
    own = plane.settings.home_dir() / "jobs"

    def make_dirs(job: Job) -> None:
        for path in dict.fromkeys([Path(job.artifact_dir), own / str(job.id)]):
            make_job_dir(path, made)

    with new_job_dirs() as made:
        return plane.store.create_job(**fields, on_created=make_dirs)


@router.get("/jobs", response_model=list[JobSummary])
def list_jobs(request: Request, state: str | None = None, owner: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[JobSummary]:
    plane = plane_of(request)
    jobs = plane.store.list_jobs(states=parse_states(state), owner=owner, limit=limit)
    progress = progress_of_jobs(plane.store, plane.scheduler, jobs, utcnow())
    return [JobSummary.of(j, progress[int(j.id or 0)]) for j in jobs]


# `--wait` asks for a job's status with the state it last saw and how long it may wait:
# the answer comes as soon as the state differs, or after `wait` seconds. So the CLI hears of
# the end at once, for one request per poll interval. The wait is asynchronous (a waiting
# client holds no server thread) and idle: the control plane's JobWatch wakes it when this
# process moves the job; it rereads the state only every FALLBACK_RECHECK_S, for moves made
# by another server on the same database.
MAX_WAIT_S = 30.0


@router.get("/jobs/{job_id}", response_model=JobDetail)
async def status(
    job_id: JobId, request: Request,
    changed_from: Annotated[JobState | None, Query(
        description="answer once the job's state is no longer this one (or after `wait`)")] = None,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, allow_inf_nan=False,
                                 description="seconds to wait for `changed_from` to change")] = 0,
) -> JobDetail:
    plane = plane_of(request)
    if changed_from is not None and wait > 0:
        deadline = time.monotonic() + wait
        with plane.watch.watching(job_id) as changed:  # before the read: no change missed
            while (await run_in_threadpool(plane.store.job_state, job_id) == changed_from
                   and (left := deadline - time.monotonic()) > 0):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(FALLBACK_RECHECK_S, left))
                changed.clear()
    return await run_in_threadpool(job_detail, plane, job_id)


def job_detail(plane: ControlPlane, job_id: int) -> JobDetail:
    job = plane.store.require_job(job_id)
    latest = plane.store.latest_metrics(job_id)
    progress = progress_of_jobs(plane.store, plane.scheduler, [job], utcnow(),
                                {job_id: latest})[job_id]
    return JobDetail(
        **JobSummary.of(job, progress).model_dump(),
        spec=job.spec,
        events=[EventView.of(e) for e in plane.store.events(job_id)],
        attempt_history=[AttemptView.of(a) for a in plane.store.attempts(job_id)],
        metrics={name: MetricValue(step=step, value=value) for name, (step, value) in latest.items()},
        wait_reason=progress.waiting_reason if job.state == JobState.QUEUED else None,
    )


@router.post("/jobs/{job_id}/cancel", response_model=CancelResponse)
def cancel(job_id: JobId, request: Request, user: CurrentUser) -> CancelResponse:
    plane = plane_of(request)
    may_change(user, plane.store.require_job(job_id), "cancel")
    # The move wakes the scheduler (the store announces it): its resources are free now.
    changed, message = plane.scheduler.cancel(job_id, f"cancelled by {user.name}",
                                              user=user.name)
    return CancelResponse(cancelled=changed, message=message,
                          job=JobSummary.of(plane.store.require_job(job_id)))


@router.post("/jobs/{job_id}/resume", status_code=201, response_model=JobSummary)
def resume(job_id: JobId, request: Request, user: CurrentUser) -> JobSummary:
    """A failed or cancelled job continues as a new job from its latest checkpoint.

    The old job keeps its terminal state (terminal states never change); the new one
    records where it came from (`parent_job_id`, `resume_from`). It belongs to the old
    job's owner, whoever resumed it (an admin, say): the owner's cap and history hold; its
    first event names who resumed it.
    """
    plane = plane_of(request)
    old = plane.store.require_job(job_id)
    may_change(user, old, "resume")
    if old.state not in (JobState.FAILED, JobState.CANCELLED):
        raise Conflict(f"job {job_id} is {old.state.value}; only failed or cancelled jobs can "
                       "be resumed")
    latest = latest_complete_checkpoint(plane.store.checkpoints(job_id))
    if latest is None:
        raise Conflict(f"job {job_id} has no complete checkpoint to resume from; submit its "
                       "spec again instead")
    on_behalf = f" for {old.owner}" if old.owner != user.name else ""
    job = create_job(
        plane, name=old.name, objective=old.objective, owner=old.owner, spec=old.spec,
        spec_yaml=old.spec_yaml, gpus=old.gpus, cpus=old.cpus, priority=old.priority,
        max_attempts=old.max_attempts, parent_job_id=job_id, resume_from=latest[1],
        artifact_root=_artifact_root(spec_from_dict(old.spec)),
        reason=(f"submitted by {user.name}{on_behalf}: resume of job {job_id} from step "
                f"{latest[0]}"),
        details={"user": user.name, "resumes": job_id, "resume_step": latest[0],
                 "resume_from": latest[1]},
    )
    plane.wake()
    return JobSummary.of(job)


def latest_complete_checkpoint(checkpoints: Sequence[Checkpoint]) -> tuple[int, str] | None:
    """(step, path) of the newest resumable checkpoint whose files are still there."""
    from workers.storage import is_complete_checkpoint

    for ckpt in reversed(checkpoints):  # newest step first
        if ckpt.kind == CheckpointKind.CHECKPOINT and is_complete_checkpoint(ckpt.path):
            return ckpt.step, ckpt.path
    return None


@router.get("/jobs/{job_id}/metrics", response_model=MetricsResponse)
def metrics(job_id: JobId, request: Request, name: str | None = None,
            all: bool = False) -> MetricsResponse:
    plane = plane_of(request)
    job = plane.store.require_job(job_id)
    rows = plane.store.metrics(job_id, name=name, include_superseded=all)
    return MetricsResponse(id=job_id, metrics=[MetricView.of(m) for m in rows],
                           objective=job.objective)


@router.get("/jobs/{job_id}/checkpoints", response_model=CheckpointsResponse)
def checkpoints(job_id: JobId, request: Request, all: bool = False) -> CheckpointsResponse:
    plane = plane_of(request)
    job = plane.store.require_job(job_id)
    rows = plane.store.checkpoints(job_id, include_deleted=all)
    return CheckpointsResponse(id=job_id, checkpoints=[CheckpointView.of(c) for c in rows],
                               objective=job.objective)


@router.get("/jobs/{job_id}/logs", response_model=LogsResponse)
def logs(job_id: JobId, request: Request,
         offset: Annotated[int, Query(ge=0)] = 0) -> LogsResponse:
    plane = plane_of(request)
    job: Job = plane.store.require_job(job_id)
    # The control plane's copy first: it outlives the Ray cluster. Ray's own logs are the
    # fallback for a job whose driver has not sent anything yet.
    text = read_logs(plane.settings.home_dir(), job_id)
    if text is None:
        text = (plane.executor.logs(job.ray_submission_id) if job.ray_submission_id
                else None) or ""
    return LogsResponse(id=job_id, state=job.state, offset=len(text), text=text[offset:])
