"""A job's trained model: which checkpoint `--checkpoint` names, and predictions from it.

`GET /jobs/{id}/model?checkpoint=auto|final|best|latest|STEP` answers where the chosen model
is (and the job's spec and metrics, for loading and describing it): what `orch predict`
runs locally and `orch export` exports. Every way the choice can fail is one line naming
what exists instead: an unknown step, a checkpoint retention deleted, a job that has saved
nothing yet, files that are gone.

`POST /jobs/{id}/predict` runs `orch predict` on the job's cluster, for a CLI that cannot
reach the model's files (a laptop; the checkpoints on the cluster's storage). The control
plane starts a short Ray Job (`python -m workers.inference`) whose driver holds one GPU if
the job trained on GPUs (and the job's CPUs per worker), waits for it and reads its answer
from its logs. The CLI needs no Ray credentials: the server has them. Like reading a job,
anyone who may read the job may predict with it.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam

from orchestrator.api import MetricValue, ModelRef, PredictRequest, PredictResponse
from orchestrator.auth import current_user, plane_of
from orchestrator.errors import ClusterError, Conflict, InvalidRequest, NotFound
from orchestrator.models import Checkpoint, CheckpointKind, Job
from orchestrator.spec import spec_from_dict
from orchestrator.states import JobState

log = logging.getLogger("orch.server")
router = APIRouter(dependencies=[Depends(current_user)])
JobId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="a job id")]
CHOICES = ("auto", "final", "best", "latest")
_STEP = re.compile(r"\d{1,12}")
# How often the control plane looks at a running prediction.
POLL_SECONDS = 0.5
# The request travels as one argument of the Ray Job's shell command, which Linux bounds at
# 128 KiB (MAX_ARG_STRLEN); the CLI sends inputs in requests well under this.
MAX_TASK_ARGUMENT = 120_000


def _available(live: list[Checkpoint]) -> str:
    """What `--checkpoint` could name instead, for an error message."""
    parts = []
    if final := next((c for c in live if c.kind == CheckpointKind.FINAL), None):
        parts.append(f"final (step {final.step})")
    if best := next((c for c in live if c.is_best), None):
        parts.append(f"best (step {best.step})")
    steps = [str(c.step) for c in live if c.kind == CheckpointKind.CHECKPOINT]
    if steps:
        parts.append(f"latest (step {steps[-1]})")
        parts.append(f"steps {', '.join(steps)}")
    return "; ".join(parts)


def _nothing_saved(job: Job) -> str:
    if job.state == JobState.FAILED:
        return f"job {job.id} failed before it saved a checkpoint, so there is no model to use"
    if job.state == JobState.CANCELLED:
        return f"job {job.id} was cancelled before it saved a checkpoint, so there is no model"
    return (f"job {job.id} is {job.state.value} and has saved no checkpoint yet; try again "
            "after its first save (training.save_steps)")


def choose(job: Job, rows: list[Checkpoint], which: str) -> tuple[str, Checkpoint]:
    """(the name of the choice, the chosen row) for `which`; a one-line OrchError when
    there is no such model. `rows`: every checkpoint row of the job, deleted ones too."""
    which = which.strip().lower()
    live = [c for c in rows if not c.deleted]
    if which not in CHOICES and not _STEP.fullmatch(which):
        raise InvalidRequest(f"checkpoint: {which[:40]!r} is not one of final, best, latest or "
                             "a step number (e.g. --checkpoint 200)")
    if not live:
        raise Conflict(_nothing_saved(job))
    final = next((c for c in live if c.kind == CheckpointKind.FINAL), None)
    best = next((c for c in live if c.is_best), None)
    latest = next((c for c in live if c.is_latest), None)
    if which == "auto":  # the finished model when there is one
        which = "final" if final else "best" if best else "latest"
    found = {"final": final, "best": best, "latest": latest}.get(which)
    if which in CHOICES:
        if found is None:
            why = {"final": f"job {job.id} has no final model ({job.state.value}: only a job "
                            "that finished training has one)",
                   "best": f"job {job.id} has no best checkpoint (no saved checkpoint has eval "
                           "metrics to rank it by)",
                   "latest": f"job {job.id} has no checkpoint to resume from"}[which]
            raise Conflict(f"{why}; use one of: {_available(live)}")
        return which, found
    step = int(which)
    at_step = [c for c in rows if c.step == step and c.kind == CheckpointKind.CHECKPOINT]
    alive = next((c for c in at_step if not c.deleted), None)
    if alive is not None:
        return which, alive
    keep = (job.spec.get("checkpoints") or {}).get("keep_last", "?")
    if at_step:
        raise Conflict(f"checkpoint-{step} of job {job.id} was deleted by retention "
                       f"(checkpoints.keep_last: {keep} keeps the last {keep} and the best); "
                       f"use one of: {_available(live)}")
    raise NotFound(f"job {job.id} has no checkpoint at step {step}; use one of: "
                   f"{_available(live)}")


def _files_there(row: Checkpoint) -> bool:
    from workers import storage

    if row.kind == CheckpointKind.CHECKPOINT:
        return storage.is_complete_checkpoint(row.path)
    names = storage.list_files(row.path)
    return "config.json" in names or "adapter_config.json" in names


def model_ref(request: Request, job_id: int, which: str) -> ModelRef:
    plane = plane_of(request)
    job = plane.store.require_job(job_id)
    name, row = choose(job, plane.store.checkpoints(job_id, include_deleted=True), which)
    if not _files_there(row):
        label = "the final model" if row.kind == CheckpointKind.FINAL else f"checkpoint-{row.step}"
        raise Conflict(f"the files of {label} of job {job_id} are gone from {row.path} (deleted "
                       "outside orch?); choose another with --checkpoint")
    return ModelRef(
        job_id=job_id, name=job.name, objective=job.objective, state=job.state,
        owner=job.owner, which=name, kind=row.kind, step=row.step, path=row.path,
        metrics=row.metrics or {}, spec=job.spec,
        job_metrics={n: MetricValue(step=s, value=v)
                     for n, (s, v) in plane.store.latest_metrics(job_id).items()})


@router.get("/jobs/{job_id}/model", response_model=ModelRef)
def model(job_id: JobId, request: Request,
          checkpoint: Annotated[str, Query(max_length=32)] = "auto") -> ModelRef:
    return model_ref(request, job_id, checkpoint)


@router.post("/jobs/{job_id}/predict", response_model=PredictResponse)
def predict(job_id: JobId, body: PredictRequest, request: Request) -> PredictResponse:
    """Run the prediction as a Ray Job on the job's cluster and wait for its answer."""
    from workers.inference import RemoteRequest, parse_result

    plane = plane_of(request)
    ref = model_ref(request, job_id, body.checkpoint)
    submit = getattr(plane.executor, "submit_task", None)
    if submit is None:
        raise Conflict("this server runs jobs on no Ray cluster (ORCH_EXECUTOR=noop); run "
                       "orch predict --on local where the model's files are")
    spec = spec_from_dict(ref.spec)
    # One model copy answers: one GPU if the job trained on GPUs (its data-parallel workers
    # each held a whole copy), else the CPU. The GPU is taken outside the queue, so only
    # when the scheduler counts one free: predicting never delays an admitted job.
    gpus, cpus = (1 if spec.resources.gpus else 0), spec.resources.cpus
    free = plane.scheduler.free()
    if free.gpus < gpus or free.cpus < cpus:
        what = "1 GPU" if free.gpus < gpus else f"{cpus} CPUs"
        raise Conflict(f"predicting on the cluster needs {what} that no job holds, and jobs "
                       "hold them; try again when they are free, or run orch predict --on "
                       "local where the model's files are")
    inputs = [item if isinstance(item, str) else [m.model_dump() for m in item]
              for item in body.inputs]
    task = RemoteRequest(spec=_for_task(ref.spec), location=ref.path, inputs=inputs,
                         max_new_tokens=body.max_new_tokens, top_k=body.top_k)
    argument = task.encode()
    if len(argument) > MAX_TASK_ARGUMENT:
        raise InvalidRequest(f"inputs: {len(argument) // 1000} kB encoded, more than the "
                             f"{MAX_TASK_ARGUMENT // 1000} kB one prediction on the cluster "
                             "takes; send fewer or shorter inputs at a time")
    submission = f"orch-predict-{job_id}-{secrets.token_hex(4)}"
    log.info("job %s: predicting with %s on the cluster (%s, %d GPU)", job_id, ref.path,
             submission, gpus)
    try:
        submit(submission, "workers.inference", [argument], gpus=gpus, cpus=cpus,
               metadata={"orch_job_id": str(job_id), "orch_task": "predict"})
    except Exception as exc:
        raise ClusterError(f"cannot start the prediction on the Ray cluster: {exc}") from None
    status = _wait(plane, submission, plane.settings.predict_timeout)
    logs = plane.executor.logs(submission) or ""
    result = parse_result(logs)
    if result is None:
        tail = next((line for line in reversed(logs.splitlines()) if line.strip()), "")
        raise ClusterError(f"the prediction's Ray Job {submission} ended {status} without an "
                           f"answer: {(tail or 'no output')[:300]}")
    if "error" in result:
        raise InvalidRequest(str(result["error"]))
    return PredictResponse(job_id=job_id, objective=ref.objective, checkpoint=ref.chosen(),
                           where="cluster", predictions=result.get("predictions", []))


def _for_task(spec: dict[str, object]) -> dict[str, object]:
    """The spec without its long lists: predicting reads the model, the tokenizer and the
    settings, never the data files (a spec may name a thousand)."""
    dataset = dict(spec.get("dataset") or {})  # type: ignore[call-overload]
    for key in ("train_files", "eval_files"):
        if dataset.get(key):
            dataset[key] = dataset[key][:1]
    return {**spec, "dataset": dataset}


def _wait(plane: object, submission: str, timeout: float) -> str:
    """The Ray Job's final status; it is stopped after `timeout` seconds."""
    executor = plane.executor  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        info = executor.info(submission)
        if info.status.is_terminal:
            return str(info.status.value)
        if time.monotonic() > deadline:
            executor.stop(submission)
            raise ClusterError(f"the prediction did not finish within {timeout:.0f}s "
                               "(ORCH_PREDICT_TIMEOUT); its Ray Job was stopped")
        time.sleep(POLL_SECONDS)
