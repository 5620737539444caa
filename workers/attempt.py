"""One attempt of one job, on a worker: the lifecycle every way of running a job shares.

The single worker actor (workers.driver) and every rank of a data-parallel group
(workers.distributed) go through the same two steps:

1. `begin` (one process decides; rank 0 of a group): read the job from the control plane,
   pick the resume point (the newest registered checkpoint whose files are complete here,
   else the checkpoint `orch resume` started the job from), and mark the attempt running,
   or, when Ray Train restarted the worker group inside a running attempt, record the
   restart. Both supersede the metrics the run now starting will write again.
2. `train` (every process): run the training core with the reporter (rank 0), record the
   final model, and end the attempt: succeeded, or failed for an error in the job itself.

What is not the job's fault is never recorded as failed here: a worker process that dies
(the driver sees it), a peer lost mid-collective (`is_collective_error`), or a control
plane that stays unreachable. The control plane settles those (retry from the latest
checkpoint, or fail once the retries are spent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.api import WorkerFinished, WorkerJob, WorkerStarted
from orchestrator.errors import SpecError
from orchestrator.sandbox import current_rules
from orchestrator.spec import JobSpec, spec_from_dict
from orchestrator.states import JobState
from workers import storage
from workers.control_plane import (
    AttemptOver,
    ControlPlaneClient,
    ControlPlaneGone,
    Outbox,
    new_key,
)

log = logging.getLogger("orch.worker")

# Words in the errors a rank sees when a peer died mid-collective: infrastructure, not the
# job's own fault, so they must not mark the job failed (Ray Train restarts the group).
_COLLECTIVE_ERRORS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                      "timed out", "distbackenderror", "process group", "peer")
# Written again at the step a resumed run starts from: total_steps by every run, and the
# Trainer's end-of-run summary by a run resumed from its final checkpoint. The rows an earlier
# run left there are superseded when the new run starts.
RESTATED_AT_START = ("total_steps", "train_runtime", "train_samples_per_second",
                     "train_steps_per_second", "total_flos", "train_loss_avg")


@dataclass(frozen=True)
class Decision:
    """What the deciding process tells every process of the attempt."""

    go: bool
    job_id: int
    attempt: int
    spec: dict[str, Any] = field(default_factory=dict)
    artifact_dir: str = ""
    resume_from: str | None = None
    why_not: str = ""


def show_logs() -> None:
    """Send orch's and the training core's log lines (threads used, examples dropped, data
    fetched...) to this worker process's stderr, which the driver streams into the job's
    log. Ray configures no logging in a worker, so they would otherwise be lost."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("orch", "workers"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


def resume_point(job: WorkerJob) -> tuple[str | None, int, str]:
    """(checkpoint to resume from, its step, words for the history)."""
    for ckpt in job.checkpoints:  # newest first
        if storage.is_complete_checkpoint(ckpt.path):
            return ckpt.path, ckpt.step, f"resuming from step {ckpt.step} ({ckpt.path})"
    if job.resume_from and storage.is_complete_checkpoint(job.resume_from):
        found = re.search(r"checkpoint-(\d+)/?$", job.resume_from)
        step = int(found.group(1)) if found else 0
        return (job.resume_from, step,
                f"resuming job {job.parent_job_id}'s checkpoint {job.resume_from}")
    return None, 0, "from the start"


def where_am_i() -> dict[str, Any]:
    import psutil

    # When this process started (seconds since the epoch): bench/overhead.py's phases.
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_started": round(psutil.Process().create_time(), 3)}


def begin(client: ControlPlaneClient, *, where: str, details: dict[str, Any]) -> Decision:
    """Decide for the attempt (one process only): start it, or record a worker-group
    restart, or stand down (the job was cancelled meanwhile)."""
    job = client.job()
    base = Decision(go=False, job_id=job.job_id, attempt=job.attempt)
    if job.state not in (JobState.PENDING, JobState.RUNNING):
        return Decision(**{**base.__dict__, "why_not": f"the job is {job.state.value}"})
    try:
        spec = spec_from_dict(job.spec)
    except SpecError as exc:
        # The spec was valid when it was submitted; a worker that cannot read it now (an
        # older or newer orch on the cluster) will not do better on a retry.
        fail(client, f"the worker cannot use the job's spec: {exc}")
        return Decision(**{**base.__dict__, "why_not": "invalid spec"})
    # The sandbox rules again, here, before anything is opened: a path checked at submit
    # may have become a link to somewhere else since, and the rules may have tightened
    # (a resumed job's spec). Nothing of that gets better on a retry either.
    if outside := current_rules().problems(spec):
        fail(client, "the job's spec reaches outside what this cluster allows: "
             + "; ".join(outside))
        return Decision(**{**base.__dict__, "why_not": "outside the sandbox"})
    try:
        storage.refuse_links(job.artifact_dir)
    except storage.LinkRefused as exc:
        fail(client, str(exc))
        return Decision(**{**base.__dict__, "why_not": "a link in the job directory"})
    resume_from, step, resume_words = resume_point(job)
    restart = job.state == JobState.RUNNING
    reason = (f"attempt {job.attempt}: Ray Train restarted the worker group after a worker "
              f"failure: {where}; {resume_words}" if restart
              else f"attempt {job.attempt} started {where}, {resume_words}")
    log.info("orch job %s: %s", job.job_id, reason)
    print(f"orch job {job.job_id} {reason}", flush=True)
    answer = client.started(WorkerStarted(
        restart=restart, start_step=step, restated=list(RESTATED_AT_START), reason=reason,
        details={**details, "resume_from": resume_from}, key=new_key()))
    return Decision(go=answer.go, job_id=job.job_id, attempt=job.attempt, spec=job.spec,
                    artifact_dir=job.artifact_dir, resume_from=resume_from,
                    why_not="" if answer.go else f"the job is {answer.state.value}")


