"""Ray Job entrypoint for one attempt of one orch job.

    python -m workers.driver --job-id 7 --attempt 1 --gpus 1 --cpus 2

The driver is light: it starts one worker actor that holds the job's GPUs and CPUs (Ray
schedules it onto a node that has them), then waits. It imports nothing heavy before the
actor exists, so the actor's own start-up (torch, transformers) begins at once. The actor
does the training and records its own outcome; the driver records only what the actor
cannot: that the actor's process died.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from pathlib import Path

import ray


@ray.remote(max_restarts=0)
class TrainingWorker:
    """One fine-tune, in a Ray worker process holding the job's GPUs."""

    def __init__(self, job_id: int, attempt: int) -> None:
        self.job_id = job_id
        self.attempt = attempt

    def train(self) -> str:
        import torch

        from orchestrator.spec import spec_from_dict
        from orchestrator.states import JobState
        from orchestrator.store import Store
        from workers.reporting import StoreReporter
        from workers.training import run_training

        store = Store()
        job = store.get_job(self.job_id)
        assert job is not None
        spec = spec_from_dict(job.spec)
        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        device = "cuda" if torch.cuda.is_available() and spec.resources.gpus else "cpu"
        where = (f"on {socket.gethostname()} (pid {os.getpid()}), Ray GPUs {gpu_ids or 'none'}, "
                 f"training on {device}")
        print(f"orch job {self.job_id} attempt {self.attempt}: {where}", flush=True)
        if not store.transition(self.job_id, JobState.RUNNING, f"training started {where}",
                                expected=[JobState.PENDING]):
            return "not started: the job left pending (cancelled?)"
        reporter = StoreReporter(store, self.job_id, self.attempt, spec)
        artifact_dir = Path(job.artifact_dir)
        try:
            final_metrics = run_training(spec, artifact_dir, callbacks=[reporter])
            final_dir = artifact_dir / "final"
            reporter.final_model(reporter.last_step, final_dir, final_metrics)
        except Exception as exc:
            reporter.flush()
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            store.transition(self.job_id, JobState.FAILED, f"training failed: {error}",
                             expected=[JobState.RUNNING], error=error)
            raise
        store.transition(self.job_id, JobState.SUCCEEDED, f"final model saved to {final_dir}",
                         expected=[JobState.RUNNING])
        return "succeeded"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    args = parser.parse_args(argv)

    ray.init()  # inside a Ray Job this joins the job's cluster
    worker = TrainingWorker.options(
        num_gpus=args.gpus, num_cpus=args.cpus, name=f"orch-{args.job_id}-{args.attempt}",
    ).remote(args.job_id, args.attempt)
    try:
        print(ray.get(worker.train.remote()), flush=True)
        return 0
    except ray.exceptions.RayActorError as exc:
        from orchestrator.states import JobState
        from orchestrator.store import Store

        # The worker process died (killed, OOM, node lost): infrastructure, not the user's code.
        reason = f"worker process died: {exc}".splitlines()[0]
        Store().transition(args.job_id, JobState.FAILED, reason,
                           expected=[JobState.PENDING, JobState.RUNNING], error=reason)
        print(reason, file=sys.stderr)
        return 1
    except ray.exceptions.RayTaskError:
        return 1  # the worker recorded the failure and its traceback is in the logs


if __name__ == "__main__":
    sys.exit(main())
