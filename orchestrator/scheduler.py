"""The scheduling loop: admit queued jobs onto free capacity, reconcile jobs with Ray.

The store is the source of truth for what holds resources: a job in PENDING or RUNNING
holds its GPUs and CPUs until it reaches a terminal state. Ray's own view of free
resources lags behind submissions, so admission never reads it.

Admission order: highest `priority` first, then submission order. The head of the queue
is never skipped: if it does not fit yet, nothing behind it is admitted either, so a
large job cannot be starved by a stream of small ones (strict ordering; backfill would
trade that guarantee for utilisation).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from orchestrator.cluster import Capacity
from orchestrator.executor import Executor, RayStatus, submission_id
from orchestrator.models import Job
from orchestrator.states import ACTIVE_STATES, JobState
from orchestrator.store import Store

log = logging.getLogger("orch.scheduler")


@dataclass(frozen=True)
class Usage:
    gpus: int
    cpus: int


def usage(jobs: list[Job]) -> Usage:
    return Usage(gpus=sum(j.gpus for j in jobs), cpus=sum(j.cpus for j in jobs))


class Scheduler:
    def __init__(self, store: Store, executor: Executor, capacity: Capacity) -> None:
        self.store = store
        self.executor = executor
        self.capacity = capacity
        self._lock = threading.Lock()  # one tick at a time (loop thread and API calls)

    # -- queries ------------------------------------------------------------------------
    def active_jobs(self) -> list[Job]:
        return self.store.list_jobs(states=ACTIVE_STATES)

    def free(self) -> Usage:
        used = usage(self.active_jobs())
        return Usage(self.capacity.gpus - used.gpus, self.capacity.cpus - used.cpus)

    def never_fits(self, gpus: int, cpus: int) -> str | None:
        """Why a job of this size can never run on this cluster, or None."""
        if gpus > self.capacity.gpus:
            return (
                f"resources.gpus: the job asks for {gpus} GPUs but the whole cluster has "
                f"{self.capacity.gpus}; lower resources.gpus or add GPU nodes"
            )
        if cpus > self.capacity.cpus:
            return (
                f"resources.cpus: the job asks for {cpus} CPUs but the whole cluster has "
                f"{self.capacity.cpus}; lower resources.cpus"
            )
        return None

    def wait_reason(self, job: Job) -> str:
        """Why a queued job is still waiting, in words for `orch status`."""
        queue = self.store.queued_jobs()
        ahead = next((i for i, j in enumerate(queue) if j.id == job.id), 0)
        free = self.free()
        parts = []
        if job.gpus > free.gpus:
            parts.append(f"waiting for {job.gpus} GPU{'s' * (job.gpus != 1)}: {free.gpus} free")
        if job.cpus > free.cpus:
            parts.append(f"waiting for {job.cpus} CPU{'s' * (job.cpus != 1)}: {free.cpus} free")
        if ahead:
            parts.append(f"{ahead} job{'s' * (ahead != 1)} ahead")
        return ", ".join(parts) or "about to be admitted"

    # -- the loop -------------------------------------------------------------------------
    def tick(self) -> None:
        with self._lock:
            self._reconcile()
            self._admit()

    def _admit(self) -> None:
        free = self.free()
        for job in self.store.queued_jobs():
            if job.gpus > free.gpus or job.cpus > free.cpus:
                return  # strict order: the head waits, and so does everything behind it
            attempt = job.attempts + 1
            sid = submission_id(job.id, attempt)
            # Claim the job first (compare-and-set), then submit: a job is handed to Ray at
            # most once per attempt even if two schedulers race.
            if not self.store.transition(
                job.id, JobState.PENDING,
                f"admitted: {job.gpus} GPU(s), {job.cpus} CPU(s); Ray job {sid}",
                expected=[JobState.QUEUED], attempts=attempt, ray_submission_id=sid,
            ):
                continue
            try:
                self.executor.submit(job.id, attempt, job.gpus, job.cpus)
            except Exception as exc:
                log.exception("submitting job %s to Ray failed", job.id)
                self.store.transition(
                    job.id, JobState.FAILED, f"could not submit to Ray: {exc}",
                    expected=[JobState.PENDING], error=f"could not submit to Ray: {exc}",
                )
                continue
            free = Usage(free.gpus - job.gpus, free.cpus - job.cpus)

    def _reconcile(self) -> None:
        """Move jobs whose Ray Job ended without the worker recording the outcome."""
        for job in self.active_jobs():
            if not job.ray_submission_id:
                continue
            try:
                info = self.executor.info(job.ray_submission_id)
            except Exception:
                log.warning("cannot read Ray status of job %s", job.id, exc_info=True)
                continue
            if not info.status.is_terminal:
                continue
            # The worker records success itself, after the final model is saved. Re-read:
            # it may have just done so.
            current = self.store.get_job(job.id)
            if current is None or JobState(current.state).is_terminal:
                continue
            if info.status == RayStatus.MISSING and current.state == JobState.PENDING:
                self.store.transition(
                    job.id, JobState.QUEUED,
                    "Ray has no record of the submission (lost before it started); requeued",
                    expected=[JobState.PENDING],
                )
                continue
            reason = _ray_failure_reason(info.status, info.message, self._log_tail(job))
            self.store.transition(
                job.id, JobState.FAILED, reason, expected=list(ACTIVE_STATES), error=reason,
            )

    def _log_tail(self, job: Job, lines: int = 8) -> str:
        assert job.ray_submission_id
        text = self.executor.logs(job.ray_submission_id) or ""
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- cancel ---------------------------------------------------------------------------
    def cancel(self, job_id: int, reason: str) -> tuple[bool, str]:
        """Cancel from any non-terminal state. Returns (changed, message)."""
        with self._lock:
            job = self.store.get_job(job_id)
            if job is None:
                return False, f"job {job_id} not found"
            state = JobState(job.state)
            if state.is_terminal:
                return False, f"job {job_id} already {state.value}"
            if state == JobState.QUEUED and self.store.transition(
                job_id, JobState.CANCELLED, reason, expected=[JobState.QUEUED]
            ):
                return True, f"job {job_id} cancelled (it never started)"
            # Record first so the worker's own final write loses the race, then stop Ray.
            if not self.store.transition(
                job_id, JobState.CANCELLED, reason, expected=list(ACTIVE_STATES)
            ):
                latest = self.store.get_job(job_id)
                return False, f"job {job_id} already {latest.state if latest else 'gone'}"
            if job.ray_submission_id:
                self.executor.stop(job.ray_submission_id)
            return True, f"job {job_id} cancelled; its Ray job was stopped"


def _ray_failure_reason(status: RayStatus, message: str, log_tail: str) -> str:
    if status == RayStatus.SUCCEEDED:
        head = "the driver exited without recording a result"
    elif status == RayStatus.STOPPED:
        head = "the Ray job was stopped outside orch"
    elif status == RayStatus.MISSING:
        head = "Ray has no record of the running job (the cluster was restarted or lost)"
    else:
        head = f"the Ray job failed: {message.strip()}" if message else "the Ray job failed"
    return f"{head}\n{log_tail}" if log_tail else head
