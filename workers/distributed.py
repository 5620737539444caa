"""Data-parallel training through Ray Train: one job, N workers, one voice.

The driver calls `run_distributed` for a job with more than one worker (`resources.gpus` > 1,
or `resources.workers` > 1 on CPU). It builds a Ray Train `TorchTrainer` whose workers each
run the attempt's lifecycle (`workers.attempt`) around the same Hugging Face Trainer core;
Ray Train starts the process group (nccl on GPUs, gloo on CPUs) and the Trainer, seeing it,
wraps the model in DDP (or FSDP) and shards the data.

One voice per job: rank 0 alone decides (start or restart, where to resume) and tells the
others, reports metrics and registers checkpoints; every rank writes its part of a
checkpoint and rank 0 renames it into place after a barrier (`AtomicCheckpoints`).

Worker failure: Ray Train restarts the whole worker group (`FailureConfig.max_failures` =
the spec's `retries`); the new group resumes from the latest registered checkpoint, and
rank 0 records the restart. Errors in the job itself (bad data, an exception in the model)
are recorded as failed by the rank that hit them and are not retried: a restarted group
finds the job ended and stops at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

import ray

from orchestrator.api import WorkerFinished
from orchestrator.spec import spec_from_dict
from workers.control_plane import AttemptOver, ControlPlaneClient


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

    from workers import attempt

    attempt.show_logs()
    if not torch.cuda.is_available():
        # Ray Train names the device from the GPUs Ray assigned (cuda:N); fake GPUs on a CPU
        # machine have no CUDA behind them, and accelerate would follow that name.
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    client = ControlPlaneClient.from_environment()
    rank, world = dist.get_rank(), dist.get_world_size()
    leader = rank == 0

    # Rank 0 decides (start or restart, where to resume) and tells the others, so every
    # rank acts on the same answer even if the job changes in between.
    placement = _placement()
    decision: list[Any] = [None]
    if leader:
        where = ", ".join(f"rank {p['rank']} on node {p['node'][:12]} {p['host']} (pid {p['pid']})"
                          for p in placement)
        words = (f"{world} workers ({config['strategy']}, {dist.get_backend()}, placement "
                 f"{config['placement']}): {where}")
        decision = [attempt.begin(client, where=words, details={"ranks": placement})]
    dist.broadcast_object_list(decision, src=0)
    if not decision[0].go:
        return
    try:
        attempt.train(decision[0], client, leader=leader, distributed=True, rank=rank)
    except AttemptOver:
        return


def _gpus_have_cuda() -> bool:
    """Whether a GPU worker really has CUDA. A CPU machine may declare fake GPUs to Ray (tests,
    demos): its workers must talk gloo, since nccl needs real GPUs."""

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> bool:
        import torch

        return torch.cuda.is_available()

    return bool(ray.get(probe.remote()))


def run_distributed(client: ControlPlaneClient, *, gpus: int, cpus: int, workers: int) -> int:
    """Run one attempt of a data-parallel job from the Ray Job driver; the exit code."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job = client.job()
    spec = spec_from_dict(job.spec)
    use_gpu = gpus > 0
    backend = "nccl" if use_gpu and _gpus_have_cuda() else "gloo"
    per_worker: dict[str, float] = {"CPU": cpus, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"strategy": spec.training.strategy,
                           "placement": spec.resources.placement},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker,
            placement_strategy=spec.resources.placement.upper(),
        ),
        run_config=RunConfig(
            name=f"orch-{job.job_id}-{job.attempt}",
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
        with contextlib.suppress(AttemptOver):
            client.finished(WorkerFinished(outcome="failed", reason=cause, error=cause))
        return 1
    return 0
