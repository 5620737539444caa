"""A team server as a team uses it: a real `orch server --auth users` process over real
HTTP, with an admin (root) and two users (alice, with a GPU cap of 1; bob, with a priority
limit of 10).

Most of it runs on the no-op executor (ORCH_EXECUTOR=noop; with ORCH_NOOP_FINISH=false its
jobs hold their GPUs until cancelled), on SQLite and on PostgreSQL. One real Ray job, on the
session's cluster, checks what a Ray Job carries (no database URL, no user's token), what
its attempt token can do, and that its reporting survives the control plane being killed
for 20 s.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from orchestrator.store import Store
from tests.support import REPO, fresh_database, mlm_spec_dict, run_orch, wait_until

ASSETS = REPO / "jobs" / "assets"
OFFSET = int(os.environ.get("ORCH_TEST_PORT_OFFSET", "0"))
PORTS = {"sqlite": 8785 + OFFSET, "postgresql": 8786 + OFFSET, "ray": 8787 + OFFSET,
         "local": 8788 + OFFSET}


# -- a server process ----------------------------------------------------------------------
@dataclass
class Server:
    env: dict[str, str]
    args: list[str]
    log: Path
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    tokens: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        """`orch server ...` in its own process; returns once /health answers."""
        port = int(self.args[self.args.index("--port") + 1])
        self.url = f"http://127.0.0.1:{port}"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "server",
                                          *self.args], env=self.env, cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"orch server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def as_user(self, name: str | None = None, token: str | None = None) -> httpx.Client:
        """An HTTP client holding `name`'s token (or `token`; neither: no credential)."""
        token = token or (self.tokens[name] if name else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def cli_env(self, name: str) -> dict[str, str]:
        """The environment of `name`'s CLI: the team server and their token."""
        return {**self.env, "ORCH_SERVER_URL": self.url, "ORCH_API_TOKEN": self.tokens[name]}


def base_env(home: Path, database_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(ORCH_HOME=str(home), ORCH_DATABASE_URL=database_url,
               ORCH_SERVER_PORT=str(port), ORCH_SCHEDULER_INTERVAL="0.3",
               # Where this team's specs may read and write: the test assets and its home.
               ORCH_DATA_ROOTS=str(ASSETS), ORCH_STORAGE_ROOTS=str(home),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def first_admin(env: dict[str, str]) -> str:
    """`orch users add root --admin --database`, as on the server's host: root's token."""
    proc = run_orch(env, "users", "add", "root", "--admin", "--database", "-o", "json",
                    check=True)
    return str(json.loads(proc.stdout)["token"]["token"])


@pytest.fixture(scope="module",
                params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def team_server(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Store]]:
    kind = request.param
    home = tmp_path_factory.mktemp(f"team-{kind}")
    with fresh_database(kind, home, f"orch_team_{os.getpid()}") as url:
        env = base_env(home, url, PORTS[kind])
        env.update(ORCH_EXECUTOR="noop", ORCH_NOOP_FINISH="false", ORCH_NOOP_GPUS="4")
        server = Server(env, ["--auth", "users", "--host", "127.0.0.1", "--port",
                              str(PORTS[kind])], home / "server.log")
        server.tokens["root"] = first_admin(env)
        server.start()
        try:
            with server.as_user("root") as root:
                for name, limits in (("alice", {"gpu_cap": 1}), ("bob", {"max_priority": 10})):
                    made = root.post("/users", json={"name": name, **limits})
                    server.tokens[name] = made.json()["token"]["token"]
            with Store(url) as store:
                yield server, store
        finally:
            server.stop()


@pytest.fixture
def team(team_server: tuple[Server, Store]) -> Iterator[tuple[Server, Store]]:
    """The module's team server; each test's jobs are cancelled after it (they hold GPUs)."""
    yield team_server
    server, store = team_server
    with server.as_user("root") as root:
        for job in store.list_jobs(states=["queued", "pending", "running"]):
            root.post(f"/jobs/{job.id}/cancel")


def submit(client: httpx.Client, **changes: Any) -> httpx.Response:
    return client.post("/jobs", json={"spec": {**mlm_spec_dict(), **changes}})


def running(store: Store, job_id: int) -> bool:
    return store.require_job(job_id).state == "running"


# -- identity ------------------------------------------------------------------------------
def test_no_token_or_a_wrong_token_is_401_on_every_route(team: tuple[Server, Store]) -> None:
    from orchestrator.server import create_app

    server, _ = team
    routes = [(method, (r.path or "").replace("{job_id}", "1").replace("{name}", "bob"))
              for r in iter_route_contexts(create_app().routes)
              for method in sorted(r.methods or ()) if method != "HEAD"]
    assert len(routes) > 25 and ("POST", "/worker/metrics") in routes
    for token in ("", "orch_u_" + "x" * 43, "orch_w_" + "x" * 43, server.tokens["bob"] + "x"):
        with server.as_user(token=token or None) as client:
            for method, path in routes:
                answer = client.request(method, path, json={} if method == "POST" else None)
                if dashboard_page(path):
                    # The dashboard's pages let a browser through to send it to the login
                    # page: without a session they show that, or refuse, and nothing else.
                    assert answer.status_code in (200, 303, 307, 403, 404, 405), (method, path)
                    assert answer.status_code != 200 or "Sign in to orch" in answer.text, path
                    continue
                expected = 200 if path == "/health" else 401
                assert answer.status_code == expected, (method, path, token[:8], answer.text)


def dashboard_page(path: str) -> bool:
    from orchestrator.dashboard import OPEN_PATHS

    return path in OPEN_PATHS or any(p.endswith("/") and p != "/" and path.startswith(p)
                                     for p in OPEN_PATHS)


def test_bob_cannot_be_bob2(team: tuple[Server, Store]) -> None:
    server, store = team
    with server.as_user("bob") as bob:
        # What the client says about itself counts for nothing: the token is bob's.
        job = bob.post("/jobs", json={"spec": mlm_spec_dict()}, headers={"X-Orch-User": "bob2"})
        assert job.status_code == 201 and job.json()["owner"] == "bob"
        assert bob.get("/whoami").json()["name"] == "bob"
        # Nor can bob make a bob2.
        assert bob.post("/users", json={"name": "bob2"}).status_code == 403
    assert store.get_user("bob2") is None
    # No such user: no token works for one.
    with server.as_user(token="orch_u_bob2" + "x" * 36) as bob2:
        assert bob2.get("/whoami").status_code == 401


def test_bob_cannot_cancel_or_resume_alices_job_an_admin_can(team: tuple[Server, Store],
                                                            tmp_path: Path) -> None:
    server, store = team
    alice, bob, root = server.as_user("alice"), server.as_user("bob"), server.as_user("root")
    job = submit(alice).json()["id"]
    wait_until(lambda: running(store, job), 30, "alice's job to run")
    history = [(e.to_state, e.reason) for e in store.events(job)]
    refused = bob.post(f"/jobs/{job}/cancel")
    assert refused.status_code == 403 and "belongs to alice" in refused.json()["detail"]
    assert running(store, job) and [(e.to_state, e.reason) for e in store.events(job)] == history

    assert root.post(f"/jobs/{job}/cancel").json()["cancelled"]
    assert store.events(job)[-1].details == {"user": "root"}

    # A checkpoint to resume from, as a worker would have registered it.
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"w")
    (checkpoint / "trainer_state.json").write_text("{}")
    store.add_checkpoint(job, attempt=1, step=3, path=str(checkpoint), size_bytes=1, metrics={})
    count = len(store.list_jobs())
    assert bob.post(f"/jobs/{job}/resume").status_code == 403
    assert len(store.list_jobs()) == count
    resumed = root.post(f"/jobs/{job}/resume")
    assert resumed.status_code == 201 and resumed.json()["owner"] == "alice"
    assert store.events(resumed.json()["id"])[0].details["user"] == "root"  # type: ignore[index]

    # `orch status` shows who did what.
    shown = run_orch({**server.cli_env("alice"), "COLUMNS": "200"}, "status", str(job),
                     check=True).stdout
    # The history's row of the cancel: to `cancelled`, by `root`, and the reason.
    assert any(re.search(r"\bcancelled\s+root\s+cancelled by root", line)
               for line in shown.splitlines()), shown
    for client in (alice, bob, root):
        client.close()


# -- limits --------------------------------------------------------------------------------
def test_the_gpu_cap_holds_per_real_user(team: tuple[Server, Store]) -> None:
    server, store = team
    with server.as_user("alice") as alice, server.as_user("bob") as bob:
        first = submit(alice).json()["id"]
        second = submit(alice).json()["id"]
        mine = submit(bob).json()["id"]  # bob has no cap; alice's jobs do not hold him up
        wait_until(lambda: running(store, first) and running(store, mine), 30, "admission")
        time.sleep(1)  # a few scheduler ticks
        status = alice.get(f"/jobs/{second}").json()
        assert status["state"] == "queued"
        assert status["wait_reason"] == ("waiting for alice's other jobs: they hold 1 GPUs and "
                                         "the per-user cap is 1")
        refused = submit(alice, resources={**mlm_spec_dict()["resources"], "gpus": 2,
                                           "workers": 2})
        assert refused.status_code == 422
        assert "alice may hold at most 1 at once" in refused.json()["detail"]
        alice.post(f"/jobs/{first}/cancel")
        wait_until(lambda: running(store, second), 30, "alice's second job, once the first ended")


def test_a_priority_above_the_limit_is_refused(team: tuple[Server, Store]) -> None:
    server, store = team
    before = len(store.list_jobs())
    with server.as_user("bob") as bob, server.as_user("alice") as alice:
        answer = submit(bob, priority=11)
        assert answer.status_code == 422
        assert "priority: 11 is above bob's limit of 10" in answer.json()["detail"]
        assert submit(alice, priority=101).status_code == 422  # ORCH_MAX_PRIORITY: 100
        answer = submit(alice, priority=2**31)
        assert answer.status_code == 422 and "priority" in answer.json()["detail"]
    assert len(store.list_jobs()) == before


def test_hardening_of_requests(team: tuple[Server, Store]) -> None:
    server, store = team
    before = len(store.list_jobs())
    with server.as_user("alice") as alice:
        big = {"spec": {**mlm_spec_dict(), "name": "x"}, "spec_yaml": "#" * (2 * 2**20)}
        assert alice.post("/jobs", json=big).status_code == 413
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert alice.get(path).status_code == 200
            assert httpx.get(f"{server.url}{path}").status_code == 401
        for value in ("Bearer \u00e9".encode("latin-1"), b"Bearer a b", b"Basic Ym9i"):
            answer = httpx.get(f"{server.url}/jobs", headers={"Authorization": value})  # type: ignore[dict-item]
            assert answer.status_code == 401
    assert len(store.list_jobs()) == before


# -- the local mode ------------------------------------------------------------------------
def test_the_local_token_file_is_0600_and_required(tmp_path: Path) -> None:
    env = base_env(tmp_path, f"sqlite:///{tmp_path}/orch.db", PORTS["local"])
    env.update(ORCH_EXECUTOR="noop")
    server = Server(env, ["--port", str(PORTS["local"])], tmp_path / "server.log")
    server.start()
    try:
        token_file = tmp_path / "api_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        with server.as_user() as nobody, server.as_user(token=token_file.read_text()) as owner:
            assert nobody.get("/jobs").status_code == 401
            assert owner.get("/whoami").json()["role"] == "admin"
        # The CLI of the same OS user reads the file by itself.
        assert run_orch(env, "list", "-o", "json", check=True).stdout.strip() == "[]"
    finally:
        server.stop()


# -- one real job on Ray ---------------------------------------------------------------------
def _ray_runtime_env(orch_env: dict[str, str], submission_id: str) -> dict[str, Any]:
    """The Ray Job's runtime_env as Ray's Jobs API gives it to anyone who may list jobs (read
    in a fresh process: Ray reads its token-auth settings once per process, at import)."""
    code = ("import json, sys\nfrom ray.job_submission import JobSubmissionClient\n"
            f"info = JobSubmissionClient({orch_env['_JOBS_URL']!r}).get_job_info({submission_id!r})\n"
            "print(json.dumps(info.runtime_env))\n")
    auth = {"RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": f"{orch_env['ORCH_HOME']}/ray/auth_token"}
    env = {k: v for k, v in orch_env.items() if k != "_JOBS_URL"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, **auth},
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _seed_job_ids(url: str) -> int:
    """Make this database's job ids start far above the session server's: both submit to
    the same Ray cluster, whose submission ids (orch-<job>-<attempt>) must not collide. A
    cancelled placeholder job with a random high id does it on SQLite. Returns its id."""
    from sqlalchemy import insert

    from orchestrator.models import Job, utcnow

    seed = random.randint(10**6, 10**9)
    with Store(url) as store, store.engine.begin() as conn:
        now = utcnow()
        conn.execute(insert(Job.__table__).values(
            id=seed, name="id-seed", objective="clm", owner="root", state="cancelled",
            priority=0, spec={}, spec_yaml="", gpus=0, cpus=0, attempts=0, max_attempts=1,
            artifact_dir="", created_at=now, updated_at=now))
    return seed


@pytest.mark.ray
def test_a_real_ray_job_carries_no_secret_and_outlives_a_control_plane_outage(  # type: ignore[no-untyped-def]
        orch_env, tmp_path: Path) -> None:
    started = time.monotonic()
    home = tmp_path / "home"
    (home / "ray").mkdir(parents=True)
    # The session's Ray cluster, reached as its own server reaches it.
    shutil.copy(Path(orch_env["ORCH_HOME"]) / "ray" / "auth_token", home / "ray" / "auth_token")
    url = f"sqlite:///{tmp_path}/team.db"
    env = base_env(home, url, PORTS["ray"])
    env.update({k: orch_env[k] for k in ("ORCH_RAY_PORT", "ORCH_RAY_DASHBOARD_PORT",
                                         "ORCH_RAY_CLIENT_PORT", "ORCH_RAY_AGENT_PORT")})
    other_job = _seed_job_ids(url)
    server = Server(env, ["--auth", "users", "--host", "127.0.0.1", "--port",
                          str(PORTS["ray"])], home / "server.log")
    server.tokens["root"] = first_admin(env)
    server.start()
    try:
        with server.as_user("root") as root:
            server.tokens["alice"] = root.post("/users", json={"name": "alice"}).json()[
                "token"]["token"]
        submitted = run_orch(server.cli_env("alice"), "submit", "jobs/gpt2_clm.yaml", "-q",
                             "--set", "training.max_steps=60", "--set", "training.logging_steps=1",
                             "--set", "training.eval_steps=30", "--set", "training.save_steps=30",
                             "--set", "resources.cpus=1", check=True)
        job = int(submitted.stdout)
        alice = server.as_user("alice")

        def steps() -> list[int]:
            rows = alice.get(f"/jobs/{job}/metrics", params={"name": "train_loss"}).json()
            return [m["step"] for m in rows["metrics"]]

        wait_until(lambda: steps(), 240, "the first train_loss")
        # What Ray holds for the job: the server's URL and an attempt token, nothing more.
        ray_side = _ray_runtime_env({**orch_env, "_JOBS_URL":
                                     f"http://127.0.0.1:{orch_env['ORCH_RAY_DASHBOARD_PORT']}"},
                                    f"orch-{job}-1")
        carried = ray_side["env_vars"]
        text = json.dumps(ray_side)
        assert carried["ORCH_SERVER_URL"] == server.url
        assert carried["ORCH_ATTEMPT_TOKEN"].startswith("orch_w_")
        assert not [k for k in carried if "DATABASE" in k or k == "ORCH_API_TOKEN"], carried
        for secret in ("sqlite", "postgres", url, "orch_u_", *server.tokens.values()):
            assert secret not in text, secret

        # The attempt token reports for its own attempt and can do nothing else.
        with server.as_user(token=carried["ORCH_ATTEMPT_TOKEN"]) as attempt:
            assert attempt.get("/worker/job").json()["job_id"] == job
            for method, path in (("GET", f"/jobs/{other_job}"), ("GET", "/jobs"),
                                 ("POST", f"/jobs/{other_job}/cancel"),
                                 ("POST", f"/jobs/{job}/cancel"), ("GET", "/users")):
                assert attempt.request(method, path).status_code == 403, path
            assert alice.get(f"/jobs/{job}").json()["state"] == "running"

            # The control plane dies while the job trains, and is back 20 s later.
            killed_at = len(steps())
            server.kill()
            time.sleep(20)
            server.start()
            wait_until(lambda: alice.get(f"/jobs/{job}").json()["state"]
                       in ("succeeded", "failed"), 300, "the job to end")
            status = alice.get(f"/jobs/{job}").json()
            assert status["state"] == "succeeded", status["error"]
            assert [a["outcome"] for a in status["attempt_history"]] == ["succeeded"]
            # No metric lost or counted twice, across the outage.
            assert sorted(steps()) == list(range(1, 61)), (killed_at, steps())
            # Once the attempt has ended its token is dead.
            assert attempt.get("/worker/job").status_code == 401
        alice.close()
        print(f"real job on Ray: killed the server after {killed_at} steps; test took "
              f"{time.monotonic() - started:.0f}s")
    finally:
        server.stop()
