"""Ray Job entrypoint for one attempt of one orch job.

    python -m workers.driver --job-id 7 --attempt 1 --gpus 1 --cpus 2 --workers 1

With one worker, this process is the worker: the executor submits the Ray Job with the
job's GPUs and CPUs as entrypoint resources, so Ray places it (through the Job's supervisor
actor) on a node that has them and sets CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS for it. It
trains here, in a plain process, with no Ray core worker beside the training threads and no
second process per job. With more workers it is a light Ray driver (no torch) that hands
the job to a Ray Train worker group (`workers.distributed`), whose workers hold the
resources.

Either way the workers run the attempt's lifecycle (`workers.attempt`) and record its
outcome through the control plane: succeeded, or failed for an error in the job itself
(never retried). When the process dies instead (killed, out of memory), the Ray Job ends
with the job still running: the control plane sees it and retries the attempt (from the
latest checkpoint) or fails the job.

Everything printed is streamed to the control plane as it is written (`LogShipper`), so
`orch logs` works after the job ended and after the Ray cluster is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.settings import get_settings
from workers.control_plane import AttemptOver, ControlPlaneClient, ControlPlaneGone


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


def train_here(client: ControlPlaneClient) -> int:
    """One worker: the attempt, in this process, on the resources Ray gave the Ray Job."""
    import torch

    from workers import attempt

    attempt.show_logs()
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned the Job's entrypoint resources.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpu_ids = [g for g in visible.split(",") if g.strip()]
    device = "cuda" if torch.cuda.is_available() and gpu_ids else "cpu"
    here = attempt.where_am_i()
    where = (f"on {here['host']} (pid {here['pid']}), Ray GPUs {gpu_ids or 'none'}, "
             f"training on {device}")
    decision = attempt.begin(client, where=where,
                             details={**here, "gpus": gpu_ids, "device": device})
    if not decision.go:
        print(f"not started: {decision.why_not}", flush=True)
        return 0
    try:
        attempt.train(decision, client)
    except AttemptOver:
        print("stopped: the control plane ended this attempt", flush=True)
        return 0
    except Exception:
        # Recorded as failed if it was the job's own error (attempt.train did, and printed
        # the traceback); otherwise (the control plane unreachable) the Ray Job's failure
        # tells the control plane, which retries.
        return 1
    print("succeeded", flush=True)
    return 0


def run(workers: int, gpus: int, cpus: int, client: ControlPlaneClient) -> int:
    if workers <= 1:
        return train_here(client)
    # Inside a Ray Job this joins the job's cluster; for a local cluster orch names it, as
    # several local clusters may share the machine (ORCH_RAY_GCS_ADDRESS, from the executor).
    import ray

    from workers.distributed import run_distributed

    ray.init(address=get_settings().ray_gcs_address or None)
    try:
        return run_distributed(client, gpus=gpus, cpus=cpus, workers=workers)
    finally:
        ray.shutdown()


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
            return run(args.workers, args.gpus, args.cpus, client)
    finally:
        shipper.close()


if __name__ == "__main__":
    sys.exit(main())
