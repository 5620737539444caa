"""CLI rendering against the real HTTP API (a TestClient in place of the HTTP client)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

import orchestrator.client
from orchestrator import cli
from orchestrator.cluster import Capacity
from orchestrator.server import ControlPlane, create_app
from orchestrator.store import Store
from tests.support import FakeExecutor, as_local_user
from tests.support import mlm_spec_dict as spec_dict


@pytest.fixture
def api(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The CLI's real Client, its HTTP requests answered by the app in this process."""
    monkeypatch.setenv("ORCH_SERVER_URL", "http://testserver")
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=2, cpus=4, nodes=1), interval=60)
    with TestClient(create_app(plane)) as client:
        monkeypatch.setenv("ORCH_API_TOKEN", client.app.state.local_token)  # type: ignore[attr-defined]
        monkeypatch.setattr(orchestrator.client, "http", lambda: client)
        yield as_local_user(client)


def table(*args: str) -> list[list[str]]:
    """The cells of the table a command prints, row by row (header first)."""
    result = CliRunner().invoke(cli.cli, list(args), env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    return [line.replace("│", " ").replace("┃", " ").split() for line in result.output.splitlines()
            if "│" in line or "┃" in line]


def test_metrics_all_shows_superseded_values_with_their_attempt(api: TestClient, store: Store) -> None:
    job_id = api.post("/jobs", json={"spec": spec_dict()}).json()["id"]
    # Attempt 1 reached step 3; Ray Train restarted its worker group from step 1.
    store.add_metrics(job_id, 1, [(1, "loss", 2.0), (2, "loss", 1.9), (3, "loss", 1.8)])
    store.supersede_metrics(job_id, 1)
    store.add_metrics(job_id, 1, [(2, "loss", 1.7)])

    assert table("metrics", str(job_id)) == [["step", "loss"], ["1", "2"], ["2", "1.7"]]
    assert table("metrics", str(job_id), "--all") == [
        ["step", "attempt", "superseded", "loss"],
        ["1", "1", "2"],
        ["2", "1", "*", "1.9"],
        ["2", "1", "1.7"],
        ["3", "1", "*", "1.8"],
    ]
