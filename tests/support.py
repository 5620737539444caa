"""Helpers shared by the tests: run the real CLI in its own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


# -- a Ray stand-in for control-plane tests ---------------------------------------------
@dataclass
class FakeExecutor:
    """Records what the scheduler hands to Ray; statuses are set by the test."""

    statuses: dict[str, Any] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    launches: list[Any] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    fail_submit: bool = False
    down: bool = False  # the whole cluster is unreachable
    log_text: str = "line 1\nTraceback: boom"
    jobs_url: str | None = None

    def submit(self, launch: Any) -> None:
        from orchestrator.executor import RayJobInfo, RayStatus

        if self.fail_submit:
            raise RuntimeError("dashboard unreachable")
        self.submitted.append(launch.submission_id)
        self.launches.append(launch)
        self.statuses[launch.submission_id] = RayJobInfo(RayStatus.PENDING)

    def info(self, submission: str) -> Any:
        from orchestrator.executor import RayJobInfo, RayStatus

        if self.down:
            raise ConnectionError("cluster unreachable")
        return self.statuses.get(submission, RayJobInfo(RayStatus.MISSING))

    def stop(self, submission: str) -> None:
        from orchestrator.executor import RayJobInfo, RayStatus

        self.stopped.append(submission)
        self.statuses[submission] = RayJobInfo(RayStatus.STOPPED)

    def logs(self, submission: str) -> str | None:
        return self.log_text


# -- an attempt on an in-process control plane ------------------------------------------
@dataclass
class AttemptSession:
    """One admitted job on a control plane served in this process (the real app, store and
    scheduler; Ray replaced by FakeExecutor), and a worker client holding its attempt's
    token: what a worker has inside a Ray Job, for tests that run the worker side here."""

    store: Any
    plane: Any
    fake: FakeExecutor
    http: Any
    job_id: int
    root: Path

    def client(self, job_id: int | None = None) -> Any:
        """A worker's client for the job's current attempt."""
        from fastapi.testclient import TestClient

        from workers.control_plane import ControlPlaneClient

        wanted = job_id or self.job_id
        launch = [x for x in self.fake.launches if x.job_id == wanted][-1]
        return ControlPlaneClient("http://testserver", launch.token, timeout=5,
                                  http=TestClient(self.http.app))

    def admit_again(self) -> None:
        """The scheduler admits the job's next attempt (after a retry requeued it)."""
        self.plane.scheduler.tick()

    def submit(self, spec: Any, **job: Any) -> int:
        """Another job on the same control plane, admitted; its id."""
        job_id = _create(self.store, spec, self.root, **job)
        self.plane.scheduler.tick()
        return job_id


def _create(store: Any, spec: Any, root: Path, **job: Any) -> int:
    created = store.create_job(
        name=spec.name, objective=spec.objective.value, owner="tester", spec=spec.to_dict(),
        spec_yaml="", gpus=spec.resources.gpus, cpus=spec.resources.total_cpus,
        artifact_root=root, **job)
    return int(created.id)


@contextmanager
def attempt_session(tmp_path: Path, spec: Any, *, storage_root: Path | None = None,
                    **job: Any) -> Iterator[AttemptSession]:
    from fastapi.testclient import TestClient

    from orchestrator.cluster import Capacity
    from orchestrator.server import ControlPlane, create_app
    from orchestrator.store import Store

    store = Store(f"sqlite:///{tmp_path}/orch.db")
    fake = FakeExecutor()
    plane = ControlPlane(store, fake, Capacity(gpus=4, cpus=64, nodes=1), interval=3600)
    root = storage_root or tmp_path / "jobs"
    job_id = _create(store, spec, root, **job)
    try:
        with TestClient(create_app(plane)) as http:
            plane.scheduler.tick()
            yield AttemptSession(store, plane, fake, http, job_id, root)
    finally:
        store.close()


def mlm_spec_dict(**training: Any) -> dict[str, Any]:
    """A valid, path-resolved spec as the CLI sends it: the tiny BERT, 5 steps."""
    from orchestrator.spec import build_spec

    assets = REPO / "jobs" / "assets"
    return build_spec({
        "name": "api-test", "objective": "mlm", "model": str(assets / "models" / "bert-tiny"),
        "dataset": {"train_files": [str(assets / "data" / "lm" / "train.jsonl")],
                    "eval_fraction": 0.1},
        "resources": {"gpus": 1}, "training": {"max_steps": 5, **training},
    }).to_dict()


