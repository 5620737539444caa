"""The HTTP API with a real store and a fake executor: auth, submit checks, views."""

from __future__ import annotations

import getpass
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.cluster import Capacity
from orchestrator.server import ControlPlane, create_app
from orchestrator.settings import Settings
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.support import FakeExecutor, as_local_user, new_job, state_of, wait_until
from tests.support import mlm_spec_dict as spec_dict

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "jobs" / "assets"


@pytest.fixture
def api(store: Store) -> Iterator[tuple[TestClient, Store]]:
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=2, cpus=4, nodes=1), interval=60)
    with TestClient(create_app(plane)) as client:
        yield as_local_user(client), store


def test_token_is_required(api: tuple[TestClient, Store]) -> None:
    client, _ = api
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/jobs", headers={"Authorization": ""}).status_code == 401
    assert client.get("/health").status_code == 200  # liveness needs no token
    assert client.get("/jobs").status_code == 200


def test_submit_records_a_queued_job_with_its_owner(api: tuple[TestClient, Store]) -> None:
    client, store = api
    response = client.post("/jobs", json={"spec": spec_dict(), "spec_yaml": "name: api-test\n"},
                           headers={"X-Orch-User": "someone-else"})  # ignored: no identity
    assert response.status_code == 201, response.text
    job = response.json()
    # The local server's token is the OS user's, who runs the server.
    assert job["state"] == "queued" and job["owner"] == getpass.getuser() and job["gpus"] == 1
    stored = store.get_job(job["id"])
    assert stored and stored.spec_yaml == "name: api-test\n"
    # The loop ticks every 60 s here: a prompt admission shows that submit wakes it.
    deadline = time.monotonic() + 5
    while (status := client.get(f"/jobs/{job['id']}").json())["state"] == "queued":
        assert time.monotonic() < deadline, "submit did not wake the scheduler"
        time.sleep(0.05)
    assert [e["to"] for e in status["events"]] == ["queued", "pending"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"resources": {"gpus": 3, "cpus": 1}}, "resources.gpus: the job asks for 3 GPUs"),
        ({"model": "/nonexistent/model"}, "model: cannot load"),
        ({"dataset": {"train_files": ["/nonexistent.jsonl"], "eval_fraction": 0.1}},
         "dataset.train_files: file not found"),
        ({"objective": "gan"}, "objective: must be one of"),
        ({"surprise": 1}, "surprise: unknown key"),
    ],
)
def test_bad_submissions_are_refused_and_write_nothing(api: tuple[TestClient, Store],
                                                       change: dict, expected: str) -> None:
    client, store = api
    response = client.post("/jobs", json={"spec": {**spec_dict(), **change}})
    assert response.status_code == 422
    assert any(expected in p for p in response.json()["problems"]), response.json()
    assert store.list_jobs() == []


def test_unknown_job_is_404(api: tuple[TestClient, Store]) -> None:
    client, _ = api
    for path in ("/jobs/42", "/jobs/42/metrics", "/jobs/42/checkpoints", "/jobs/42/logs"):
        assert client.get(path).status_code == 404
    assert client.post("/jobs/42/cancel").status_code == 404


def test_metrics_and_checkpoints_views(api: tuple[TestClient, Store]) -> None:
    client, store = api
    job_id = client.post("/jobs", json={"spec": spec_dict()}).json()["id"]
    store.add_metrics(job_id, 1, [(0, "eval_loss", 4.0), (10, "eval_loss", 2.0),
                                  (10, "train_loss", 2.5)])
    store.add_checkpoint(job_id, attempt=1, step=10, path="/x/checkpoint-10", size_bytes=7,
                         metrics={"eval_loss": 2.0})
    metrics = client.get(f"/jobs/{job_id}/metrics").json()
    assert [(m["step"], m["name"]) for m in metrics["metrics"]] == [
        (0, "eval_loss"), (10, "eval_loss"), (10, "train_loss")]
    assert client.get(f"/jobs/{job_id}").json()["metrics"]["eval_loss"] == {"step": 10, "value": 2.0}
    # A resume from step 0 rewrote step 10: the old rows show only with all=true.
    store.supersede_metrics(job_id, 0)
    store.add_metrics(job_id, 1, [(10, "train_loss", 2.4)])
    shown = client.get(f"/jobs/{job_id}/metrics").json()["metrics"]
    assert [(m["step"], m["name"], m["value"], m["superseded"]) for m in shown] == [
        (0, "eval_loss", 4.0, False), (10, "train_loss", 2.4, False)]
    every = client.get(f"/jobs/{job_id}/metrics", params={"all": "true"}).json()["metrics"]
    assert [(m["step"], m["name"], m["superseded"]) for m in every] == [
        (0, "eval_loss", False), (10, "eval_loss", True), (10, "train_loss", True),
        (10, "train_loss", False)]
    assert client.get(f"/jobs/{job_id}").json()["metrics"]["eval_loss"] == {"step": 0, "value": 4.0}
    ckpts = client.get(f"/jobs/{job_id}/checkpoints").json()["checkpoints"]
    assert ckpts[0]["path"] == "/x/checkpoint-10" and ckpts[0]["is_latest"]
    listed = client.get("/jobs", params={"state": "queued,pending"}).json()
    assert [j["id"] for j in listed] == [job_id]


