"""The HTTP API's request and response models, shared by the server (`response_model=`)
and its clients (the CLI, and the workers reporting on their attempt).

The JSON keys are the ones `orch ... -o json` documents; keep them stable. Times are
ISO 8601 in UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.states import AttemptOutcome, CheckpointKind, JobState

if TYPE_CHECKING:  # the tables; not imported at run time, so clients stay light
    from orchestrator.models import (
        Attempt,
        AuditEvent,
        Checkpoint,
        Job,
        JobEvent,
        Metric,
        UserAccount,
        UserToken,
    )
    from orchestrator.progress import Progress

# Bounds on what a client may send (the body itself is capped by the server too).
MAX_TEXT = 4096
MAX_LIST = 1000
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_TOKEN_DAYS = 3650


class _Model(BaseModel):
    # Built on first use: a CLI process uses two or three of these models, not all of them.
    model_config = ConfigDict(populate_by_name=True, defer_build=True)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)


# -- jobs --------------------------------------------------------------------------------
class SubmitRequest(_Request):
    spec: dict[str, Any]  # validated and path-resolved by the client; validated again here
    spec_yaml: str = Field(default="", max_length=256 * 1024)


class ProgressView(_Model):
    step: int | None = None  # the latest step the job recorded a metric at
    total: int | None = None  # the step training ends at, once known


class JobSummary(_Model):
    id: int
    name: str
    objective: str
    owner: str
    state: JobState
    priority: int
    gpus: int
    cpus: int
    attempts: int
    max_attempts: int
    error: str | None
    artifact_dir: str
    parent_job_id: int | None
    resume_from: str | None
    ray_submission_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # Filled by `GET /jobs` and `GET /jobs/{id}` (orchestrator.progress); left empty in the
    # answers of submit, cancel and resume.
    progress: ProgressView = Field(default_factory=ProgressView)
    queued_seconds: float | None = None  # in the queue, until it started (or so far)
    elapsed_seconds: float | None = None  # since it started, until it ended (or so far)
    eta_seconds: float | None = None  # a running job's time to its last step, at its recent pace
    waiting_reason: str | None = None  # why a queued or pending job is not running yet

    @classmethod
    def of(cls, job: Job, progress: Progress | None = None) -> JobSummary:
        summary = cls.model_validate(job, from_attributes=True)
        if progress is not None:
            summary.progress = ProgressView(step=progress.step, total=progress.total)
            summary.queued_seconds = progress.queued_for
            summary.elapsed_seconds = progress.ran_for
            summary.eta_seconds = progress.eta_seconds
            summary.waiting_reason = progress.waiting_reason
        return summary


class EventView(_Model):
    from_state: JobState | None = Field(serialization_alias="from", validation_alias="from")
    to_state: JobState = Field(serialization_alias="to", validation_alias="to")
    reason: str
    at: datetime
    details: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, event: JobEvent) -> EventView:
        return cls(from_state=event.from_state, to_state=event.to_state, reason=event.reason,
                   at=event.at, details=event.details or {})


class AttemptView(_Model):
    attempt: int
    ray_submission_id: str
    started_at: datetime
    ended_at: datetime | None
    outcome: AttemptOutcome
    cause: str | None

    @classmethod
    def of(cls, attempt: Attempt) -> AttemptView:
        return cls.model_validate(attempt, from_attributes=True)


class MetricValue(_Model):
    step: int
    value: float


class JobDetail(JobSummary):
    spec: dict[str, Any]
    events: list[EventView]
    attempt_history: list[AttemptView]
    metrics: dict[str, MetricValue]  # each metric's latest live value
    wait_reason: str | None  # a queued job's (waiting_reason also explains a pending one)


class MetricView(_Model):
    step: int
    name: str
    value: float
    attempt: int
    superseded: bool

    @classmethod
    def of(cls, metric: Metric) -> MetricView:
        return cls.model_validate(metric, from_attributes=True)


class MetricsResponse(_Model):
    id: int
    metrics: list[MetricView]
    objective: str | None = None  # which metric is the headline one (orchestrator.progress)


class CheckpointView(_Model):
    id: int
    step: int
    path: str
    size_bytes: int
    kind: CheckpointKind
    metrics: dict[str, Any]
    is_best: bool
    is_latest: bool
    deleted: bool
    attempt: int
    created_at: datetime

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> CheckpointView:
        return cls.model_validate(checkpoint, from_attributes=True)


class CheckpointsResponse(_Model):
    id: int
    checkpoints: list[CheckpointView]
    objective: str | None = None


class LogsResponse(_Model):
    id: int
    state: JobState
    offset: int  # pass it back to read on from here
    text: str


class CancelResponse(_Model):
    cancelled: bool
    message: str
    job: JobSummary


class ClusterInfo(_Model):
    gpus: int
    cpus: int
    nodes: int
    free_gpus: int
    free_cpus: int
    jobs_url: str | None


class ErrorBody(_Model):
    detail: str
    problems: list[str] | None = None


# -- users and their tokens (a team server; admins only, but for whoami) -------------
class UserCreate(_Request):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "user"] = "user"
    gpu_cap: int | None = Field(default=None, ge=0, le=INT32_MAX)  # None: the server's default
    max_priority: int | None = Field(default=None, ge=INT32_MIN, le=INT32_MAX)
    token_name: str | None = Field(default=None, min_length=1, max_length=64)
    expires_in_days: int | None = Field(default=None, ge=1, le=MAX_TOKEN_DAYS)  # None: never


class TokenCreate(_Request):
    name: str | None = Field(default=None, min_length=1, max_length=64)  # None: token-<n>
    expires_in_days: int | None = Field(default=None, ge=1, le=MAX_TOKEN_DAYS)


class TokenRevoke(_Request):
    token: str | None = Field(default=None, min_length=1, max_length=64)  # None: all of them


class TokenView(_Model):
    """A token's facts; never the token, which only its creation shows."""

    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    @classmethod
    def of(cls, token: UserToken) -> TokenView:
        return cls.model_validate(token, from_attributes=True)


