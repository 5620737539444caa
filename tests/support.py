"""Helpers shared by the tests: run the real CLI in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


# The local Ray clusters the tests start, by their ports before ORCH_TEST_PORT_OFFSET: the
# session cluster (tests/conftest.py) and tests/orchestrator/test_cluster.py's own.
SESSION_CLUSTER_PORTS = {"ORCH_RAY_PORT": 6391, "ORCH_RAY_DASHBOARD_PORT": 8266,
                         "ORCH_RAY_CLIENT_PORT": 9011, "ORCH_RAY_AGENT_PORT": 52375}
CLUSTER_TEST_PORTS = {"ORCH_RAY_PORT": 6394, "ORCH_RAY_DASHBOARD_PORT": 8269,
                      "ORCH_RAY_CLIENT_PORT": 9041, "ORCH_RAY_AGENT_PORT": 52405}


def offset_ports(base: dict[str, int]) -> dict[str, int]:
    """`base` shifted by ORCH_TEST_PORT_OFFSET (two test sessions on one machine)."""
    import os

    offset = int(os.environ.get("ORCH_TEST_PORT_OFFSET", "0"))
    return {key: port + offset for key, port in base.items()}


def stop_test_clusters() -> None:
    """Stop what is left of the clusters the tests start (an interrupted run), and nothing
    else: not `ray stop`, which stops every Ray cluster on the machine."""
    import os

    from orchestrator import cluster

    os.environ.pop("RAY_ADDRESS", None)
    for base in (SESSION_CLUSTER_PORTS, CLUSTER_TEST_PORTS):
        os.environ.update({key: str(port) for key, port in offset_ports(base).items()})
        cluster.stop_local()


if __name__ == "__main__":
    stop_test_clusters()
