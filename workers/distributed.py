"""Data-parallel training through Ray Train: one job, N workers, one voice.

The driver calls `run_distributed` for a job whose spec asks for more than one worker
(`resources.gpus` > 1, or `resources.workers` > 1 on CPU). It builds a Ray Train
`TorchTrainer` whose workers each run the same Hugging Face Trainer core
(`workers.training.run_training`); Ray Train starts the process group (nccl on GPUs, gloo on
CPUs) and the Trainer, seeing it, wraps the model in DDP (or FSDP) and shards the data.

One voice per job: rank 0 alone moves the job's state, reports metrics and registers
checkpoints; every rank writes its part of a checkpoint and rank 0 renames it into place
after a barrier (`AtomicCheckpoints`).

Worker failure: Ray Train restarts the whole worker group (`FailureConfig.max_failures` =
the spec's `retries`); the new group resumes from the latest registered checkpoint, and
rank 0 records the restart as an event. Errors in the job itself (bad data, an exception in
the model) are recorded as `failed` by the rank that hit them and are not retried: a
restarted group finds the job terminal and stops at once.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

import ray

# Words in the errors a rank sees when a peer died mid-collective: infrastructure, not the
# job's own fault, so they must not mark the job failed (Ray Train restarts the group).
_COLLECTIVE_ERRORS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                      "timed out", "distbackenderror", "process group", "peer")


def is_collective_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in _COLLECTIVE_ERRORS)


def _placement() -> list[dict[str, Any]]:
    """Where every rank runs (node id, host, pid), gathered on all ranks."""
    import torch.distributed as dist

    me = {"rank": dist.get_rank(), "node": ray.get_runtime_context().get_node_id(),
          "host": socket.gethostname(), "pid": os.getpid()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return everyone


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker loop Ray Train runs on every rank."""
    import torch
    import torch.distributed as dist

    from orchestrator.spec import spec_from_dict
    from orchestrator.states import JobState
    from orchestrator.store import Store
    from workers.driver import resume_point
    from workers.reporting import StoreReporter
    from workers.storage import job_artifacts
    from workers.training import run_training

    if not torch.cuda.is_available():
        # Ray Train names the device from the GPUs Ray assigned (cuda:N); fake GPUs on a CPU
        # machine have no CUDA behind them, and accelerate would follow that name.
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    job_id, attempt = int(config["job_id"]), int(config["attempt"])
    store = Store()
    job = store.get_job(job_id)
    assert job is not None
    spec = spec_from_dict(job.spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    leader = rank == 0

    # Rank 0 decides (the job's state, where to resume) and tells the others, so every rank
    # acts on the same answer even if the store changes in between.
    decision: list[Any] = [None]
    placement = _placement()
    if leader:
        state = JobState(job.state)
        resume_from, resume_words = resume_point(store, job)
        where = ", ".join(f"rank {p['rank']} on node {p['node'][:12]} {p['host']} (pid {p['pid']})"
                          for p in placement)
        backend = dist.get_backend()
        words = (f"{world} workers ({spec.training.strategy}, {backend}, placement "
                 f"{spec.resources.placement}): {where}; {resume_words}")
        print(f"orch job {job_id} attempt {attempt}: {words}", flush=True)
        if state == JobState.PENDING:
            go = store.transition(job_id, JobState.RUNNING, f"attempt {attempt} started: {words}",
                                  expected=[JobState.PENDING])
        elif state == JobState.RUNNING:
            # A worker of this attempt died and Ray Train restarted the whole group.
            go = store.add_event(job_id, f"attempt {attempt}: Ray Train restarted the worker "
                                         f"group after a worker failure: {words}")
        else:
            go = False  # cancelled, or failed by a rank of an earlier group
        decision = [{"go": go, "resume_from": resume_from}]
    dist.broadcast_object_list(decision, src=0)
    if not decision[0]["go"]:
        return

    artifacts = job_artifacts(spec.checkpoints.storage, job_id, job.artifact_dir)
    reporter = StoreReporter(store, job_id, attempt, spec, upload_to=artifacts.url) if leader else None
    try:
        final_metrics = run_training(spec, artifacts.local_dir,
                                     callbacks=[reporter] if reporter else [],
                                     resume_from_checkpoint=decision[0]["resume_from"],
                                     upload_to=artifacts.url)
    except Exception as exc:
        if reporter:
            reporter.flush()
        traceback.print_exc()
        if not is_collective_error(exc):
            error = f"{type(exc).__name__}: {exc}"
            store.transition(job_id, JobState.FAILED, f"training failed on rank {rank}: {error}",
                             expected=[JobState.RUNNING], error=error,
                             attempt_ended=("failed", error))
        raise
    if reporter:
        final_dir = artifacts.final
        reporter.final_model(reporter.last_step, final_dir, final_metrics)
        store.transition(job_id, JobState.SUCCEEDED, f"final model saved to {final_dir}",
                         expected=[JobState.RUNNING], attempt_ended=("succeeded", None))


def _gpus_have_cuda() -> bool:
    """Whether a GPU worker really has CUDA. A CPU machine may declare fake GPUs to Ray (tests,
    demos): its workers must talk gloo, since nccl needs real GPUs."""

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    return bool(ray.get(probe.remote()))


def run_distributed(job_id: int, attempt: int) -> int:
    """Run one attempt of a data-parallel job from the Ray Job driver; the exit code."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.spec import spec_from_dict
    from orchestrator.states import JobState
    from orchestrator.store import Store

    store = Store()
    job = store.get_job(job_id)
    assert job is not None
    spec = spec_from_dict(job.spec)
    res = spec.resources
    use_gpu = res.gpus > 0
    backend = "nccl" if use_gpu and _gpus_have_cuda() else "gloo"
    per_worker: dict[str, float] = {"CPU": res.cpus, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job_id": job_id, "attempt": attempt},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker,
            placement_strategy=res.placement.upper(),
        ),
        run_config=RunConfig(
            name=f"orch-{job_id}-{attempt}",
            # Ray Train's own run state; orch's checkpoints live beside it in artifact_dir.
            storage_path=str(Path(job.artifact_dir) / "ray_train"),
            failure_config=FailureConfig(max_failures=spec.retries),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"orch: data-parallel training failed: {message}", file=sys.stderr, flush=True)
        # Ray Train already spent the job's retries restarting the worker group; a worker
        # that hit an error in the job itself recorded `failed` already. Anything still
        # active is a worker failure beyond the retries: record it here, so the control
        # plane does not retry it a second time. (A lost driver is still retried by it.)
        cause = (f"data-parallel worker group failed {spec.retries + 1} time(s) (Ray Train "
                 f"max_failures={spec.retries}): {message}")
        store.transition(job_id, JobState.FAILED, cause, expected=[JobState.PENDING, JobState.RUNNING],
                         error=cause, attempt_ended=("failed", cause))
        return 1
    return 0