class UserView(_Model):
    name: str
    role: Literal["admin", "user"]
    gpu_cap: int | None  # None: the server's default
    max_priority: int | None
    created_at: datetime
    disabled_at: datetime | None
    tokens: list[TokenView]

    @classmethod
    def of(cls, account: UserAccount, tokens: list[UserToken]) -> UserView:
        return cls(name=account.name, role=account.role.value, gpu_cap=account.gpu_cap,
                   max_priority=account.max_priority, created_at=account.created_at,
                   disabled_at=account.disabled_at, tokens=[TokenView.of(t) for t in tokens])


class IssuedToken(_Model):
    """A new token: `token` is shown this once (the server keeps only its hash)."""

    user: str
    name: str
    token: str
    created_at: datetime
    expires_at: datetime | None


class UserCreated(_Model):
    user: UserView
    token: IssuedToken


class RevokeResponse(_Model):
    user: str
    revoked: list[str]  # the names of the tokens revoked


class WhoAmI(_Model):
    name: str
    role: Literal["admin", "user"]
    auth: Literal["local", "users"]  # the server's mode
    gpu_cap: int | None  # in effect: the user's own, else the server's default (None: no cap)
    max_priority: int


class AuditView(_Model):
    at: datetime
    actor: str
    action: str
    target: str
    details: dict[str, Any]

    @classmethod
    def of(cls, event: AuditEvent) -> AuditView:
        return cls(at=event.at, actor=event.actor, action=event.action, target=event.target,
                   details=event.details or {})


# -- workers reporting on their attempt (authenticated by the attempt's token) -----------
class WorkerCheckpointRef(_Model):
    step: int
    path: str


