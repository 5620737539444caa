"""Ray Job entrypoint for one attempt of one orch job.

    python -m workers.driver --job-id 7 --attempt 1 --gpus 1 --cpus 2 --log-file F

The driver is light: it starts one worker actor that holds the job's GPUs and CPUs (Ray
schedules it onto a node that has them), then waits. It imports nothing heavy before the
actor exists, so the actor's own start-up (torch, transformers) begins at once.

The actor does the training and records its own outcome: succeeded, or failed for an
error in the job itself (never retried). When the actor's process dies instead, the
driver only reports it and exits non-zero; the control plane sees the Ray Job fail with
the job still running and retries it (resuming from the latest checkpoint) or fails it.

Everything the driver and the worker print also goes to `--log-file`, as it is written,
so `orch logs` works after the job ended and after the Ray cluster is gone.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray


@contextmanager
def tee_output(path: Path) -> Iterator[None]:
    """Copy everything written to file descriptors 1 and 2 into `path` as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = path.open("ab", buffering=0)
    saved, pumps = [], []
    for fd in (1, 2):
        read_end, write_end = os.pipe()
        original = os.dup(fd)
        os.dup2(write_end, fd)
        os.close(write_end)
        saved.append((fd, original))

        def pump(read_end: int = read_end, original: int = original) -> None:
            while chunk := os.read(read_end, 65536):
                os.write(original, chunk)
                sink.write(chunk)
            os.close(read_end)

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        pumps.append(thread)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in saved:
            os.dup2(original, fd)  # closes the pipe's last write end: the pump sees EOF
            os.close(original)
        for thread in pumps:
            thread.join(timeout=5)
        sink.close()


def resume_point(store, job) -> tuple[str | None, str]:  # type: ignore[no-untyped-def]
    """The latest complete checkpoint to resume from, and words for the event."""
    from workers.reporting import latest_complete_checkpoint
    from workers.storage import is_complete_checkpoint

    if ckpt := latest_complete_checkpoint(store, job.id):
        return ckpt.path, f"resuming from step {ckpt.step} ({ckpt.path})"
    if job.resume_from and is_complete_checkpoint(job.resume_from):
        return job.resume_from, f"resuming job {job.parent_job_id}'s checkpoint {job.resume_from}"
    return None, "from the start"


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
        from workers.storage import job_artifacts
        from workers.training import run_training

        store = Store()
        job = store.get_job(self.job_id)
        assert job is not None
        spec = spec_from_dict(job.spec)
        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        device = "cuda" if torch.cuda.is_available() and spec.resources.gpus else "cpu"
        resume_from, resume_words = resume_point(store, job)
        where = (f"on {socket.gethostname()} (pid {os.getpid()}), Ray GPUs {gpu_ids or 'none'}, "
                 f"training on {device}, {resume_words}")
        print(f"orch job {self.job_id} attempt {self.attempt}: {where}", flush=True)
        if not store.transition(self.job_id, JobState.RUNNING, f"attempt {self.attempt} started {where}",
                                expected=[JobState.PENDING]):
            return "not started: the job left pending (cancelled?)"
        artifacts = job_artifacts(spec.checkpoints.storage, self.job_id, job.artifact_dir)
        reporter = StoreReporter(store, self.job_id, self.attempt, spec, upload_to=artifacts.url)
        try:
            final_metrics = run_training(spec, artifacts.local_dir, callbacks=[reporter],
                                         resume_from_checkpoint=resume_from,
                                         upload_to=artifacts.url)
            final_dir = artifacts.final
            reporter.final_model(reporter.last_step, final_dir, final_metrics)
        except Exception as exc:
            reporter.flush()
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            store.transition(self.job_id, JobState.FAILED, f"training failed: {error}",
                             expected=[JobState.RUNNING], error=error,
                             attempt_ended=("failed", error))
            raise
        store.transition(self.job_id, JobState.SUCCEEDED, f"final model saved to {final_dir}",
                         expected=[JobState.RUNNING], attempt_ended=("succeeded", None))
        return "succeeded"


def _is_distributed(job_id: int) -> bool:
    from orchestrator.spec import spec_from_dict
    from orchestrator.store import Store

    store = Store()
    try:
        job = store.get_job(job_id)
        return job is not None and spec_from_dict(job.spec).resources.distributed
    finally:
        store.close()


def run(job_id: int, attempt: int, gpus: int, cpus: int) -> int:
    # Inside a Ray Job this joins the job's cluster; for a local cluster orch names it, as
    # several local clusters may share the machine (ORCH_RAY_GCS_ADDRESS, from the executor).
    ray.init(address=os.environ.get("ORCH_RAY_GCS_ADDRESS") or None)
    if _is_distributed(job_id):
        # More than one worker: Ray Train's worker group (workers.distributed). One worker
        # keeps the plain actor below, which starts faster.
        from workers.distributed import run_distributed

        try:
            return run_distributed(job_id, attempt)
        finally:
            ray.shutdown()
    worker = TrainingWorker.options(
        num_gpus=gpus, num_cpus=cpus, name=f"orch-{job_id}-{attempt}",
    ).remote(job_id, attempt)
    try:
        print(ray.get(worker.train.remote()), flush=True)
        return 0
    except ray.exceptions.RayActorError as exc:
        # The worker process died (killed, OOM, node lost): infrastructure, not the job's
        # code. The control plane decides between a retry and failing the job.
        print(f"orch: worker process died: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        return 3
    except ray.exceptions.RayTaskError:
        return 1  # the worker recorded the failure; its traceback is in the log above
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True)
    parser.add_argument("--log-file", type=Path)
    args = parser.parse_args(argv)
    if args.log_file is None:
        return run(args.job_id, args.attempt, args.gpus, args.cpus)
    with tee_output(args.log_file):
        return run(args.job_id, args.attempt, args.gpus, args.cpus)


if __name__ == "__main__":
    sys.exit(main())
