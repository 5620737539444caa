"""The workers' reporting API: an attempt's token reads and writes that attempt only, every
report is safe to send twice, and the server keeps the attempt's logs safely."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orchestrator.cluster import Capacity
from orchestrator.models import AttemptOutcome, CheckpointKind
from orchestrator.server import ControlPlane, create_app
from orchestrator.settings import get_settings
from orchestrator.spec import build_spec
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.support import REPO, FakeExecutor, as_local_user, wait_until

ASSETS = REPO / "jobs" / "assets"


def spec_dict() -> dict:
    return build_spec({
        "name": "w", "objective": "mlm", "model": str(ASSETS / "models" / "bert-tiny"),
        "dataset": {"train_files": [str(ASSETS / "data" / "lm" / "train.jsonl")],
                    "eval_fraction": 0.1},
        "training": {"max_steps": 5}, "checkpoints": {"keep_last": 1},
    }).to_dict()


@pytest.fixture
def plane(store: Store) -> Iterator[tuple[TestClient, Store, FakeExecutor]]:
    fake = FakeExecutor()
    control = ControlPlane(store, fake, Capacity(gpus=2, cpus=8, nodes=1), interval=60)
    with TestClient(create_app(control)) as client:
        yield as_local_user(client), store, fake


def admitted(client: TestClient, store: Store, fake: FakeExecutor) -> tuple[int, str, TestClient]:
    """Submit a job, let the scheduler admit it; (job id, its token, a client holding it)."""
    job_id = client.post("/jobs", json={"spec": spec_dict()}).json()["id"]
    client.app.state.plane.scheduler.tick()  # type: ignore[attr-defined]
    launch = next(launch for launch in fake.launches if launch.job_id == job_id)
    worker = TestClient(client.app)
    worker.headers["Authorization"] = f"Bearer {launch.token}"
    return job_id, launch.token, worker


def started(worker: TestClient, step: int = 0, restart: bool = False, key: str = "k1") -> dict:
    response = worker.post("/worker/started", json={
        "restart": restart, "start_step": step, "restated": ["total_steps"],
        "reason": "attempt 1 started on test", "details": {"pid": 7}, "key": key})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_token_is_the_only_way_in(plane: tuple[TestClient, Store, FakeExecutor]) -> None:
    client, store, fake = plane
    job_id, token, worker = admitted(client, store, fake)
    other_id, _, other = admitted(client, store, fake)
    for headers in ({}, {"Authorization": "Bearer orch_w_guess"}, {"Authorization": "Basic x"},
                    {"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")}):
        assert client.get("/worker/job", headers=headers).status_code == 401
    # Each token names its own attempt: no route takes a job id to reach another job.
    assert worker.get("/worker/job").json()["job_id"] == job_id
    assert other.get("/worker/job").json()["job_id"] == other_id
    # It is no key to the people's API either.
    assert worker.get("/jobs").status_code == 403
    assert worker.post(f"/jobs/{other_id}/cancel").status_code == 403
    # Once the attempt ends, the token is dead.
    client.post(f"/jobs/{job_id}/cancel")
    assert worker.get("/worker/job").status_code == 401
    assert worker.post("/worker/metrics", json={"rows": [[1, "loss", 1.0]]}).status_code == 401
    assert store.metrics(job_id) == [] and token not in str(store.attempts(job_id)[0].token_hash)


def test_an_attempt_reported_through_the_api(plane: tuple[TestClient, Store, FakeExecutor],
                                             tmp_path: Path) -> None:
    client, store, fake = plane
    job_id, _, worker = admitted(client, store, fake)
    job = worker.get("/worker/job").json()
    assert job["state"] == "pending" and job["spec"]["name"] == "w" and job["checkpoints"] == []
    store.add_metrics(job_id, 0, [(3, "train_loss", 9.0)])  # an earlier run's, superseded now
    assert started(worker) == {"go": True, "state": "running"}
    assert started(worker) == {"go": True, "state": "running"}  # a retry: nothing changes
    assert [e.to_state for e in store.events(job_id)] == ["queued", "pending", "running"]
    assert store.events(job_id)[-1].details == {"pid": 7, "attempt": 1, "resume_step": 0}
    assert store.metrics(job_id) == []

    rows = [[1, "train_loss", 2.0], [2, "train_loss", 1.5]]
    assert worker.post("/worker/metrics", json={"rows": rows}).json() == {"added": 2}
    assert worker.post("/worker/metrics", json={"rows": rows}).json() == {"added": 0}
    bad = worker.post("/worker/metrics", json={"rows": [[3, "train_loss", "NaN"]]})
    assert bad.status_code == 422

    root = job["artifact_dir"]
    answers = []
    for step in (2, 4):
        answers.append(worker.post("/worker/checkpoints", json={
            "step": step, "path": f"{root}/checkpoints/checkpoint-{step}", "size_bytes": 10,
            "metrics": {"eval_loss": 1.0 / step}}).json())
    # keep_last 1: the step-2 checkpoint goes (4 is the latest and the best).
    assert answers[0]["delete"] == [] and [d["step"] for d in answers[1]["delete"]] == [2]
    assert worker.post("/worker/checkpoints/deleted",
                       json={"ids": answers[1]["delete_ids"]}).status_code == 204
    assert [c.step for c in store.checkpoints(job_id)] == [4]
    outside = worker.post("/worker/checkpoints", json={
        "step": 6, "path": "/etc/checkpoint-6", "size_bytes": 1, "metrics": {}})
    assert outside.status_code == 422 and "outside the job's location" in outside.text

    done = worker.post("/worker/finished", json={
        "outcome": "succeeded", "reason": "final model saved",
        "final": {"step": 5, "path": f"{root}/final", "size_bytes": 3, "metrics": {}}})
    assert done.json() == {"go": False, "state": "succeeded"}
    assert [c.kind for c in store.checkpoints(job_id)] == [CheckpointKind.CHECKPOINT,
                                                           CheckpointKind.FINAL]
    assert [a.outcome for a in store.attempts(job_id)] == [AttemptOutcome.SUCCEEDED]
    assert worker.get("/worker/job").status_code == 401  # the attempt is over


def test_a_restarted_group_supersedes_and_notes_once(plane: tuple[TestClient, Store,
                                                                  FakeExecutor]) -> None:
    client, store, fake = plane
    job_id, _, worker = admitted(client, store, fake)
    started(worker)
    worker.post("/worker/metrics", json={"rows": [[s, "train_loss", 1.0] for s in range(1, 7)]})
    for _ in range(2):  # sent twice: one event, one supersede
        assert started(worker, step=4, restart=True, key="restart-1")["go"]
    worker.post("/worker/metrics", json={"rows": [[5, "train_loss", 0.5]]})
    restarts = [e for e in store.events(job_id) if e.from_state == e.to_state == JobState.RUNNING]
    assert len(restarts) == 1 and restarts[0].details["resume_step"] == 4
    assert [(m.step, m.value) for m in store.metrics(job_id)] == [
        (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 0.5)]


def test_an_error_in_the_job_fails_it_without_retry(plane: tuple[TestClient, Store,
                                                                 FakeExecutor]) -> None:
    client, store, fake = plane
    job_id, _, worker = admitted(client, store, fake)
    started(worker)
    worker.post("/worker/cause", json={"reason": "about to fail", "key": "c"})
    answer = worker.post("/worker/finished", json={
        "outcome": "failed", "reason": "training failed: KeyError: 'text'",
        "error": "KeyError: 'text'"})
    assert answer.json()["state"] == "failed"
    job = store.get_job(job_id)
    assert job is not None and job.error == "KeyError: 'text'"
    assert [(a.outcome, a.cause) for a in store.attempts(job_id)] == [
        (AttemptOutcome.FAILED, "KeyError: 'text'")]


def test_logs_are_appended_once_and_read_back(plane: tuple[TestClient, Store, FakeExecutor]) -> None:
    client, store, fake = plane
    job_id, _, worker = admitted(client, store, fake)
    assert worker.post("/worker/logs?offset=0", content=b"hello ").json() == {"size": 6}
    assert worker.post("/worker/logs?offset=0", content=b"hello ").json() == {"size": 6}
    assert worker.post("/worker/logs?offset=3", content=b"lo world\n").json() == {"size": 12}
    assert worker.post("/worker/logs?offset=20", content=b"late\n").json()["size"] > 20
    text = client.get(f"/jobs/{job_id}/logs").json()["text"]
    assert text.startswith("===== attempt-1 =====\nhello world\n")
    assert "8 bytes of this log were lost in transit" in text and text.endswith("late\n")
    log_dir = get_settings().home_dir() / "jobs" / str(job_id) / "logs"
    assert oct((log_dir / "attempt-1.log").stat().st_mode & 0o777) == "0o600"
    assert worker.post("/worker/logs?offset=-1", content=b"x").status_code == 422


def test_a_symlink_in_the_log_directory_is_never_followed(
        plane: tuple[TestClient, Store, FakeExecutor], tmp_path: Path) -> None:
    client, store, fake = plane
    job_id, _, worker = admitted(client, store, fake)
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    log_dir = get_settings().home_dir() / "jobs" / str(job_id) / "logs"
    log_dir.mkdir(parents=True)
    os.symlink(secret, log_dir / "attempt-1.log")
    assert worker.post("/worker/logs?offset=0", content=b"x").status_code == 409
    answer = client.get(f"/jobs/{job_id}/logs")
    assert answer.status_code == 409 and "hunter2" not in answer.text
    assert secret.read_text() == "password=hunter2\n"


def test_an_attempts_end_admits_the_next_job_at_once(plane: tuple[TestClient, Store,
                                                                   FakeExecutor]) -> None:
    """The queue moves when a worker reports its end, not at the next tick (60 s here)."""
    client, store, fake = plane
    every_gpu = {**spec_dict(), "resources": {"gpus": 2, "cpus": 2}}
    first = client.post("/jobs", json={"spec": every_gpu}).json()["id"]
    client.app.state.plane.scheduler.tick()  # type: ignore[attr-defined]
    worker = TestClient(client.app)
    worker.headers["Authorization"] = "Bearer " + next(
        launch.token for launch in fake.launches if launch.job_id == first)
    started(worker)
    second = client.post("/jobs", json={"spec": every_gpu}).json()["id"]
    client.app.state.plane.scheduler.tick()  # type: ignore[attr-defined]
    assert store.require_job(second).state == JobState.QUEUED  # no room while the first runs

    answer = worker.post("/worker/finished", json={"outcome": "failed", "reason": "bad data",
                                                   "error": "bad data"})
    assert answer.json()["state"] == "failed"
    wait_until(lambda: store.require_job(second).state == JobState.PENDING, 10,
               "the second job to be admitted once the first ended")
