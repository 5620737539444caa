"""`orch server`: the control plane. Owns the store and the scheduling loop; serves the API.

The CLI talks to it over HTTP. Started locally on demand by the CLI (detached, so it
outlives the command), or run by a team as a service with `ORCH_API_TOKEN` set, in which
case every request must carry `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from orchestrator import cluster
from orchestrator.cluster import Capacity
from orchestrator.config import executor_kind
from orchestrator.executor import Executor, RayJobsExecutor, read_job_logs
from orchestrator.models import Attempt, Checkpoint, Job, JobEvent, Metric
from orchestrator.preflight import preflight, warm_up
from orchestrator.scheduler import Scheduler
from orchestrator.spec import JobSpec, SpecError, spec_from_dict
from orchestrator.states import JobState
from orchestrator.store import Store

log = logging.getLogger("orch.server")


class SubmitRequest(BaseModel):
    spec: dict[str, Any]  # validated and path-resolved by the client; validated again here
    spec_yaml: str = ""


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "objective": job.objective, "owner": job.owner,
        "state": job.state, "priority": job.priority, "gpus": job.gpus, "cpus": job.cpus,
        "attempts": job.attempts, "max_attempts": job.max_attempts, "error": job.error,
        "artifact_dir": job.artifact_dir, "parent_job_id": job.parent_job_id,
        "resume_from": job.resume_from,
        "ray_submission_id": job.ray_submission_id, "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
    }


def event_json(event: JobEvent) -> dict[str, Any]:
    return {"from": event.from_state, "to": event.to_state, "reason": event.reason,
            "at": _iso(event.at)}


def metric_json(metric: Metric) -> dict[str, Any]:
    return {"step": metric.step, "name": metric.name, "value": metric.value,
            "attempt": metric.attempt, "superseded": metric.superseded}


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {"attempt": attempt.attempt, "ray_submission_id": attempt.ray_submission_id,
            "started_at": _iso(attempt.started_at), "ended_at": _iso(attempt.ended_at),
            "outcome": attempt.outcome, "cause": attempt.cause}


def checkpoint_json(ckpt: Checkpoint) -> dict[str, Any]:
    return {"id": ckpt.id, "step": ckpt.step, "path": ckpt.path, "size_bytes": ckpt.size_bytes,
            "kind": ckpt.kind, "metrics": ckpt.metrics, "is_best": ckpt.is_best,
            "is_latest": ckpt.is_latest, "deleted": ckpt.deleted, "attempt": ckpt.attempt,
            "created_at": _iso(ckpt.created_at)}


class ControlPlane:
    """The store, the executor and the scheduler, plus the loop thread that drives them."""

    def __init__(self, store: Store, executor: Executor, capacity: Capacity,
                 interval: float = 0.5,
                 refresh_capacity: Callable[[], Capacity] | None = None) -> None:
        self.store = store
        cap = os.environ.get("ORCH_USER_GPU_CAP")
        self.scheduler = Scheduler(
            store, executor, capacity, user_gpu_cap=int(cap) if cap else None,
            cluster_loss_grace=float(os.environ.get("ORCH_CLUSTER_LOSS_GRACE", "30")),
        )
        self.executor = executor
        self.interval = interval
        self.refresh_capacity = refresh_capacity
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="orch-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Tick now rather than at the next interval (a job was submitted or cancelled)."""
        self._wake.set()

    def _loop(self) -> None:
        last_refresh = time.monotonic()
        while not self._stop.is_set():
            try:
                self.scheduler.tick()
                if self.refresh_capacity and time.monotonic() - last_refresh > 10:
                    last_refresh = time.monotonic()
                    self.scheduler.capacity = self.refresh_capacity()
            except Exception:
                log.exception("scheduler tick failed")
            self._wake.wait(self.interval)
            self._wake.clear()