def as_local_user(client: Any) -> Any:
    """A TestClient of `create_app()` (local mode) that sends the app's local token, as the
    CLI sends the one in $ORCH_HOME/api_token: it acts as the OS user, an admin."""
    client.headers["Authorization"] = f"Bearer {client.app.state.local_token}"
    return client


TEAM = {"root": {"role": "admin"}, "alice": {"gpu_cap": 1}, "bob": {"max_priority": 10}}


@contextmanager
def team_api(store: Any, gpus: int = 4) -> Iterator[tuple[Any, dict[str, dict[str, str]]]]:
    """A team server in this process (the caller sets ORCH_AUTH=users) with the users of
    TEAM, made in the store as `orch users add --database` makes them; yields a TestClient
    without credentials and, per user, the headers that carry their token."""
    from fastapi.testclient import TestClient

    from orchestrator.cluster import Capacity
    from orchestrator.server import ControlPlane, create_app

    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=gpus, cpus=64, nodes=1),
                         interval=3600)
    assert plane.settings.auth == "users"
    headers = {name: {"Authorization": f"Bearer {store.create_user(name, actor='op', **kw)[1].token}"}
               for name, kw in TEAM.items()}
    with TestClient(create_app(plane)) as client:
        yield client, headers


@contextmanager
def served(app: Any) -> Iterator[str]:
    """Serve an ASGI app over real HTTP on 127.0.0.1 (a free port) from a thread of this
    process, for workers in other processes to reach; yields its URL. The app's lifespan is
    not run here: the caller runs it (e.g. inside `with TestClient(app)`)."""
    import threading

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def fresh_database(kind: str, tmp_path: Path, schema: str) -> Iterator[str]:
    """The URL of a fresh, empty database: a SQLite file under `tmp_path`, or a new
    PostgreSQL schema (dropped afterwards; unreachable PostgreSQL skips, and fails in CI)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/db/orch.db"
        return
    require_postgres()
    with postgres_schema(schema) as url:
        yield url


def wait_until(predicate: Any, timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def assert_each_live_loss_once(store: Any, job_id: int) -> list[int]:
    """No train_loss step is counted twice after a resume; returns the live steps."""
    steps = Counter(m.step for m in store.metrics(job_id, name="train_loss"))
    assert not {s: n for s, n in steps.items() if n > 1}, steps
    return sorted(steps)


# -- PostgreSQL ---------------------------------------------------------------------------
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_url() -> str:
    import os

    return os.environ.get("ORCH_TEST_POSTGRES_URL", DEFAULT_PG_URL)


def postgres_unreachable() -> str | None:
    """Why the test PostgreSQL cannot be used, or None."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = postgres_url()
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"PostgreSQL at {url} unreachable: {exc}"
    return None


def require_postgres() -> None:
    """Skip when PostgreSQL is unreachable; in CI that is a failure instead."""
    import os

    import pytest

    reason = postgres_unreachable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (a skipped PostgreSQL test in CI is a failure)")
        pytest.skip(reason)


@contextmanager
def postgres_schema(name: str) -> Iterator[str]:
    """A URL whose connections see only a brand-new schema `name` (dropped afterwards), so
    tests in parallel processes, and other users of the database, never see each other."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(postgres_url())
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    drop = f"DROP SCHEMA IF EXISTS {name} CASCADE"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(f"CREATE SCHEMA {name}")
    if base.drivername == "postgresql":
        base = base.set(drivername="postgresql+psycopg")
    try:
        # Unqualified names (the orch tables, alembic_version) resolve in this schema only.
        yield base.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(
            hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(drop)


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


# A YAML alias bomb: 10^9 "lol"s in under 500 bytes, for the spec parser's refusal.
BILLION_LAUGHS = """\
name: lol
objective: clm
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


class Killed(BaseException):
    """The worker process dies: nothing more is recorded (not an Exception, so the attempt
    does not report it as an error in the job)."""


def dies_after_logging(step: int) -> Any:
    """A Trainer callback that kills the run (raises Killed) once `step`'s loss is logged,
    after the callbacks before it (the reporter) have recorded it. transformers is imported
    here, not when the helpers are: most tests never need it."""
    from transformers import TrainerCallback

    class DiesAfterLogging(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kwargs: Any) -> None:
            if state.global_step == step and "loss" in (logs or {}):
                raise Killed(f"killed after step {step}")

    return DiesAfterLogging()
