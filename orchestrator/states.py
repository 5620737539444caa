"""The job state machine.

Every job moves through these states; the store applies each move as a guarded
compare-and-set and records it as a JobEvent. Terminal states never change.

    queued --> pending --> running --> succeeded
     ^ |          |           |-----> failed
     | |          |           '-----> cancelled
     | '----------'--> failed | cancelled
     '--- pending | running (retry after an infrastructure failure)
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    # In orch's queue, waiting for the scheduler to admit it (GPU/CPU capacity, priority).
    QUEUED = "queued"
    # Admitted and handed to Ray as a Ray Job; waiting for the driver to start and for
    # Ray to place the GPU-scheduled worker actor.
    PENDING = "pending"
    # The worker is training; metrics and checkpoints are flowing into the store.
    RUNNING = "running"
    # Training finished and the final model was saved and recorded. Terminal.
    SUCCEEDED = "succeeded"
    # The job ended with an error; `Job.error` says why. Terminal.
    FAILED = "failed"
    # A user cancelled the job; its Ray work was stopped. Terminal.
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES

    def __str__(self) -> str:
        return self.value


TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
)

# Allowed moves. A state missing here as a source (the terminal ones) has no way out.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PENDING, JobState.FAILED, JobState.CANCELLED}),
    # PENDING -> QUEUED: the Ray submission was lost before the driver started (requeue).
    JobState.PENDING: frozenset(
        {JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}
    ),
    # RUNNING -> QUEUED: an infrastructure failure with attempts left (retry, resuming
    # from the latest checkpoint).
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
}

# States in which the job holds (or is about to hold) cluster resources.
ACTIVE_STATES: frozenset[JobState] = frozenset({JobState.PENDING, JobState.RUNNING})


def can_transition(source: JobState, target: JobState) -> bool:
    """True when the state machine allows moving from `source` to `target`."""
    return target in TRANSITIONS.get(source, frozenset())


class AttemptOutcome(str, Enum):
    """How one attempt (one Ray Job) of a job ended."""

    # Its Ray Job was submitted and has not ended yet.
    RUNNING = "running"
    # The worker trained to the end and recorded the final model.
    SUCCEEDED = "succeeded"
    # The job failed in this attempt: an error in the job itself, or an infrastructure
    # failure with no retries left.
    FAILED = "failed"
    # A user cancelled the job while this attempt was live.
    CANCELLED = "cancelled"
    # An infrastructure failure (worker killed, node or cluster lost) with retries left: the
    # job went back to the queue and the next attempt resumes from the latest checkpoint.
    RETRIED = "retried"
    # Ray never ran it (the submission failed or was lost before the driver started): the
    # job went back to the queue, and this does not count against its retries.
    NOT_STARTED = "not_started"


class CheckpointKind(str, Enum):
    # Resumable, mid-training: weights (or adapter), optimizer, scheduler, RNG, trainer state.
    CHECKPOINT = "checkpoint"
    # The trained model as a plain Hugging Face directory; not a resume point.
    FINAL = "final"