def default_control_plane() -> ControlPlane:
    interval = float(os.environ.get("ORCH_SCHEDULER_INTERVAL", "0.5"))
    store = Store()
    if executor_kind() == "noop":
        from orchestrator.noop import NoopExecutor, noop_capacity

        return ControlPlane(store, NoopExecutor(store), noop_capacity(), interval=interval)
    tgt = cluster.target()
    if tgt.local:
        cluster.start_local()
    cluster.apply_auth_env()
    return ControlPlane(store, RayJobsExecutor(tgt.jobs_url), cluster.capacity(tgt.jobs_url),
                        interval=interval,
                        refresh_capacity=lambda: cluster.capacity(tgt.jobs_url))


def create_app(plane: ControlPlane | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Iterator[None]:  # type: ignore[misc]
        app.state.plane = plane or default_control_plane()
        app.state.plane.start()
        # The first submit should not pay for importing transformers.
        threading.Thread(target=warm_up, name="orch-warm-up", daemon=True).start()
        yield
        app.state.plane.stop()

    app = FastAPI(title="orch", lifespan=lifespan)
    token = os.environ.get("ORCH_API_TOKEN")

    def authorize(authorization: str | None = Header(default=None)) -> None:
        if token and not (authorization and secrets.compare_digest(
            authorization, f"Bearer {token}")
        ):
            raise HTTPException(401, "missing or wrong API token (set ORCH_API_TOKEN)")

    def cp(request: Request) -> ControlPlane:
        return request.app.state.plane

    def get_job(plane: ControlPlane, job_id: int) -> Job:
        job = plane.store.get_job(job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return job

    auth = [Depends(authorize)]

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/cluster", dependencies=auth)
    def cluster_info(request: Request) -> dict[str, Any]:
        plane = cp(request)
        cap, free = plane.scheduler.capacity, plane.scheduler.free()
        return {"gpus": cap.gpus, "cpus": cap.cpus, "nodes": cap.nodes,
                "free_gpus": free.gpus, "free_cpus": free.cpus,
                "jobs_url": getattr(plane.executor, "jobs_url", None)}

    @app.post("/jobs", status_code=201, dependencies=auth)
    def submit(body: SubmitRequest, request: Request,
               x_orch_user: str | None = Header(default=None)) -> dict[str, Any]:
        plane = cp(request)
        spec = spec_from_dict(body.spec)
        problems = preflight(spec)
        # The store's gpus/cpus are the whole job's (every worker's), which admission counts.
        gpus, cpus = spec.resources.gpus, spec.resources.total_cpus
        if reason := plane.scheduler.never_fits(gpus, cpus):
            problems.append(reason)
        if reason := plane.scheduler.multi_node_problem(spec):
            problems.append(reason)
        if problems:
            raise SpecError(problems)
        job = plane.store.create_job(
            name=spec.name, objective=spec.objective.value, owner=x_orch_user or "anonymous",
            spec=spec.to_dict(), spec_yaml=body.spec_yaml, gpus=gpus, cpus=cpus,
            priority=spec.priority, max_attempts=spec.retries + 1,
            artifact_root=_artifact_root(spec),
        )
        plane.wake()
        return job_json(job)

    @app.get("/jobs", dependencies=auth)
    def list_jobs(request: Request, state: str | None = None, owner: str | None = None,
                  limit: int = 100) -> list[dict[str, Any]]:
        states = [JobState(s) for s in state.split(",")] if state else None
        jobs = cp(request).store.list_jobs(states=states, owner=owner, limit=limit)
        return [job_json(j) for j in jobs]

    @app.get("/jobs/{job_id}", dependencies=auth)
    def status(job_id: int, request: Request) -> dict[str, Any]:
        plane = cp(request)
        job = get_job(plane, job_id)
        out = job_json(job)
        out["spec"] = job.spec
        out["events"] = [event_json(e) for e in plane.store.events(job_id)]
        out["attempt_history"] = [attempt_json(a) for a in plane.store.attempts(job_id)]
        latest = plane.store.latest_metrics(job_id)
        out["metrics"] = {name: {"step": step, "value": value}
                          for name, (step, value) in latest.items()}
        out["wait_reason"] = (
            plane.scheduler.wait_reason(job) if job.state == JobState.QUEUED else None
        )
        return out

    @app.post("/jobs/{job_id}/cancel", dependencies=auth)
    def cancel(job_id: int, request: Request,
               x_orch_user: str | None = Header(default=None)) -> dict[str, Any]:
        plane = cp(request)
        get_job(plane, job_id)
        changed, message = plane.scheduler.cancel(
            job_id, f"cancelled by {x_orch_user or 'anonymous'}")
        plane.wake()
        return {"cancelled": changed, "message": message,
                "job": job_json(get_job(plane, job_id))}

    @app.post("/jobs/{job_id}/resume", status_code=201, dependencies=auth)
    def resume(job_id: int, request: Request,
               x_orch_user: str | None = Header(default=None)) -> dict[str, Any]:
        """A failed or cancelled job continues as a new job from its latest checkpoint.

        The old job keeps its terminal state (terminal states never change); the new one
        records where it came from (`parent_job_id`, `resume_from`).
        """
        plane = cp(request)
        old = get_job(plane, job_id)
        if old.state not in (JobState.FAILED, JobState.CANCELLED):
            raise HTTPException(409, f"job {job_id} is {old.state}; only failed or cancelled "
                                     "jobs can be resumed")
        from workers.reporting import latest_complete_checkpoint

        latest = latest_complete_checkpoint(plane.store, job_id)
        if latest is None:
            raise HTTPException(409, f"job {job_id} has no complete checkpoint to resume from; "
                                     "submit its spec again instead")
        user = x_orch_user or "anonymous"
        job = plane.store.create_job(
            name=old.name, objective=old.objective, owner=user, spec=old.spec,
            spec_yaml=old.spec_yaml, gpus=old.gpus, cpus=old.cpus, priority=old.priority,
            max_attempts=old.max_attempts, parent_job_id=job_id, resume_from=latest.path,
            artifact_root=_artifact_root(spec_from_dict(old.spec)),
            reason=f"submitted by {user}: resume of job {job_id} from step {latest.step}",
        )
        plane.wake()
        return job_json(job)

    @app.get("/jobs/{job_id}/metrics", dependencies=auth)
    def metrics(job_id: int, request: Request, name: str | None = None,
                all: bool = False) -> dict[str, Any]:
        plane = cp(request)
        get_job(plane, job_id)
        rows = plane.store.metrics(job_id, name=name, include_superseded=all)
        return {"id": job_id, "metrics": [metric_json(m) for m in rows]}

    @app.get("/jobs/{job_id}/checkpoints", dependencies=auth)
    def checkpoints(job_id: int, request: Request, all: bool = False) -> dict[str, Any]:
        plane = cp(request)
        get_job(plane, job_id)
        rows = plane.store.checkpoints(job_id, include_deleted=all)
        return {"id": job_id, "checkpoints": [checkpoint_json(c) for c in rows]}

    @app.get("/jobs/{job_id}/logs", dependencies=auth)
    def logs(job_id: int, request: Request, offset: int = 0) -> dict[str, Any]:
        plane = cp(request)
        job = get_job(plane, job_id)
        # The durable copy first: it outlives the Ray cluster. Ray's own logs are the
        # fallback for a job whose driver has not started writing yet.
        text = read_job_logs(job.artifact_dir)
        if text is None:
            text = (plane.executor.logs(job.ray_submission_id) if job.ray_submission_id
                    else None) or ""
        return {"id": job_id, "state": job.state, "offset": len(text), "text": text[offset:]}

    @app.exception_handler(SpecError)
    def spec_error(request: Request, exc: SpecError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(exc),
                                                      "problems": exc.problems})

    return app


def _artifact_root(spec: JobSpec) -> Path | None:
    """Where the job's artifact dir goes: the storage path, or (storage a URL, or none) the
    default root on this node, which then holds only logs and staging."""
    storage = spec.checkpoints.storage
    return Path(storage) if storage and "://" not in storage else None


def serve(host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(), host=host, port=port, log_level="warning")
