"""The scheduling loop: admit queued jobs onto free capacity, reconcile jobs with Ray.

The store is the source of truth for what holds resources: a job in PENDING or RUNNING
holds its GPUs and CPUs until it leaves those states. Ray's own view of free resources
lags behind submissions, so admission never reads it.

Admission order: highest `priority` first, then submission order. The head of the queue
is never skipped for lack of capacity: if it does not fit yet, nothing behind it is
admitted either, so a large job cannot be starved by a stream of small ones (a
reservation for the head; backfill would trade that guarantee for utilisation). The one
exception is the per-user GPU cap: a job held back by its owner's own usage does not
block other users' jobs, it waits for its owner's jobs to finish. The cap is the owner's own
(`orch users add --gpu-cap`), else the server's default (`ORCH_USER_GPU_CAP`); the owner is
the authenticated user who submitted the job, so a cap cannot be dodged by another name.

Failures: a Ray Job that ended while the store still says pending/running is an
infrastructure failure (the worker records errors in the job itself before its Ray Job
ends). It is retried while `retries` allow, resuming from the latest checkpoint, else
failed. If Ray cannot be reached at all for `cluster_loss_grace` seconds, every active
job is treated the same way, so no job stays "running" on a cluster that is gone.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from orchestrator.cluster import Capacity
from orchestrator.executor import Executor, Launch, RayJobInfo, RayStatus
from orchestrator.models import AttemptOutcome, Job
from orchestrator.spec import JobSpec
from orchestrator.states import ACTIVE_STATES, JobState
from orchestrator.store import QueuedJob, Store

log = logging.getLogger("orch.scheduler")


@dataclass(frozen=True)
class Usage:
    gpus: int
    cpus: int


# The queue is read in pages of this many jobs, until the head no longer fits.
QUEUE_PAGE = 500
FIRST_PAGE = 20


class Scheduler:
    def __init__(self, store: Store, executor: Executor, capacity: Capacity, *,
                 user_gpu_cap: int | None = None, cluster_loss_grace: float = 30.0,
                 reconcile_interval: float = 0.0) -> None:
        self.store = store
        self.executor = executor
        self.capacity = capacity
        self.user_gpu_cap = user_gpu_cap
        self.cluster_loss_grace = cluster_loss_grace
        # Asking Ray about every active job costs CPU on both sides (a Jobs API call each);
        # the workers report their own outcomes, so this only notices a lost one: not every
        # tick. Admission still runs every tick.
        self.reconcile_interval = reconcile_interval
        self._reconciled_at = float("-inf")
        self.unreachable_since: float | None = None
        self._lock = threading.Lock()  # one tick at a time (loop thread and API calls)

    # -- queries ------------------------------------------------------------------------
    def active_jobs(self) -> list[Job]:
        return self.store.list_jobs(states=ACTIVE_STATES)

    def free(self) -> Usage:
        return self._free(self.store.usage())

    def _free(self, usage: dict[str, tuple[int, int]]) -> Usage:
        return Usage(self.capacity.gpus - sum(g for g, _ in usage.values()),
                     self.capacity.cpus - sum(c for _, c in usage.values()))

    def queue(self, first: list[QueuedJob] | None = None) -> Iterator[QueuedJob]:
        """The queue in admission order, read a page at a time (the first small: most ticks
        stop at the head). `first`: its first page, already read."""
        after: tuple[int, int] | None = None
        size = min(FIRST_PAGE, QUEUE_PAGE)  # as admission_view read `first`
        while True:
            page = first if first is not None else self.store.queue_page(limit=size,
                                                                         after=after)
            first = None
            yield from page
            if len(page) < size:
                return
            after = (page[-1].priority, page[-1].id)
            size = min(size * 4, QUEUE_PAGE)

    def never_fits(self, gpus: int, cpus: int, *, owner: str | None = None,
                   gpu_cap: int | None = None) -> str | None:
        """Why a job of this size can never run on this cluster, or None. `gpu_cap`: the
        owner's own cap (default: the server's per-user cap)."""
        cap = gpu_cap if gpu_cap is not None else self.user_gpu_cap
        if gpus > self.capacity.gpus:
            return (
                f"resources.gpus: the job asks for {gpus} GPUs but the whole cluster has "
                f"{self.capacity.gpus}; lower resources.gpus or add GPU nodes"
            )
        if cap is not None and gpus > cap:
            who = f"{owner} may" if owner else "each user may"
            return (
                f"resources.gpus: the job asks for {gpus} GPUs but {who} hold at most "
                f"{cap} at once; lower resources.gpus"
            )
        if cpus > self.capacity.cpus:
            return (
                f"resources.cpus: the job asks for {cpus} CPUs but the whole cluster has "
                f"{self.capacity.cpus}; lower resources.cpus"
            )
        return None

    def multi_node_problem(self, spec: JobSpec) -> str | None:
        """Why a data-parallel job cannot run as given: it spans nodes (placement spread, or
        more than one node holds) but its artifacts would go to node-local storage that the
        other nodes' workers cannot write to or resume from."""
        res = spec.resources
        if not res.distributed or spec.checkpoints.storage:
            return None
        per_gpu, cpus = (1 if res.gpus else 0), res.cpus
        cap = self.capacity
        too_big = bool(cap.node_cpus and res.num_workers * cpus > cap.node_cpus) or bool(
            per_gpu and cap.node_gpus and res.num_workers > cap.node_gpus)
        if res.placement == "spread" and cap.nodes > 1:
            why = "resources.placement: spread puts workers on several nodes"
        elif too_big:
            why = (f"resources: {res.num_workers} workers need more than the largest node "
                   f"holds ({cap.node_gpus} GPUs, {cap.node_cpus} CPUs), so they span nodes")
        else:
            return None
        return (f"checkpoints.storage: {why}, but the job's checkpoints would go to the "
                "control plane's node-local $ORCH_HOME; set checkpoints.storage to a "
                "shared-filesystem path mounted at the same place on every node, or to an "
                "object-store URL such as s3://bucket/prefix")

    @staticmethod
    def _owner_gpus(usage: dict[str, tuple[int, int]]) -> Counter[str]:
        return Counter({owner: gpus for owner, (gpus, _) in usage.items()})

    def _caps(self) -> dict[str, int]:
        """owner -> their own GPU cap, for owners who have one (one query per tick)."""
        return self.store.gpu_caps()

    def _cap_of(self, owner: str, caps: dict[str, int]) -> int | None:
        return caps.get(owner, self.user_gpu_cap)

    def _capped(self, job: Job | QueuedJob, held: Counter[str], caps: dict[str, int]) -> bool:
        cap = self._cap_of(job.owner, caps)
        return cap is not None and held[job.owner] + job.gpus > cap

    def wait_reason(self, job: Job) -> str:
        """Why a queued job is still waiting, in words for `orch status`."""
        assert job.id is not None
        return self.wait_reasons([job])[job.id]

    def wait_reasons(self, jobs: Sequence[Job]) -> dict[int, str]:
        """`wait_reason` of several queued jobs (a page of the dashboard) with one walk of the
        queue, however many jobs are asked about."""
        usage, caps = self.store.usage(), self._caps()
        held, free = self._owner_gpus(usage), self._free(usage)
        reasons: dict[int, str] = {}
        walk: set[int] = set()
        for job in jobs:
            assert job.id is not None
            if self._capped(job, held, caps):
                reasons[job.id] = (f"waiting for {job.owner}'s other jobs: they hold "
                                   f"{held[job.owner]} GPUs and the per-user cap is "
                                   f"{self._cap_of(job.owner, caps)}")
            elif self.unreachable_since is not None:
                down = time.monotonic() - self.unreachable_since
                reasons[job.id] = f"waiting for the Ray cluster, unreachable for {down:.0f}s"
            else:
                walk.add(job.id)
        ahead_of: dict[int, int] = {}
        ahead = 0
        if walk:
            for queued in self.queue():
                if queued.id in walk:
                    ahead_of[int(queued.id)] = ahead
                    if len(ahead_of) == len(walk):
                        break
                ahead += 0 if self._capped(queued, held, caps) else 1
        for job in jobs:
            if job.id not in walk:
                continue
            before = ahead_of.get(int(job.id), ahead)
            parts = []
            # Jobs may hold more than the cluster now declares (it shrank, or a node left):
            # then none is free, never a negative number.
            if job.gpus > free.gpus:
                parts.append(f"waiting for {job.gpus} GPU{'s' * (job.gpus != 1)}: "
                             f"{max(0, free.gpus)} free")
            if job.cpus > free.cpus:
                parts.append(f"waiting for {job.cpus} CPU{'s' * (job.cpus != 1)}: "
                             f"{max(0, free.cpus)} free")
            if before:
                parts.append(f"{before} job{'s' * (before != 1)} ahead")
            reasons[int(job.id)] = ", ".join(parts) or "about to be admitted"
        return reasons

    # -- the loop -------------------------------------------------------------------------
    def reconcile_due_in(self) -> float:
        """Seconds until the next tick should ask Ray about the active jobs (0: now)."""
        return max(0.0, self._reconciled_at + self.reconcile_interval - time.monotonic())

    def tick(self) -> None:
        with self._lock:
            if time.monotonic() - self._reconciled_at >= self.reconcile_interval:
                self._reconciled_at = time.monotonic()
                self._reconcile()
            if self.unreachable_since is None:
                self._admit()

    def _admit(self) -> None:
        """Claim every job that fits this tick in one transaction (compare-and-set: a job
        someone cancelled meanwhile is left out), then hand each to Ray."""
        # Capacity, caps and the head of the queue in one read transaction.
        usage, caps, head = self.store.admission_view(min(FIRST_PAGE, QUEUE_PAGE))
        free, held = self._free(usage), self._owner_gpus(usage)
        chosen: list[QueuedJob] = []
        for job in self.queue(head):
            if self._capped(job, held, caps):
                continue  # waits for its owner's own jobs; does not hold up anyone else
            if job.gpus > free.gpus or job.cpus > free.cpus:
                break  # the head waits, and so does everything behind it
            chosen.append(job)
            free = Usage(free.gpus - job.gpus, free.cpus - job.cpus)
            held[job.owner] += job.gpus
        if not chosen:
            return
        # Claimed first, then submitted: a job is handed to Ray at most once per attempt
        # even if two schedulers race.
        claims = self.store.claim_jobs([job.id for job in chosen])
        for i, claim in enumerate(claims):
            try:
                if claim.previous_submission_id:
                    # A retry after Ray was unreachable: make sure the old attempt is not
                    # still running somewhere, so the job never runs twice.
                    self.executor.stop(claim.previous_submission_id)
                self.executor.submit(Launch.of(claim))
            except Exception as exc:
                log.warning("submitting job %s to Ray failed: %s", claim.job_id, exc)
                # Not the jobs' fault and they never ran: this one and the ones claimed
                # after it go back to the queue, and nothing more is admitted until Ray
                # answers again.
                for unsent in claims[i:]:
                    self.store.transition(
                        unsent.job_id, JobState.QUEUED,
                        f"could not submit to Ray ({exc}); requeued",
                        expected=[JobState.PENDING],
                        attempt_ended=(AttemptOutcome.NOT_STARTED, str(exc)))
                self.unreachable_since = self.unreachable_since or time.monotonic()
                return

    def _reconcile(self) -> None:
        """Settle active jobs whose Ray Job ended without the worker recording an outcome."""
        active = self.active_jobs()
        reached = False
        for job in active:
            if not job.ray_submission_id:
                continue
            try:
                info = self.executor.info(job.ray_submission_id)
            except Exception as exc:
                log.warning("cannot read Ray status of job %s: %s", job.id, exc)
                continue
            reached = True
            if not info.status.is_terminal:
                continue
            # The worker records its own outcome before its Ray Job ends. Re-read: it may
            # have just done so.
            assert job.id is not None
            current = self.store.get_job(job.id)
            if current is None or JobState(current.state).is_terminal:
                continue
            if info.status == RayStatus.MISSING and current.state == JobState.PENDING:
                self.store.transition(
                    job.id, JobState.QUEUED,
                    "Ray has no record of the submission (lost before it started); requeued",
                    expected=[JobState.PENDING],
                    attempt_ended=(AttemptOutcome.NOT_STARTED, "submission lost"),
                )
                continue
            said = self._driver_said(current)
            self.fail_or_retry(current, _ray_failure_reason(info, said, self._log_tail(job)))
        if reached:
            self.unreachable_since = None
        elif not active:
            # Nothing to ask about; if a submission failed, probe until Ray answers again.
            self.unreachable_since = self.unreachable_since and self._probe_unreachable()
        else:
            self._cluster_unreachable(active)

    def _probe_unreachable(self) -> float | None:
        """With no active job to ask about, ask Ray anything: is it there?"""
        try:
            self.executor.info("orch-probe")
        except Exception:
            return self.unreachable_since or time.monotonic()
        return None

    def _cluster_unreachable(self, active: list[Job]) -> None:
        now = time.monotonic()
        self.unreachable_since = self.unreachable_since or now
        down_for = now - self.unreachable_since
        if down_for < self.cluster_loss_grace:
            return
        for job in active:
            self.fail_or_retry(job, f"the Ray cluster was unreachable for {down_for:.0f}s")

    def fail_or_retry(self, job: Job, cause: str) -> None:
        """An infrastructure failure: retry while `retries` allow, else fail the job."""
        assert job.id is not None
        retried = sum(a.outcome == AttemptOutcome.RETRIED for a in self.store.attempts(job.id))
        if retried + 1 < job.max_attempts:
            self.store.transition(
                job.id, JobState.QUEUED,
                f"attempt {job.attempts} lost ({cause.splitlines()[0]}); retry "
                f"{retried + 1} of {job.max_attempts - 1}, resuming from the latest checkpoint",
                expected=list(ACTIVE_STATES), attempt_ended=(AttemptOutcome.RETRIED, cause),
                details={"retry": retried + 1, "retries": job.max_attempts - 1},
            )
        else:
            self.store.transition(
                job.id, JobState.FAILED, cause, expected=list(ACTIVE_STATES), error=cause,
                attempt_ended=(AttemptOutcome.FAILED, cause),
            )

    def _driver_said(self, job: Job) -> str | None:
        """What the attempt reported through `/worker/cause` before its Ray Job ended,
        recorded as the attempt's cause while it was still running. orch's own workers no
        longer send one (a killed single worker cannot; its signal is read from the exit
        status instead); the route stays for workers of the previous version."""
        assert job.id is not None
        current = [a for a in self.store.attempts(job.id) if a.attempt == job.attempts]
        return current[0].cause if current else None

    def _log_tail(self, job: Job, lines: int = 8) -> str:
        assert job.ray_submission_id
        try:
            text = self.executor.logs(job.ray_submission_id) or ""
        except Exception:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- cancel ---------------------------------------------------------------------------
    def cancel(self, job_id: int, reason: str, user: str | None = None) -> tuple[bool, str]:
        """Cancel from any non-terminal state. Returns (changed, message)."""
        details = {"user": user} if user else None
        with self._lock:
            job = self.store.get_job(job_id)
            if job is None:
                return False, f"job {job_id} not found"
            state = JobState(job.state)
            if state.is_terminal:
                return False, f"job {job_id} already {state.value}"
            if state == JobState.QUEUED and self.store.transition(
                job_id, JobState.CANCELLED, reason, expected=[JobState.QUEUED], details=details,
            ):
                return True, f"job {job_id} cancelled (it never started)"
            # Record first so the worker's own final write loses the race, then stop Ray.
            if not self.store.transition(
                job_id, JobState.CANCELLED, reason, expected=list(ACTIVE_STATES),
                attempt_ended=(AttemptOutcome.CANCELLED, reason), details=details,
            ):
                latest = self.store.get_job(job_id)
                gone = JobState(latest.state).value if latest else "gone"
                return False, f"job {job_id} already {gone}"
            if job.ray_submission_id:
                try:
                    self.executor.stop(job.ray_submission_id)
                except Exception as exc:
                    return True, f"job {job_id} cancelled; stopping its Ray job failed: {exc}"
            return True, f"job {job_id} cancelled; its Ray job was stopped"


