"""Helpers shared by the tests: run the real CLI in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAKE_GPUS = 2
FAKE_CPUS = 4


def run_orch(env: dict[str, str], *args: str, timeout: float = 300,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the real `orch` CLI in a separate process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"orch {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def alive_actor_names(env: dict[str, str]) -> set[str]:
    """Names of the live Ray actors on the test cluster, read in a fresh process (Ray reads
    its token-auth settings once per process, at import)."""
    code = (
        "from ray.util.state import list_actors\n"
        f"for a in list_actors(address='http://127.0.0.1:{env['ORCH_RAY_DASHBOARD_PORT']}',"
        " filters=[('state', '=', 'ALIVE')]):\n"
        "    print(a.name)\n"
    )
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": f"{env['ORCH_HOME']}/ray/auth_token"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, **auth}, capture_output=True,
                          text=True, timeout=60, check=True)
    return {line for line in proc.stdout.splitlines() if line}


@contextmanager
def object_store() -> Iterator[dict[str, str]]:
    """A local S3-compatible object store (moto's server) in its own process, for tests of
    s3:// checkpoint storage without a cloud. Yields the environment that points the AWS
    clients (s3fs, boto) at it; every process given it sees the same buckets."""
    with socket.socket() as probe:  # a free port, chosen by the kernel
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "orch-test",
           "AWS_SECRET_ACCESS_KEY": "orch-test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as conn:
                if conn.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test object store did not start on port {port}")
            time.sleep(0.1)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_bucket(env: dict[str, str], name: str) -> str:
    """Create bucket `name` in the object store `env` points at; its s3:// URL."""
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          region_name=env["AWS_DEFAULT_REGION"])
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


# -- the store --------------------------------------------------------------------------
def new_job(store: Any, **overrides: Any) -> int:
    """A queued job with plausible fields; returns its id."""
    args: dict[str, Any] = {
        "name": "tiny-clm", "objective": "clm", "owner": "alice",
        "spec": {"model": "tiny", "lr": 1e-4}, "spec_yaml": "model: tiny\nlr: 1.0e-4\n",
        "gpus": 1, "cpus": 4,
    }
    args.update(overrides)
    job = store.create_job(**args)
    assert job.id is not None
    return int(job.id)


def state_of(store: Any, job_id: int) -> str:
    job = store.get_job(job_id)
    assert job is not None
    return str(job.state.value)


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)


def add_ckpt(store: Any, job_id: int, step: int, kind: str = "checkpoint") -> int:
    ckpt = store.add_checkpoint(
        job_id, attempt=1, step=step, path=f"/art/{job_id}/checkpoint-{step}",
        size_bytes=3 * 2**30,  # > 2 GiB: needs a 64-bit column
        metrics={"eval_loss": 1.0 / step}, kind=kind,
    )
    assert ckpt.id is not None
    return int(ckpt.id)


def flags(store: Any, job_id: int) -> list[tuple[int, bool, bool, bool]]:
    return [(c.step, c.is_latest, c.is_best, c.deleted)
            for c in store.checkpoints(job_id, include_deleted=True)]
