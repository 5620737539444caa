"""Runs admitted jobs as Ray Jobs: the only place orch talks to the Ray Jobs API.

Each attempt of a job is one Ray Job with a deterministic submission id
(`orch-<job id>-<attempt>`), so a control plane that restarts can find its jobs again.
The Ray Job's driver (`workers.driver`) starts the GPU-scheduled worker actor, or a Ray
Train worker group for a data-parallel job.

What a Ray Job carries is visible to anyone who can read the cluster's job list, so its
environment holds no database URL and no user's credential: only the server's URL and the
attempt's own token, which can report on that attempt and nothing else.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from orchestrator import cluster
from orchestrator.sandbox import Rules
from orchestrator.settings import Settings, get_settings
from orchestrator.store import Claimed


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
    # The entrypoint's exit status once it ended (a shell's 128 + N, or -N, for signal N).
    exit_code: int | None = None


@dataclass(frozen=True)
class Launch:
    """One attempt to hand to Ray."""

    job_id: int
    attempt: int
    submission_id: str
    gpus: int
    cpus: int  # the whole job's
    workers: int
    token: str  # the attempt's worker token (plain, this once)

    @classmethod
    def of(cls, claim: Claimed) -> Launch:
        return cls(job_id=claim.job_id, attempt=claim.attempt,
                   submission_id=claim.submission_id, gpus=claim.gpus, cpus=claim.cpus,
                   workers=claim.workers, token=claim.token)


class Executor(Protocol):
    def submit(self, launch: Launch) -> None: ...
    def info(self, submission: str) -> RayJobInfo: ...
    def stop(self, submission: str) -> None: ...
    def logs(self, submission: str) -> str | None: ...


# Passed on to the driver and workers: offline settings and the model cache.
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")


class RayJobsExecutor:
    def __init__(self, jobs_url: str | None = None, server_url: str | None = None,
                 settings: Settings | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.settings = settings or get_settings()
        cluster.apply_auth_env()
        self.jobs_url = jobs_url or cluster.target().jobs_url
        self.client = JobSubmissionClient(self.jobs_url)
        # Where the workers report to.
        self.server_url = (server_url or self.settings.advertised_url
                           or self.settings.local_server_url())
        # The entrypoint runs with the cluster's environment, not ours: name the interpreter.
        self.python = self.settings.worker_python or sys.executable

    def _cluster_env(self) -> dict[str, str]:
        """What every Ray Job orch starts gets: offline settings, the server's sandbox rules
        (applied again on the cluster before anything is opened) and which cluster to join."""
        env = {"PYTHONUNBUFFERED": "1"}
        env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
        env.update(Rules.from_settings(self.settings).worker_env())
        if cluster.target().local:
            # Ray points a job's driver at the cluster named in /tmp/ray/ray_current_cluster:
            # the most recently started one on the machine, not necessarily ours. Name ours.
            env["ORCH_RAY_GCS_ADDRESS"] = cluster.gcs_address()
        return env

    def submit(self, launch: Launch) -> None:
        env = {"ORCH_SERVER_URL": self.server_url, "ORCH_ATTEMPT_TOKEN": launch.token,
               **self._cluster_env()}
        per_worker_cpus = max(1, launch.cpus // max(1, launch.workers))
        # One worker trains in the entrypoint process itself, which holds the job's GPUs
        # and CPUs: Ray places the Job where they are. A data-parallel job's driver only
        # starts Ray Train's workers, and they hold the resources.
        alone = launch.workers <= 1
        self.client.submit_job(
            entrypoint=(f"{self.python} -m workers.driver --job-id {launch.job_id} "
                        f"--attempt {launch.attempt} --gpus {launch.gpus} "
                        f"--cpus {per_worker_cpus} --workers {launch.workers}"),
            submission_id=launch.submission_id,
            runtime_env={"env_vars": env},
            entrypoint_num_cpus=launch.cpus if alone else 0,
            entrypoint_num_gpus=launch.gpus if alone else 0,
            metadata={"orch_job_id": str(launch.job_id), "orch_attempt": str(launch.attempt)},
        )

    def submit_task(self, submission_id: str, module: str, args: list[str], *, gpus: int,
                    cpus: int, metadata: dict[str, str]) -> None:
        """A short Ray Job outside the queue (`orch predict` on the cluster): `python -m
        module args...`, its driver holding `gpus` and `cpus` itself. It gets no token: it
        reports nothing, its answer is read from its logs."""
        self.client.submit_job(
            entrypoint=" ".join([self.python, "-m", module, *(shlex.quote(a) for a in args)]),
            submission_id=submission_id, runtime_env={"env_vars": self._cluster_env()},
            entrypoint_num_gpus=gpus, entrypoint_num_cpus=cpus, metadata=metadata)

    def info(self, submission: str) -> RayJobInfo:
        try:
            details = self.client.get_job_info(submission)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return RayJobInfo(RayStatus.MISSING, str(exc))
            raise
        return RayJobInfo(RayStatus(details.status.value), details.message or "",
                          details.driver_exit_code)

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
