"""A no-op executor: jobs "run" and succeed at once, without Ray or training.

For measuring and testing the control plane alone (`ORCH_EXECUTOR=noop`): queue,
admission, state transitions and the API under load. Never the default.
"""

from __future__ import annotations

from orchestrator.cluster import Capacity
from orchestrator.executor import Launch, RayJobInfo, RayStatus
from orchestrator.models import AttemptOutcome
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import Store


def noop_capacity(settings: Settings) -> Capacity:
    return Capacity(gpus=settings.noop_gpus, cpus=settings.noop_cpus, nodes=1)


class NoopExecutor:
    def __init__(self, store: Store, finish: bool = True) -> None:
        self.store = store
        self.finish = finish  # False: jobs stay running (they hold their resources)
        self.jobs_url = None

    def submit(self, launch: Launch) -> None:
        self.store.transition(launch.job_id, JobState.RUNNING, "no-op executor: started",
                              expected=[JobState.PENDING])
        if self.finish:
            self.store.transition(launch.job_id, JobState.SUCCEEDED, "no-op executor: done",
                                  expected=[JobState.RUNNING],
                                  attempt_ended=(AttemptOutcome.SUCCEEDED, None))

    def info(self, submission: str) -> RayJobInfo:
        return RayJobInfo(RayStatus.RUNNING)

    def stop(self, submission: str) -> None:
        pass

    def logs(self, submission: str) -> str | None:
        return ""