def killed_by(exit_code: int | None) -> str | None:
    """The signal that ended a Ray Job's entrypoint, from its exit status: -N from Python's
    subprocess, or 128 + N from the shell Ray starts it with."""
    if exit_code is None or exit_code == 0:
        return None
    number = -exit_code if exit_code < 0 else exit_code - 128 if 128 < exit_code < 160 else None
    if number is None:
        return None
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:
        return f"signal {number}"


def _ray_failure_reason(info: RayJobInfo, said: str | None, log_tail: str) -> str:
    status, message = info.status, info.message
    if said:
        # What the attempt reported before its Ray Job ended says more than Ray's generic
        # "entrypoint command failed with exit code N".
        head = said
    elif status == RayStatus.FAILED and (signal_name := killed_by(info.exit_code)):
        # Killed from outside (the OOM killer, an operator, a lost node's cleanup): the
        # process could say nothing. Not the job's own error.
        head = f"worker process died: killed by {signal_name}"
    elif status == RayStatus.SUCCEEDED:
        head = "the driver exited without recording a result"
    elif status == RayStatus.STOPPED:
        head = "the Ray job was stopped outside orch"
    elif status == RayStatus.MISSING:
        head = "Ray has no record of the running job (the cluster was restarted or lost)"
    else:
        first = message.strip().splitlines()[0] if message.strip() else ""
        head = f"the Ray job failed: {first}" if first else "the Ray job failed"
    return f"{head}\n{log_tail}" if log_tail else head
