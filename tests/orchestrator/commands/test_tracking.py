"""`orch tensorboard`: the command for a job's event files, a resumed job's chain, several
jobs side by side; a job without them, or unknown, is one line."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient

from orchestrator import cli
from orchestrator.cluster import Capacity
from orchestrator.server import ControlPlane, create_app
from orchestrator.store import Store
from tests.support import FakeExecutor, served


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A control plane over real HTTP with: a job writing event files, a job resuming it,
    another writing some, and one that writes none."""
    for name in ("ORCH_SERVER_URL", "ORCH_API_TOKEN", "ORCH_AUTH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    store = Store(f"sqlite:///{tmp_path}/orch.db")

    def job(tensorboard: bool | None, **fields: Any) -> Any:
        spec = {"name": "j", "tracking": None if tensorboard is None else
                {"tensorboard": tensorboard, "mlflow": None}}
        return store.create_job(name="j", objective="clm", owner="me", spec=spec, spec_yaml="",
                                gpus=0, cpus=1, artifact_root=tmp_path / "jobs", **fields)

    made = {"first": job(True), "plain": job(None)}
    made["resumed"] = job(True, parent_job_id=made["first"].id)
    made["other"] = job(True)
    (Path(made["first"].artifact_dir) / "tensorboard").mkdir(parents=True)
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=1, cpus=4, nodes=1), interval=3600)
    with TestClient(create_app(plane)) as http, served(http.app) as url:
        monkeypatch.setenv("ORCH_SERVER_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", http.app.state.local_token)
        yield {name: (j.id, j.artifact_dir) for name, j in made.items()}
    store.close()


def orch(*args: str) -> Result:
    return CliRunner().invoke(cli.cli, list(args))


def test_one_job_is_one_logdir(jobs: dict[str, Any]) -> None:
    job_id, directory = jobs["first"]
    result = orch("tensorboard", str(job_id), "--port", "6007")
    assert result.exit_code == 0, result.output
    assert shlex.split(result.stdout) == ["tensorboard", "--logdir",
                                          f"{directory}/tensorboard", "--port", "6007"]
    assert result.stderr == ""  # the directory is here


def test_a_resumed_job_and_several_jobs_are_named_runs(jobs: dict[str, Any]) -> None:
    (first, first_dir), (resumed, resumed_dir) = jobs["first"], jobs["resumed"]
    other, other_dir = jobs["other"]
    result = orch("tensorboard", str(resumed), str(other), "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["logdirs"] == {f"job-{first}": f"{first_dir}/tensorboard",
                               f"job-{resumed}": f"{resumed_dir}/tensorboard",
                               f"job-{other}": f"{other_dir}/tensorboard"}
    assert shlex.split(data["command"]) == ["tensorboard", "--logdir_spec", ",".join(
        f"{name}:{path}" for name, path in data["logdirs"].items())]
    table = orch("tensorboard", str(resumed))
    assert "2 of the directories are not on this machine" not in table.stderr
    assert "1 of the directories are not on this machine" in table.stderr


def test_a_job_without_event_files_or_unknown_is_one_line(jobs: dict[str, Any]) -> None:
    plain, _ = jobs["plain"]
    for args, expected in (((str(plain),), f"job {plain} writes no TensorBoard event files"),
                           (("424242",), "job 424242 not found")):
        result = orch("tensorboard", *args)
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [f"error: {expected}" + (
            "; submit it with tracking: {tensorboard: true} in its spec" if "writes" in expected
            else "")]
