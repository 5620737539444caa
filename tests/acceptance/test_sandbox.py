"""A spec reaches only what the operator allows, through a real `orch server` process and
the real CLI: refusals are 4xx (or exit 1) with one line naming the field, never quote a
file, never depend on whether a file exists, never connect where a spec says, and leave no
row and no directory; the server's own files are private.

The server runs with the `noop` executor (nothing here needs Ray) and with the roots a team
server has by default (`$ORCH_HOME/data` and `$ORCH_HOME/jobs`, plus the repository's tiny
assets), written out explicitly: the rules are the same whatever the auth mode once they
are explicit.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from orchestrator.store import Store
from tests.support import BILLION_LAUGHS, REPO, run_orch

ASSETS = REPO / "jobs" / "assets"
PORT = 8791
SECRET = "hunter2-do-not-print"
@dataclass
class Server:
    env: dict[str, str]
    home: Path
    url: str
    outside: Path
    store: Store

    def headers(self) -> dict[str, str]:
        """The local CLI's credential: the token file the server writes, if it has one."""
        token = self.home / "api_token"
        return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}

    def submit(self, spec: dict[str, Any] | str) -> httpx.Response:
        body = spec if isinstance(spec, str) else json.dumps({"spec": spec})
        return httpx.post(f"{self.url}/jobs", content=body, timeout=120,
                          headers={**self.headers(), "Content-Type": "application/json"})

    def written(self) -> tuple[list[int | None], list[str]]:
        """The job rows and job directories there are."""
        return ([j.id for j in self.store.list_jobs()],
                sorted(p.name for p in (self.home / "jobs").iterdir()))