class WorkerJob(_Model):
    """What a worker needs to run its attempt, from the control plane."""

    job_id: int
    attempt: int
    state: JobState
    spec: dict[str, Any]
    artifact_dir: str
    # Resume candidates, newest first: the job's registered checkpoints, then the
    # checkpoint `orch resume` started this job from. The worker takes the first whose
    # files are complete where it runs.
    checkpoints: list[WorkerCheckpointRef]
    resume_from: str | None
    parent_job_id: int | None


class WorkerStarted(_Request):
    """The attempt's run starts (pending -> running), or a restarted worker group's run
    starts again inside the same attempt (`restart`)."""

    restart: bool = False
    start_step: int = Field(ge=0)  # the resumed checkpoint's step; 0 for a fresh start
    restated: list[str] = Field(default_factory=list, max_length=100)
    reason: str = Field(max_length=MAX_TEXT)
    details: dict[str, Any] = Field(default_factory=dict)
    key: str = Field(min_length=1, max_length=64)  # applied once, however often it is sent


class WorkerStartedResponse(_Model):
    go: bool  # False: the job is no longer the attempt's to run (cancelled, say)
    state: JobState


class WorkerEvent(_Request):
    reason: str = Field(max_length=MAX_TEXT)
    details: dict[str, Any] = Field(default_factory=dict)
    key: str = Field(min_length=1, max_length=64)


class WorkerMetrics(_Request):
    # (step, name, value); a row already recorded for this attempt is ignored.
    rows: list[tuple[int, str, float]] = Field(max_length=10_000)


class WorkerMetricsResponse(_Model):
    added: int


class WorkerCheckpoint(_Request):
    step: int = Field(ge=0)
    path: str = Field(min_length=1, max_length=MAX_TEXT)
    size_bytes: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class WorkerCheckpointResponse(_Model):
    id: int
    # Checkpoints retention dropped: delete their files, then report them deleted.
    delete: list[WorkerCheckpointRef]
    delete_ids: list[int]


class WorkerDeleted(_Request):
    ids: list[int] = Field(max_length=MAX_LIST)


class WorkerFinished(_Request):
    """How the attempt ended, from the worker's side."""

    outcome: Literal["succeeded", "failed"]
    reason: str = Field(max_length=MAX_TEXT)
    # failed: the error in the job itself (never retried).
    error: str | None = Field(default=None, max_length=MAX_TEXT)
    # succeeded: the final model.
    final: WorkerCheckpoint | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class WorkerLogsResponse(_Model):
    # The attempt's log length on the server, in bytes, after this chunk (the chunk is the
    # raw request body, sent with ?offset= where it starts).
    size: int


# -- a job's model: which checkpoint, and predictions from it (orch predict / export) ----
class ChosenModel(_Model):
    """Which of a job's models `--checkpoint` named."""

    which: str  # final, best, latest, or the step asked for
    kind: CheckpointKind
    step: int
    path: str


class ModelRef(ChosenModel):
    """The chosen model, with what a client needs to load and describe it."""

    job_id: int
    name: str
    objective: str
    state: JobState
    owner: str
    metrics: dict[str, Any]  # the checkpoint's own evaluation (at its step)
    job_metrics: dict[str, MetricValue]  # the job's latest live value of each metric
    spec: dict[str, Any]

    def chosen(self) -> ChosenModel:
        return ChosenModel(which=self.which, kind=self.kind, step=self.step, path=self.path)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_TEXT)


PredictInput = Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[
    list[ChatMessage], Field(min_length=1, max_length=100)]


class PredictRequest(_Request):
    # Texts, or conversations for a clm job trained on chats.
    inputs: list[PredictInput] = Field(min_length=1, max_length=64)
    checkpoint: str = Field(default="auto", max_length=32)  # auto, final, best, latest, STEP
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096)
    top_k: int = Field(default=5, ge=1, le=100)


class PredictResponse(_Model):
    job_id: int
    objective: str
    checkpoint: ChosenModel
    where: Literal["local", "cluster"]  # this machine, or a Ray Job on the job's cluster
    predictions: list[dict[str, Any]]
