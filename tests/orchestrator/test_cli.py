"""CLI rendering against the real HTTP API (a TestClient in place of the HTTP client)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


HOSTILE = "[bold red]x[/]\x1b[2J\x1b]0;pwned\x07"


def test_what_others_wrote_is_printed_as_text(api: TestClient, store: Store) -> None:
    """An owner, a name, an error or a reason with rich markup and terminal escapes is
    printed as written, minus the control characters: no style, no screen clearing."""
    job = store.create_job(name=f"n{HOSTILE}", objective="mlm", owner=HOSTILE,
                           spec=spec_dict(), spec_yaml="", gpus=0, cpus=1)
    # The app's scheduler may have admitted it meanwhile: queued or pending, it can fail.
    assert store.transition(job.id, "failed", f"reason {HOSTILE}",
                            expected=["queued", "pending"], error=f"error {HOSTILE}")
    for args in (["list"], ["status", str(job.id)]):
        result = CliRunner().invoke(cli.cli, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert "[bold red]x[/]" in result.output
    assert "error [bold red]x[/][2J]0;pwned" in result.output  # the whole error, inert


def test_an_error_with_markup_is_one_plain_line(tmp_path: Path) -> None:
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text('name: ok\nobjective: clm\nmodel: "[bold red]x[/]\\e[2J/a/b"\n'
                         "dataset: {train_files: [/nowhere/t.jsonl]}\n")
    result = CliRunner().invoke(cli.cli, ["validate", str(spec_file)], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    assert "[bold red]x[/]" in result.stderr and "\x1b" not in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