def fail(client: ControlPlaneClient, error: str, reason: str | None = None) -> None:
    """Record an error in the job itself: the attempt and the job fail, never retried."""
    # AttemptOver: it ended already (cancelled meanwhile), nothing to record.
    with contextlib.suppress(AttemptOver):
        client.finished(WorkerFinished(outcome="failed",
                                       reason=reason or f"training failed: {error}", error=error))


def is_collective_error(exc: BaseException) -> bool:
    """An error a rank sees because a peer died mid-collective (not the job's fault)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is there wherever training runs
        dist = None  # type: ignore[assignment]
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in _COLLECTIVE_ERRORS)


def train(decision: Decision, client: ControlPlaneClient, *, leader: bool = True,
          distributed: bool = False, rank: int = 0, callbacks: Sequence[Any] = (),
          flush_seconds: float = 2.0) -> dict[str, float]:
    """Run the attempt's training in this process and, on the leader, report it; returns
    the final eval metrics. Raises on failure, after recording it when it is the job's.
    `callbacks`: more Trainer callbacks; `flush_seconds`: how often metrics are sent."""
    from workers.guards import NoLinks
    from workers.reporting import AttemptReporter
    from workers.tracking import Tracking
    from workers.training import run_training

    spec: JobSpec = spec_from_dict(decision.spec)
    artifacts = storage.job_artifacts(spec.checkpoints.storage, decision.job_id,
                                      decision.artifact_dir)
    outbox = Outbox(client, remove_files=storage.remove) if leader else None
    reporter = (AttemptReporter(outbox, upload_to=artifacts.url, flush_seconds=flush_seconds)
                if outbox else None)
    # TensorBoard / MLflow when the spec asks (the leader only, like the reporter).
    tracking = Tracking.for_attempt(spec, job_id=decision.job_id, attempt=decision.attempt,
                                    job_dir=artifacts.local_dir, leader=leader)
    try:
        # Every process checks what it opens and where it writes (begin ran on one only).
        current_rules().require(spec)
        storage.refuse_links(artifacts.local_dir)
        final_metrics = run_training(spec, artifacts.local_dir,
                                     callbacks=[*([reporter] if reporter else []),
                                                NoLinks(artifacts.local_dir),
                                                *tracking.callbacks, *callbacks],
                                     resume_from_checkpoint=decision.resume_from,
                                     upload_to=artifacts.url)
        if reporter is None or outbox is None:
            return final_metrics
        final = reporter.final_model(reporter.last_step, artifacts.final, final_metrics)
        tracking.finished(artifacts.final)
        _drain(client, outbox)
        if outbox.over:
            raise AttemptOver("the control plane ended this attempt while it trained")
        client.finished(WorkerFinished(outcome="succeeded", reason=f"final model saved to "
                                       f"{artifacts.final}", final=final))
        return final_metrics
    except (AttemptOver, ControlPlaneGone):
        raise
    except Exception as exc:
        traceback.print_exc()
        if outbox is not None:
            outbox.drain(10.0)
        if not (distributed and is_collective_error(exc)):
            where = f" on rank {rank}" if distributed else ""
            error = f"{type(exc).__name__}: {exc}"
            fail(client, error, reason=f"training failed{where}: {error}")
            tracking.failed()
        raise
    finally:
        if outbox is not None:
            outbox.close(timeout=10.0)


def _drain(client: ControlPlaneClient, outbox: Outbox) -> None:
    """Everything reported reaches the control plane before the attempt says it ended."""
    if not outbox.drain(client.timeout):
        raise ControlPlaneGone("the control plane did not take the run's last reports within "
                               f"{client.timeout:.0f}s")
    if outbox.error is not None:
        raise ControlPlaneGone(f"reporting failed: {outbox.error}")