def base_spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "sandboxed", "objective": "mlm", "model": str(ASSETS / "models" / "bert-tiny"),
        "dataset": {"train_files": [str(ASSETS / "data" / "lm" / "train.jsonl")],
                    "eval_fraction": 0.1},
        "training": {"max_steps": 2},
    }
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return spec


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("sandbox")
    home = root / "orch_home"
    for where in (home / "data", home / "jobs"):
        where.mkdir(parents=True)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(f"password,{SECRET}\n1,2\n")
    port = PORT + int(os.environ.get("ORCH_TEST_PORT_OFFSET", "0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_", "AWS_"))}
    env.update(ORCH_HOME=str(home), ORCH_SERVER_PORT=str(port), ORCH_EXECUTOR="noop",
               ORCH_DATA_ROOTS=f"{home}/data,{home}/jobs,{ASSETS}",
               ORCH_STORAGE_ROOTS=f"{home}/jobs", ORCH_USER="tester",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    # `orch up` starts the local control plane (and no Ray: the executor is noop).
    run_orch(env, "up", timeout=180, check=True)
    store = Store(f"sqlite:///{home}/orch.db")
    try:
        yield Server(env, home, f"http://127.0.0.1:{port}", outside, store)
    finally:
        store.close()
        run_orch(env, "down", "--keep-ray", timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_outside_the_roots_a_file_is_refused_alike_whether_it_exists_or_not(
        server: Server, tmp_path: Path) -> None:
    before = server.written()
    answers = []
    for name in ("secret.csv", "missing.csv"):
        spec = base_spec(dataset={"train_files": [str(server.outside / name)],
                                  "eval_fraction": 0.1})
        response = server.submit(spec)
        assert response.status_code == 422, response.text
        answers.append(response.text.replace(name, "X"))
        # The same through the CLI: exit 1, one line naming the field.
        spec_file = tmp_path / f"{name}.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        line = one_line_error(run_orch(server.env, "submit", str(spec_file)))
        assert "dataset.train_files: " in line and "ORCH_DATA_ROOTS" in line
        assert SECRET not in line and "password" not in line
    assert answers[0] == answers[1]
    assert SECRET not in answers[0] and "password" not in answers[0]
    assert server.written() == before


def test_a_file_inside_the_roots_is_never_quoted(server: Server) -> None:
    before = server.written()
    data = server.home / "data"
    (data / "strings.jsonl").write_text(f'"{SECRET}"\n')
    (data / "garbage.jsonl").write_text(f"{SECRET}\n")
    for name, words in (("strings.jsonl", "line 1 is not a JSON object"),
                        ("garbage.jsonl", "not valid JSON")):
        response = server.submit(base_spec(dataset={"train_files": [str(data / name)],
                                                    "eval_fraction": 0.1}))
        assert response.status_code == 422 and words in response.text, response.text
        assert SECRET not in response.text
    assert server.written() == before


def test_storage_outside_the_roots_or_at_a_foreign_url_is_refused_without_connecting(
        server: Server) -> None:
    before = server.written()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        cases = ["/etc", "/root/.ssh", f"{server.home}/jobs/../..",
                 f"webhdfs://127.0.0.1:{port}/orch", f"ftp://127.0.0.1:{port}/orch",
                 f"http://127.0.0.1:{port}/orch"]
        for storage in cases:
            response = server.submit(base_spec(checkpoints__storage=storage))
            assert response.status_code == 422, (storage, response.text)
            detail = response.json()["detail"]
            assert detail.startswith("checkpoints.storage: ") and "\n" not in detail
        response = server.submit(base_spec(dataset={
            "train_files": [f"webhdfs://127.0.0.1:{port}/t.jsonl"], "eval_fraction": 0.1}))
        assert response.status_code == 422 and "webhdfs:// URLs are not allowed" in response.text
        with pytest.raises(TimeoutError):
            listener.accept()  # nobody came: the server never connected
    assert server.written() == before


def test_infinity_and_an_out_of_range_priority_are_422(server: Server) -> None:
    before = server.written()
    spec = base_spec(training={"max_steps": 2, "learning_rate": "INF"})
    text = json.dumps({"spec": spec}).replace('"INF"', "Infinity")  # bare, as JSON allows
    response = server.submit(text)
    assert response.status_code == 422, response.text
    assert "training.learning_rate: must be a finite number" in response.text
    response = server.submit(base_spec(priority=2**31))
    assert response.status_code == 422 and "priority: must be <= 2147483647" in response.text
    assert server.written() == before


def _limit_memory() -> None:
    # A bomb that expanded would need tens of GiB: with 2 GiB it dies at once, and the test
    # fails on the traceback rather than by swapping the machine.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def test_a_yaml_alias_bomb_is_refused_at_once_by_orch_validate(server: Server,
                                                              tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(bomb)],
                          env=server.env, cwd=REPO, capture_output=True, text=True,
                          timeout=60, preexec_fn=_limit_memory)
    line = one_line_error(proc)
    assert "line 4: YAML aliases (*name) are not allowed in a spec" in line
    # The first alias stops the parse (line 4): under the 2 GiB memory limit an expanding
    # parser would have died of it, or hit the 60 s timeout, instead of saying this.


def test_the_servers_files_and_a_jobs_directories_are_private(server: Server) -> None:
    assert stat.S_IMODE(server.home.stat().st_mode) == 0o700
    for name in ("orch.db", "server.log"):
        assert stat.S_IMODE((server.home / name).stat().st_mode) == 0o600, name
    # A job directory that already exists (left by an earlier database) refuses the job.
    before = server.written()
    next_id = max(before[0], default=0) + 1  # type: ignore[type-var]
    planted = server.home / "jobs" / str(next_id)
    planted.mkdir()
    response = server.submit(base_spec())
    assert response.status_code == 409 and "already exists" in response.text, response.text
    assert server.written() == (before[0], sorted([*before[1], str(next_id)]))
    planted.rmdir()
    response = server.submit(base_spec())
    assert response.status_code == 201, response.text
    job_dir = Path(response.json()["artifact_dir"])
    assert job_dir == server.home / "jobs" / str(response.json()["id"])
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    data = server.home / "data"  # the operator's (here: this test's) files
    for path in server.home.rglob("*"):  # nothing the server made is open to others
        if path.is_file() and data not in path.parents:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0 or path.name in (
                "server.pid", "server.lock"), path  # written by the CLI, no secrets
