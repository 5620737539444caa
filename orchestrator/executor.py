"""Runs admitted jobs as Ray Jobs: the only place orch talks to the Ray Jobs API.

Each attempt of a job is one Ray Job with a deterministic submission id
(`orch-<job id>-<attempt>`), so a control plane that restarts can find its jobs again.
The Ray Job's driver (`workers.driver`) starts the GPU-scheduled worker actor.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from orchestrator import cluster
from orchestrator.config import database_url, orch_home


class RayStatus(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    MISSING = "MISSING"  # Ray has no record of the submission (e.g. the cluster restarted)

    @property
    def is_terminal(self) -> bool:
        return self not in (RayStatus.PENDING, RayStatus.RUNNING)


@dataclass(frozen=True)
class RayJobInfo:
    status: RayStatus
    message: str = ""


def submission_id(job_id: int, attempt: int) -> str:
    return f"orch-{job_id}-{attempt}"


def attempt_log(artifact_dir: str | Path, attempt: int) -> Path:
    """Where an attempt's driver and worker output is kept (durable, outlives Ray)."""
    return Path(artifact_dir) / "logs" / f"attempt-{attempt}.log"


def read_job_logs(artifact_dir: str | Path) -> str | None:
    """All attempts' logs of a job, oldest attempt first; None when none were written."""
    files = sorted(Path(artifact_dir, "logs").glob("attempt-*.log"),
                   key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        return None
    parts = []
    for path in files:
        parts.append(f"===== {path.stem} =====\n")
        parts.append(path.read_text(errors="replace"))
    return "".join(parts)


class Executor(Protocol):
    def submit(self, job_id: int, attempt: int, gpus: int, cpus: int,
               log_file: str | None = None) -> str: ...
    def info(self, submission: str) -> RayJobInfo: ...
    def stop(self, submission: str) -> None: ...
    def logs(self, submission: str) -> str | None: ...


# Variables passed on to the driver and workers: where the store is, and offline settings.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")


class RayJobsExecutor:
    def __init__(self, jobs_url: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        cluster.apply_auth_env()
        self.jobs_url = jobs_url or cluster.target().jobs_url
        self.client = JobSubmissionClient(self.jobs_url)
        # The entrypoint runs with the cluster's environment, not ours: name the interpreter.
        self.python = os.environ.get("ORCH_WORKER_PYTHON", sys.executable)

    def submit(self, job_id: int, attempt: int, gpus: int, cpus: int,
               log_file: str | None = None) -> str:
        sid = submission_id(job_id, attempt)
        env = {
            "ORCH_DATABASE_URL": os.environ.get("ORCH_WORKER_DATABASE_URL", database_url()),
            "ORCH_HOME": str(orch_home()),
            "PYTHONUNBUFFERED": "1",
        }
        env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
        if cluster.target().local:
            # Ray points a job's driver at the cluster named in /tmp/ray/ray_current_cluster:
            # the most recently started one on the machine, not necessarily ours. Name ours.
            env["ORCH_RAY_GCS_ADDRESS"] = cluster.gcs_address()
        self.client.submit_job(
            entrypoint=(f"{self.python} -m workers.driver --job-id {job_id} --attempt {attempt}"
                        f" --gpus {gpus} --cpus {cpus}"
                        + (f" --log-file {shlex.quote(log_file)}" if log_file else "")),
            submission_id=sid,
            runtime_env={"env_vars": env},
            # The driver only starts the worker actor; the actor holds the GPUs and CPUs.
            entrypoint_num_cpus=0,
            metadata={"orch_job_id": str(job_id), "orch_attempt": str(attempt)},
        )
        return sid

    def info(self, submission: str) -> RayJobInfo:
        try:
            details = self.client.get_job_info(submission)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return RayJobInfo(RayStatus.MISSING, str(exc))
            raise
        return RayJobInfo(RayStatus(details.status.value), details.message or "")

    def stop(self, submission: str) -> None:
        try:
            self.client.stop_job(submission)
        except RuntimeError as exc:
            if "does not exist" not in str(exc):
                raise

    def logs(self, submission: str) -> str | None:
        try:
            return self.client.get_job_logs(submission)
        except RuntimeError:
            return None
