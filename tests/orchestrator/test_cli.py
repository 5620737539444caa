"""CLI rendering against the real HTTP API (a TestClient in place of the HTTP client)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient
from rich.console import Console

import orchestrator.client
from orchestrator import cli
from orchestrator.cluster import Capacity
from orchestrator.server import ControlPlane, create_app
from orchestrator.states import JobState
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


def invoke(args: list[str], columns: int = 80) -> Result:
    """Run the CLI in a terminal `columns` wide (the console reads COLUMNS when the CLI
    starts, which in these tests is once for all of them)."""
    with mock.patch.object(cli, "out", Console(width=columns)):
        return CliRunner().invoke(cli.cli, args)


def run(*args: str, columns: int = 80) -> str:
    """What a command prints on stdout, in a terminal `columns` wide."""
    result = invoke(list(args), columns)
    assert result.exit_code == 0, result.output
    return result.stdout


def table(*args: str, columns: int = 160) -> list[list[str]]:
    """The cells of the table a command prints, row by row (header first; the rule under
    the header and blank lines left out)."""
    lines = run(*args, columns=columns).splitlines()
    return [line.split() for line in lines if line.strip() and set(line.strip()) - {"─", " "}]


def fits(text: str, columns: int = 80) -> None:
    """Every line fits the terminal and no cell was cut short."""
    for line in text.splitlines():
        assert len(line) <= columns, f"{len(line)} columns: {line!r}"
    assert "…" not in text, text


def test_metrics_superseded_shows_superseded_values_with_their_attempt(
        api: TestClient, store: Store) -> None:
    job_id = api.post("/jobs", json={"spec": spec_dict()}).json()["id"]
    # Attempt 1 reached step 3; Ray Train restarted its worker group from step 1.
    store.add_metrics(job_id, 1, [(1, "loss", 2.0), (2, "loss", 1.9), (3, "loss", 1.8)])
    store.supersede_metrics(job_id, 1)
    store.add_metrics(job_id, 1, [(2, "loss", 1.7)])

    assert table("metrics", str(job_id)) == [["step", "loss"], ["1", "2"], ["2", "1.7"]]
    assert table("metrics", str(job_id), "--superseded") == [
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
        result = invoke(args, columns=200)
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


# -- fitting the terminal ----------------------------------------------------------------
METRICS = ["train_loss", "eval_loss", "eval_accuracy", "learning_rate", "grad_norm", "epoch",
           "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
           "train_samples_per_second", "total_flos", "train_runtime", "eval_perplexity"]


def _running_job(api: TestClient, store: Store, name: str = "mlm-job") -> int:
    job_id = int(api.post("/jobs", json={"spec": {**spec_dict(), "name": name}}).json()["id"])
    store.transition(job_id, "pending", "admitted", expected=["queued"])
    store.transition(job_id, "running", "started", expected=["pending"])
    return job_id


def test_metrics_fit_80_columns_with_the_headline_columns(api: TestClient, store: Store) -> None:
    job_id = _running_job(api, store)
    store.add_metrics(job_id, 1, [(step, name, 1234.5678 + step) for step in (10, 20)
                                  for name in METRICS])
    shown = run("metrics", str(job_id))
    fits(shown)
    # mlm's headline metric is eval_accuracy.
    assert table("metrics", str(job_id), columns=80)[0] == [
        "step", "train_loss", "eval_loss", "eval_accuracy"]
    for flag in ("--wide", "--all"):
        wide = run("metrics", str(job_id), flag)
        assert "…" not in wide
        assert table("metrics", str(job_id), flag)[0] == ["step", *sorted(METRICS)]
    assert table("metrics", str(job_id), "--name", "epoch", columns=80)[0] == ["step", "epoch"]


def test_checkpoint_paths_are_never_cut(api: TestClient, store: Store, tmp_path: Path) -> None:
    job_id = _running_job(api, store)
    deep = tmp_path / ("a-long-directory-name-" * 4) / "checkpoints" / "checkpoint-200"
    store.add_checkpoint(job_id, attempt=1, step=200, path=str(deep), size_bytes=12_345_678,
                         metrics={"eval_loss": 2.5, "eval_accuracy": 0.4, "epoch": 1.0})
    shown = run("checkpoints", str(job_id))
    lines = shown.splitlines()
    assert lines[0].split() == ["step", "kind", "best", "latest", "size", "MB", "eval_loss",
                                "eval_accuracy", "created"]
    assert lines[1].split()[:2] == ["200", "checkpoint"] and "12.3" in lines[1]
    assert lines[2].strip() == str(deep)  # whole, on a line of its own
    fits("\n".join(lines[:2]))
    wide = run("checkpoints", str(job_id), "--wide")
    assert str(deep) in wide and "…" not in wide


def test_list_and_status_show_progress_and_fit_80_columns(api: TestClient, store: Store) -> None:
    job_id = _running_job(api, store, name="a-rather-long-job-name-for-a-narrow-terminal")
    store.add_metrics(job_id, 1, [(0, "total_steps", 300.0), (120, "train_loss", 2.5)])
    blocker = int(api.post("/jobs", json={"spec": {**spec_dict(), "resources": {"gpus": 2}}})
                  .json()["id"])
    store.transition(blocker, "pending", "admitted", expected=["queued"])
    waiting = int(api.post("/jobs", json={"spec": {**spec_dict(), "resources": {"gpus": 2}}})
                  .json()["id"])
    listed = run("list")
    fits(listed)
    row = next(line for line in listed.splitlines() if line.split()[:1] == [str(job_id)])
    assert "120/300" in row and "running" in row
    reason = api.get(f"/jobs/{waiting}").json()["waiting_reason"]
    assert reason and " ".join(reason.split()) in _column_text(listed, "note")
    for job in (job_id, waiting):
        shown = run("status", str(job))
        # Paths are printed whole, however long: the rest fits.
        fits("\n".join(line for line in shown.splitlines() if "/" not in line))
    assert "step 120/300" in run("status", str(job_id))
    assert f"waiting: {reason}" in " ".join(run("status", str(waiting), columns=200).split())


def _column_text(table_text: str, header: str) -> str:
    """The words of one column of a printed table (from its header's position on)."""
    lines = table_text.splitlines()
    start = lines[0].index(header)
    return " ".join(word for line in lines[2:] for word in line[start:].split())


def test_json_adds_progress_and_keeps_every_key(api: TestClient, store: Store) -> None:
    job_id = _running_job(api, store)
    store.add_metrics(job_id, 1, [(0, "total_steps", 300.0), (120, "train_loss", 2.5)])
    keys = {"id", "name", "objective", "owner", "state", "priority", "gpus", "cpus", "attempts",
            "max_attempts", "error", "artifact_dir", "parent_job_id", "resume_from",
            "ray_submission_id", "created_at", "started_at", "finished_at"}
    listed = json.loads(run("list", "-o", "json"))
    assert keys <= set(listed[0])
    assert listed[0]["progress"] == {"step": 120, "total": 300}
    assert {"eta_seconds", "waiting_reason", "elapsed_seconds"} <= set(listed[0])
    status = json.loads(run("status", str(job_id), "-o", "json"))
    assert keys | {"spec", "events", "attempt_history", "metrics", "wait_reason"} <= set(status)
    assert status["progress"] == {"step": 120, "total": 300}
    assert status["elapsed_seconds"] is not None


def test_times_are_relative_or_utc_when_asked(api: TestClient, store: Store) -> None:
    job_id = _running_job(api, store)
    assert "just now" in run("list") or "s ago" in run("list")
    created = api.get(f"/jobs/{job_id}").json()["created_at"][:19]
    assert f"{created}Z" in run("list", "--utc", columns=200)
    assert f"{created}Z" in run("status", str(job_id), "--utc", columns=200)


# -- bad input -----------------------------------------------------------------------------
def test_an_unknown_state_is_one_line_listing_the_states(api: TestClient) -> None:
    result = CliRunner().invoke(cli.cli, ["list", "--state", "running,bogus"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "unknown bogus" in result.stderr
    assert all(s.value in result.stderr for s in JobState)
    # The server refuses it too, with a 422 naming the states (never a 500).
    answer = api.get("/jobs", params={"state": "bogus"})
    assert answer.status_code == 422 and "queued" in answer.json()["detail"]


@pytest.fixture
def no_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ORCH_HOME, no ORCH_SERVER_URL, and a local server port nobody listens on."""
    for key in ("ORCH_SERVER_URL", "ORCH_API_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("ORCH_SERVER_PORT", str(port))
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("args", [["list"], ["status", "1"], ["metrics", "1"], ["checkpoints", "1"],
                                  ["logs", "1"], ["whoami"], ["cancel", "1"], ["plot", "1"]])
def test_read_only_verbs_never_start_a_server(no_server: Path, args: list[str]) -> None:
    result = CliRunner().invoke(cli.cli, args)
    assert result.exit_code == 1, result.output
    assert "no orch server is running" in result.stderr and "orch up" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (no_server / "server.pid").exists()  # nothing was started


def test_local_ports_are_checked_before_anything_starts(no_server: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_RAY_CLIENT_PORT", "15000")
    for args in (["up"], ["submit", "jobs/gpt2_clm.yaml"]):
        result = CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 1
        assert result.stderr.startswith("error: ORCH_RAY_CLIENT_PORT='15000': 15000 is inside "
                                         "Ray's worker port range 10002-19999")
        assert result.stderr.count("\n") == 1
    monkeypatch.setenv("ORCH_RAY_CLIENT_PORT", "10001")
    monkeypatch.setenv("ORCH_RAY_DASHBOARD_PORT", os.environ["ORCH_SERVER_PORT"])
    for args in (["up"], ["submit", "jobs/gpt2_clm.yaml"]):
        result = CliRunner().invoke(cli.cli, args)
        assert result.exit_code == 1
        assert "ORCH_SERVER_PORT and ORCH_RAY_DASHBOARD_PORT are both" in result.stderr
        assert result.stderr.count("\n") == 1
    assert not (no_server / "server.pid").exists() and not (no_server / "ray").exists()


# -- following a job -------------------------------------------------------------------------
def test_following_off_a_terminal_prints_plain_progress_lines(
        api: TestClient, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.commands import follow

    job_id = int(api.post("/jobs", json={"spec": spec_dict()}).json()["id"])
    store.add_metrics(job_id, 1, [(0, "total_steps", 10.0)])
    steps = iter([
        lambda: store.transition(job_id, "pending", "admitted", expected=["queued"]),
        lambda: store.transition(job_id, "running", "started", expected=["pending"]),
        lambda: store.add_metrics(job_id, 1, [(5, "train_loss", 2.25)]),
        lambda: store.transition(job_id, "succeeded", "done", expected=["running"]),
    ])
    monkeypatch.setattr(follow.time, "sleep", lambda seconds: next(steps)())
    monkeypatch.setenv("ORCH_PROGRESS_INTERVAL", "0.001")
    runner = CliRunner()
    with runner.isolation() as streams:
        final = follow.follow(orchestrator.client.Client(), job_id, cli.err)
    lines = streams[1].getvalue().decode().splitlines()
    assert final.state == "succeeded"
    # The app's own scheduler may have admitted the job before the first line.
    assert lines[0].startswith((f"job {job_id} queued", f"job {job_id} pending"))
    assert any(line.startswith(f"job {job_id} pending") and "waiting for Ray" in line
               for line in lines)
    assert f"job {job_id} running step 5/10 loss 2.2500 ran " in "\n".join(lines)
    assert lines[-1].startswith(f"job {job_id} succeeded step 5/10")


def test_a_ticker_prints_once_per_interval(api: TestClient, store: Store) -> None:
    from orchestrator.commands.follow import Ticker

    job_id = int(api.post("/jobs", json={"spec": spec_dict()}).json()["id"])
    store.transition(job_id, "cancelled", "cancelled")  # a state that stays
    runner = CliRunner()
    with runner.isolation() as streams:
        ticker = Ticker(orchestrator.client.Client(), job_id, interval=3600)
        for _ in range(3):
            ticker.tick()
    assert len(streams[1].getvalue().decode().splitlines()) == 1


def test_a_poll_waits_on_the_server_and_never_spins(monkeypatch: pytest.MonkeyPatch) -> None:
    """`poll` names the state it saw and lets the server wait; a server that answers at
    once anyway (an older one) is still asked only once per wait."""
    from types import SimpleNamespace

    from orchestrator.commands import follow

    slept: list[float] = []
    monkeypatch.setattr(follow.time, "sleep", slept.append)

    class AnswersAtOnce:
        def __init__(self) -> None:
            self.calls: list[dict[str, object]] = []

        def get_as(self, kind: object, path: str, **params: object) -> SimpleNamespace:
            self.calls.append({"path": path, **params})
            return SimpleNamespace(state=JobState.RUNNING)

    client = AnswersAtOnce()
    follow.poll(client, 7, None, 4.0)  # type: ignore[arg-type]  # nothing seen yet: no wait
    follow.poll(client, 7, "running", 4.0)  # type: ignore[arg-type]
    assert client.calls == [{"path": "/jobs/7"},
                            {"path": "/jobs/7", "changed_from": "running", "wait": 4.0}]
    assert len(slept) == 1 and 3.5 < slept[0] <= 4.0
    follow.poll(client, 7, "pending", 4.0)  # type: ignore[arg-type]  # changed: no sleep
    assert len(slept) == 1


# -- orch plot -------------------------------------------------------------------------------
def _curve_job(api: TestClient, store: Store, losses: dict[int, float], **fields: object) -> int:
    job_id = _running_job(api, store)
    store.add_metrics(job_id, 1, [(s, "train_loss", v) for s, v in losses.items()]
                      + [(s, "eval_loss", v + 0.1) for s, v in losses.items() if s % 20 == 0])
    return job_id


def test_plot_writes_a_png_of_several_jobs(api: TestClient, store: Store, tmp_path: Path) -> None:
    first = _curve_job(api, store, {s: 3.0 - s / 50 for s in range(10, 101, 10)})
    second = _curve_job(api, store, {s: 2.5 - s / 80 for s in range(10, 61, 10)})
    target = tmp_path / "plots" / "loss.png"
    target.parent.mkdir()
    result = CliRunner().invoke(cli.cli, ["plot", str(first), str(second), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in target.parent.iterdir()] == ["loss.png"]  # no temporary file left


def test_plot_joins_a_resumed_chain_into_one_curve(api: TestClient, store: Store) -> None:
    from orchestrator.commands.plot import fetch

    parent = _curve_job(api, store, {10: 3.0, 20: 2.8, 30: 2.6})
    store.transition(parent, "cancelled", "cancelled", expected=["running"])
    child = int(store.create_job(name="mlm-job", objective="mlm", owner="me", spec=spec_dict(),
                                 spec_yaml="", gpus=0, cpus=1, parent_job_id=parent,
                                 resume_from="/x/checkpoint-20",
                                 details={"resume_step": 20}).id or 0)
    store.add_metrics(child, 1, [(30, "train_loss", 2.5), (40, "train_loss", 2.4)])
    curves = fetch(orchestrator.client.Client(), child)
    # The parent's step 30 was rolled back by the resume from 20: the child's stands.
    assert curves.series["train_loss"] == {"steps": [10, 20, 30, 40],
                                           "values": [3.0, 2.8, 2.5, 2.4]}
    assert curves.resumed_at == [20] and f"resumes {parent}" in curves.label


def test_plot_in_the_terminal(api: TestClient, store: Store) -> None:
    job_id = _curve_job(api, store, {s: 3.0 - s / 50 for s in range(10, 101, 10)})
    shown = run("plot", str(job_id), columns=100)
    assert "train_loss" in shown and "eval_loss" in shown and "\x1b" not in shown


def test_plot_refuses_bad_input_in_one_line(api: TestClient, store: Store, tmp_path: Path) -> None:
    job_id = _curve_job(api, store, {10: 3.0, 20: 2.8})
    empty = _running_job(api, store)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases = {
        ("plot", "999999"): "job 999999 not found",
        ("plot", str(empty)): f"job {empty} has no metrics yet",
        ("plot", str(job_id), "-o", str(tmp_path / "nowhere" / "x.png")): "no directory",
        ("plot", str(job_id), "-o", str(tmp_path / "x.txt")): "ending in .png",
        ("plot", str(job_id), "--metric", "nope", "-m", "nope"): None,
    }
    if os.geteuid() != 0:  # root writes anywhere
        cases[("plot", str(job_id), "-o", str(locked / "x.png"))] = "cannot write there"
    for args, message in cases.items():
        result = CliRunner().invoke(cli.cli, list(args))
        if message is None:  # an eval metric the job lacks: train_loss alone, and a note
            assert result.exit_code == 0 and f"job {job_id} has no nope yet" in result.stderr
            continue
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
