"""The reporting API of workers: how a running attempt reads its job and records what
happens, without any database credential.

Every route needs the attempt's token (`Authorization: Bearer orch_w_...`), which the
control plane made at admission and put in that attempt's Ray Job only. It names one
attempt of one job, so nothing here takes a job id: a worker can read and write its own
attempt and nothing else, and only while that attempt is live.

Workers retry a report until it is answered (the control plane may be restarting), so every
route is safe to call twice: metrics are recorded once per (attempt, step, name),
checkpoints once per path, state moves are compare-and-sets, and events carry a key.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from orchestrator import joblogs
from orchestrator.api import (
    WorkerCheckpoint,
    WorkerCheckpointRef,
    WorkerCheckpointResponse,
    WorkerDeleted,
    WorkerEvent,
    WorkerFinished,
    WorkerJob,
    WorkerLogsResponse,
    WorkerMetrics,
    WorkerMetricsResponse,
    WorkerStarted,
    WorkerStartedResponse,
)
from orchestrator.auth import Worker, current_worker, plane_of
from orchestrator.errors import InvalidRequest
from orchestrator.models import AttemptOutcome, CheckpointKind
from orchestrator.spec import spec_from_dict
from orchestrator.states import ACTIVE_STATES, JobState
from orchestrator.store import Supersede

router = APIRouter(prefix="/worker")
CurrentWorker = Annotated[Worker, Depends(current_worker)]
MAX_LOG_CHUNK = 1024 * 1024


@router.get("/job", response_model=WorkerJob)
def job(worker: CurrentWorker, request: Request) -> WorkerJob:
    store = plane_of(request).store
    ckpts = [c for c in reversed(store.checkpoints(worker.job_id))
             if c.kind == CheckpointKind.CHECKPOINT]
    return WorkerJob(
        job_id=worker.job_id, attempt=worker.attempt.attempt, state=worker.job.state,
        spec=worker.job.spec, artifact_dir=worker.job.artifact_dir,
        checkpoints=[WorkerCheckpointRef(step=c.step, path=c.path) for c in ckpts],
        resume_from=worker.job.resume_from, parent_job_id=worker.job.parent_job_id)


@router.post("/started", response_model=WorkerStartedResponse)
def started(body: WorkerStarted, worker: CurrentWorker, request: Request) -> WorkerStartedResponse:
    """The attempt's training starts (pending -> running), or a restarted worker group starts
    it again within the attempt. Either way the metrics after `start_step` are superseded in
    the same transaction: the run now starting writes them again."""
    store = plane_of(request).store
    supersede = Supersede(after_step=body.start_step or None, restated=body.restated)
    details = {**body.details, "attempt": worker.attempt.attempt, "resume_step": body.start_step}
    if body.restart:
        go = store.add_event(worker.job_id, body.reason, details=details,
                             request=(_attempt_id(worker), body.key), supersede=supersede)
    else:
        go = store.transition(worker.job_id, JobState.RUNNING, body.reason,
                              expected=[JobState.PENDING], details=details, supersede=supersede)
        # A retry of a start that went through: the job is already running this attempt.
        go = go or store.require_job(worker.job_id).state == JobState.RUNNING
    return WorkerStartedResponse(go=go, state=store.require_job(worker.job_id).state)


@router.post("/events", status_code=204)
def event(body: WorkerEvent, worker: CurrentWorker, request: Request) -> None:
    plane_of(request).store.add_event(worker.job_id, body.reason, details=body.details,
                                      request=(_attempt_id(worker), body.key))


@router.post("/metrics", response_model=WorkerMetricsResponse)
def metrics(body: WorkerMetrics, worker: CurrentWorker, request: Request) -> WorkerMetricsResponse:
    added = plane_of(request).store.add_metrics(worker.job_id, worker.attempt.attempt, body.rows)
    return WorkerMetricsResponse(added=added)


@router.post("/checkpoints", response_model=WorkerCheckpointResponse)
def checkpoint(body: WorkerCheckpoint, worker: CurrentWorker,
               request: Request) -> WorkerCheckpointResponse:
    """Register a complete checkpoint and apply the job's retention rule; the answer names
    the checkpoints whose files the worker should now delete."""
    _inside_job(worker, body.path)
    rules = spec_from_dict(worker.job.spec).checkpoints
    assert rules.best_mode is not None  # the spec fills it in
    row, doomed = plane_of(request).store.register_checkpoint(
        worker.job_id, attempt=worker.attempt.attempt, step=body.step, path=body.path,
        size_bytes=body.size_bytes, metrics=body.metrics, keep_last=rules.keep_last,
        best_metric=rules.best_metric, best_mode=rules.best_mode)
    assert row.id is not None
    return WorkerCheckpointResponse(
        id=row.id, delete=[WorkerCheckpointRef(step=c.step, path=c.path) for c in doomed],
        delete_ids=[c.id for c in doomed if c.id is not None])


@router.post("/checkpoints/deleted", status_code=204)
def deleted(body: WorkerDeleted, worker: CurrentWorker, request: Request) -> None:
    plane_of(request).store.mark_checkpoints_deleted(worker.job_id, body.ids)


@router.post("/cause", status_code=204)
def cause(body: WorkerEvent, worker: CurrentWorker, request: Request) -> None:
    """The driver's own words for why its attempt is about to end badly (e.g. "worker
    process died: ..."), kept as the attempt's cause for the control plane to use when it
    settles the attempt (retry or fail)."""
    plane_of(request).store.set_attempt_cause(worker.job_id, worker.attempt.attempt,
                                              body.reason)


@router.post("/finished", response_model=WorkerStartedResponse)
def finished(body: WorkerFinished, worker: CurrentWorker, request: Request) -> WorkerStartedResponse:
    """The attempt ended: succeeded (with its final model), or failed for an error in the
    job itself, which is never retried."""
    plane = plane_of(request)
    store = plane.store
    if body.outcome == "succeeded":
        if body.final is None:
            raise InvalidRequest("finished: a succeeded attempt reports its final model")
        _inside_job(worker, body.final.path)
        store.add_checkpoint(worker.job_id, attempt=worker.attempt.attempt, step=body.final.step,
                             path=body.final.path, size_bytes=body.final.size_bytes,
                             metrics=body.final.metrics, kind=CheckpointKind.FINAL)
        store.transition(worker.job_id, JobState.SUCCEEDED, body.reason,
                         expected=[JobState.RUNNING], details=body.details,
                         attempt_ended=(AttemptOutcome.SUCCEEDED, None))
    else:
        error = body.error or body.reason
        store.transition(worker.job_id, JobState.FAILED, body.reason,
                         expected=list(ACTIVE_STATES), error=error, details=body.details,
                         attempt_ended=(AttemptOutcome.FAILED, error))
    # Its resources are free: the move wakes the scheduler (the store announces it), so the
    # next queued job is admitted now, not at the next tick.
    return WorkerStartedResponse(go=False, state=store.require_job(worker.job_id).state)


@router.post("/logs", response_model=WorkerLogsResponse)
async def logs(request: Request, offset: Annotated[int, Query(ge=0)],
               worker: CurrentWorker) -> WorkerLogsResponse:
    """Append a chunk of the attempt's log (the raw request body, starting at byte
    `offset`)."""
    data = await request.body()
    if len(data) > MAX_LOG_CHUNK:
        raise InvalidRequest(f"a log chunk is at most {MAX_LOG_CHUNK} bytes")
    size = await run_in_threadpool(joblogs.append_chunk, plane_of(request).settings.home_dir(),
                                   worker.job_id, worker.attempt.attempt, offset, data)
    return WorkerLogsResponse(size=size)


def _attempt_id(worker: Worker) -> int:
    assert worker.attempt.id is not None
    return worker.attempt.id


def _inside_job(worker: Worker, path: str) -> None:
    """A worker registers files under its own job's location only."""
    from workers.storage import job_artifacts

    spec = spec_from_dict(worker.job.spec)
    root = job_artifacts(spec.checkpoints.storage, worker.job_id, worker.job.artifact_dir).root
    if path != root and not path.startswith(root.rstrip("/") + "/"):
        raise InvalidRequest(f"path {path!r} is outside the job's location {root}")
    if "/../" in f"{path}/" or "/./" in f"{path}/":
        raise InvalidRequest(f"path {path!r}: no . or .. components")
