"""A no-op executor: jobs "run" and succeed at once, without Ray or training.

For measuring and testing the control plane alone (`ORCH_EXECUTOR=noop`): queue,
admission, state transitions and the API under load. Never the default.
"""

from __future__ import annotations

import os

from orchestrator.cluster import Capacity
from orchestrator.executor import RayJobInfo, RayStatus, submission_id
from orchestrator.states import JobState
from orchestrator.store import Store


def noop_capacity() -> Capacity:
    """`ORCH_NOOP_GPUS` / `ORCH_NOOP_CPUS` (default: plenty)."""
    return Capacity(gpus=int(os.environ.get("ORCH_NOOP_GPUS", "100000")),
                    cpus=int(os.environ.get("ORCH_NOOP_CPUS", "100000")), nodes=1)


class NoopExecutor:
    def __init__(self, store: Store, finish: bool = True) -> None:
        self.store = store
        self.finish = finish  # False: jobs stay running (they hold their resources)
        self.jobs_url = None

    def submit(self, job_id: int, attempt: int, gpus: int, cpus: int,
               log_file: str | None = None) -> str:
        self.store.transition(job_id, JobState.RUNNING, "no-op executor: started",
                              expected=[JobState.PENDING])
        if self.finish:
            self.store.transition(job_id, JobState.SUCCEEDED, "no-op executor: done",
                                  expected=[JobState.RUNNING], attempt_ended=("succeeded", None))
        return submission_id(job_id, attempt)

    def info(self, submission: str) -> RayJobInfo:
        return RayJobInfo(RayStatus.RUNNING)

    def stop(self, submission: str) -> None:
        pass

    def logs(self, submission: str) -> str | None:
        return ""
