"""Ray Job entrypoint for one attempt of one orch job.

    python -m workers.driver --job-id 7 --attempt 1 --gpus 1 --cpus 2 --workers 1

The driver is light: it imports neither torch nor transformers, so the workers' own
start-up begins at once. With one worker it starts one `TrainingWorker` actor that holds
the job's GPUs and CPUs (Ray schedules it onto a node that has them) and waits; with more,
a Ray Train worker group (`workers.distributed`). The workers run the attempt's lifecycle
(`workers.attempt`) and record its outcome through the control plane: succeeded, or failed
for an error in the job itself (never retried). When the actor's process dies instead, the
driver reports why (the attempt's cause) and exits non-zero; the control plane sees the
Ray Job end with the job still running and retries it (from the latest checkpoint) or
fails it.

Everything the driver and its workers print is streamed to the control plane as it is
written (`LogShipper`), so `orch logs` works after the job ended and after the Ray cluster
is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from orchestrator.settings import get_settings
from workers.control_plane import AttemptOver, ControlPlaneClient, ControlPlaneGone

# Exit codes the control plane sees as the Ray Job's: 0 done (the outcome is recorded),
# 1 the job failed (recorded), 3 the worker process died (infrastructure: retried).
EXIT_WORKER_DIED = 3


class LogShipper:
    """Sends what the attempt prints to the control plane, about once a second.

    Bounded: while the server is unreachable at most `max_buffer` bytes wait; older bytes
    are dropped (the server marks the gap in the log). Never blocks the writer."""

    def __init__(self, client: ControlPlaneClient, every: float = 1.0,
                 max_buffer: int = 16 * 1024 * 1024) -> None:
        self.client = client
        self.every = every
        self.max_buffer = max_buffer
        self.offset = 0  # where self._buffer starts in the attempt's log
        self._buffer = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orch-logs", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buffer += data
            excess = len(self._buffer) - self.max_buffer
            if excess > 0:
                del self._buffer[:excess]
                self.offset += excess

    def _send(self, timeout: float) -> bool:
        with self._lock:
            offset, chunk = self.offset, bytes(self._buffer[:1024 * 1024])
        if not chunk:
            return True
        try:
            size = self.client.log_chunk(offset, chunk, timeout=timeout)
        except (ControlPlaneGone, AttemptOver):
            return False
        except Exception:  # never let log shipping take the attempt down
            return False
        with self._lock:
            done = max(0, min(size - self.offset, len(self._buffer)))
            del self._buffer[:done]
            self.offset += done
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._send(timeout=0)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is left (waiting up to `timeout` seconds for the server)."""
        self._stop.set()
        self._thread.join(timeout=5)
        while self._buffer and self._send(timeout=timeout):
            pass


@contextmanager
def tee_output(shipper: LogShipper) -> Iterator[None]:
    """Copy everything written to file descriptors 1 and 2 to the shipper as well."""
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
                shipper.write(chunk)
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


@ray.remote(max_restarts=0)
class TrainingWorker:
    """One fine-tune, in a Ray worker process holding the job's GPUs."""

    def train(self) -> str:
        import torch

        from workers import attempt

        attempt.show_logs()
        client = ControlPlaneClient.from_environment()
        gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        device = "cuda" if torch.cuda.is_available() and gpu_ids else "cpu"
        here = attempt.where_am_i()
        where = (f"on {here['host']} (pid {here['pid']}), Ray GPUs {gpu_ids or 'none'}, "
                 f"training on {device}")
        decision = attempt.begin(client, where=where,
                                 details={**here, "gpus": list(gpu_ids), "device": device})
        if not decision.go:
            return f"not started: {decision.why_not}"
        try:
            attempt.train(decision, client)
        except AttemptOver:
            return "stopped: the control plane ended this attempt"
        return "succeeded"


def run(job_id: int, attempt: int, gpus: int, cpus: int, workers: int,
        client: ControlPlaneClient) -> int:
    # Inside a Ray Job this joins the job's cluster; for a local cluster orch names it, as
    # several local clusters may share the machine (ORCH_RAY_GCS_ADDRESS, from the executor).
    ray.init(address=get_settings().ray_gcs_address or None)
    try:
        if workers > 1:
            # Ray Train's worker group (workers.distributed). One worker keeps the plain
            # actor below, which starts faster.
            from workers.distributed import run_distributed

            return run_distributed(client, gpus=gpus, cpus=cpus, workers=workers)
        worker = TrainingWorker.options(  # type: ignore[attr-defined]
            num_gpus=gpus, num_cpus=cpus, name=f"orch-{job_id}-{attempt}").remote()
        try:
            print(ray.get(worker.train.remote()), flush=True)
            return 0
        except ray.exceptions.RayActorError as exc:
            # The worker process died (killed, OOM, node lost): infrastructure, not the
            # job's code. The control plane decides between a retry and failing the job.
            cause = f"worker process died: {str(exc).splitlines()[0]}"
            print(f"orch: {cause}", file=sys.stderr, flush=True)
            report_cause(client, cause)
            return EXIT_WORKER_DIED
        except ray.exceptions.RayTaskError:
            return 1  # the worker recorded the failure; its traceback is in the log above
    finally:
        ray.shutdown()


def report_cause(client: ControlPlaneClient, cause: str) -> None:
    """Tell the control plane why the attempt is ending badly; best effort (if it cannot be
    reached, the Ray Job's failure still tells it something went wrong)."""
    try:
        client.call("POST", "/worker/cause", json={"reason": cause, "key": "cause"},
                    timeout=30)
    except Exception as exc:
        print(f"orch: could not report the cause to the control plane: {exc}", file=sys.stderr,
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--job-id", type=int, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--cpus", type=int, required=True, help="CPUs per worker")
    parser.add_argument("--workers", type=int, default=1)
    args: Any = parser.parse_args(argv)
    client = ControlPlaneClient.from_environment()
    shipper = LogShipper(client)
    try:
        with tee_output(shipper):
            return run(args.job_id, args.attempt, args.gpus, args.cpus, args.workers, client)
    finally:
        shipper.close()


if __name__ == "__main__":
    sys.exit(main())