def test_a_waiting_status_answers_when_the_state_changes(api: tuple[TestClient, Store],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--wait`'s poll: the answer comes once the state is no longer the one named, not at
    the end of the wait; with nothing changing, after the wait. While it waits the server
    does not reread the job: a move made here wakes it."""
    import threading

    from orchestrator.routes import jobs

    # The fallback reread far away, so that only the move's own notice can answer in time
    # (however loaded the machine is).
    monkeypatch.setattr(jobs, "FALLBACK_RECHECK_S", 30.0)
    client, store = api
    job_id = client.post("/jobs", json={"spec": spec_dict()}).json()["id"]
    deadline = time.monotonic() + 5
    while client.get(f"/jobs/{job_id}").json()["state"] != "pending":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    reads = []
    read_state = store.job_state
    monkeypatch.setattr(store, "job_state", lambda job: reads.append(job) or read_state(job))

    start = time.monotonic()
    unchanged = client.get(f"/jobs/{job_id}", params={"changed_from": "pending", "wait": 0.5})
    assert unchanged.status_code == 200 and unchanged.json()["state"] == "pending"
    assert time.monotonic() - start >= 0.5
    assert len(reads) == 2  # before and after the wait; none in between

    # Without `changed_from`, `wait` alone does not wait.
    start = time.monotonic()
    assert client.get(f"/jobs/{job_id}", params={"wait": 20}).status_code == 200
    assert time.monotonic() - start < 5

    def wait_through(move: Any, after: float, changed_from: str) -> tuple[dict[str, Any], float]:
        """A 20 s wait for `changed_from` to change while `move` runs `after` s in."""
        timer = threading.Timer(after, move)
        timer.start()
        start = time.monotonic()
        answer = client.get(f"/jobs/{job_id}", params={"changed_from": changed_from, "wait": 20})
        took = time.monotonic() - start
        timer.join()
        return answer.json(), took

    reads.clear()
    changed, took = wait_through(lambda: store.transition(job_id, "running", "started",
                                                          expected=["pending"]), 0.5, "pending")
    assert changed["state"] == "running" and changed["events"][-1]["to"] == "running"
    # Woken by the move, not by the fallback reread (30 s away).
    assert 0.4 <= took < 15, took
    assert len(reads) == 2

    # A state other than the one named is answered at once.
    start = time.monotonic()
    assert client.get(f"/jobs/{job_id}", params={"changed_from": "queued", "wait": 20}
                      ).json()["state"] == "running"
    assert time.monotonic() - start < 5

    # A move this server did not make (another server on the same database) is found by
    # the fallback reread.
    monkeypatch.setattr(jobs, "FALLBACK_RECHECK_S", 1.0)
    other = Store(store.url)
    answer, took = wait_through(lambda: other.transition(job_id, "cancelled", "elsewhere",
                                                         expected=["running"]), 0.3, "running")
    other.close()
    assert answer["state"] == "cancelled"
    assert 0.9 <= took < 15, took


@pytest.mark.parametrize("params", [{"wait": 31}, {"wait": -1}, {"wait": "nan"}, {"wait": "inf"},
                                    {"changed_from": "sleeping", "wait": 1}])
def test_a_bad_wait_is_422_and_an_unknown_job_404(api: tuple[TestClient, Store],
                                                  params: dict[str, object]) -> None:
    client, _ = api
    job_id = client.post("/jobs", json={"spec": spec_dict()}).json()["id"]
    answer = client.get(f"/jobs/{job_id}", params={"changed_from": "queued", **params})
    assert answer.status_code == 422, answer.text
    assert client.get("/jobs/4242", params={"changed_from": "queued", "wait": 1}).status_code == 404


def test_a_committed_move_wakes_the_scheduler_loop(store: Store) -> None:
    """A job's end frees its GPU: the next job is admitted at once, not at the next tick.
    Ticks and reconciliations are a minute apart here, so only the store's notice of the
    move can wake the loop in time."""
    slow = Settings(scheduler_interval=60, reconcile_interval=60)
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=1, cpus=4, nodes=1), settings=slow)
    first, second = new_job(store, cpus=1), new_job(store, cpus=1)
    plane.start()
    try:
        wait_until(lambda: state_of(store, first) == "pending", 10, "the first job admitted")
        time.sleep(0.3)  # the loop settles into its minute-long wait
        assert state_of(store, second) == "queued"  # one GPU: the second waits
        store.transition(first, JobState.RUNNING, "started", expected=[JobState.PENDING])
        store.transition(first, JobState.SUCCEEDED, "done", expected=[JobState.RUNNING])
        wait_until(lambda: state_of(store, second) == "pending", 10,
                   "the second job admitted once the first ended")
    finally:
        plane.stop()


@pytest.mark.parametrize(("reconcile_interval", "expected"), [(0.0, 5.0), (60.0, 5.0), (2.0, 2.0)])
def test_the_loop_waits_no_longer_than_the_next_reconciliation(
        store: Store, reconcile_interval: float, expected: float) -> None:
    settings = Settings(scheduler_interval=5, reconcile_interval=reconcile_interval)
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=1, cpus=4, nodes=1),
                         settings=settings)
    plane.scheduler.tick()  # reconciles now (none before): the next one is due in the interval
    assert plane._next_tick_in() == pytest.approx(expected, abs=0.5)
