"""Store behaviour on SQLite and PostgreSQL (see conftest.py for the fixtures)."""

from __future__ import annotations

import multiprocessing
import threading
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlmodel import SQLModel

from orchestrator import config
from orchestrator.states import TERMINAL_STATES, JobState
from orchestrator.store import InvalidTransition, Store, make_engine

Q, P, R = JobState.QUEUED, JobState.PENDING, JobState.RUNNING
S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED


def new_job(store: Store, **overrides: Any) -> int:
    args: dict[str, Any] = {
        "name": "tiny-clm",
        "objective": "clm",
        "owner": "alice",
        "spec": {"model": "tiny", "lr": 1e-4},
        "spec_yaml": "model: tiny\nlr: 1.0e-4\n",
        "gpus": 1,
        "cpus": 4,
    }
    args.update(overrides)
    job = store.create_job(**args)
    assert job.id is not None
    return job.id


def state_of(store: Store, job_id: int) -> str:
    job = store.get_job(job_id)
    assert job is not None
    return job.state


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is not None and value.utcoffset() == timedelta(0)


# -- config -------------------------------------------------------------------------------


def test_config_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.delenv("ORCH_DATABASE_URL", raising=False)
    assert config.orch_home() == home and home.is_dir()
    assert config.database_url() == f"sqlite:///{home}/orch.db"
    monkeypatch.setenv("ORCH_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert config.database_url() == "postgresql+psycopg://u@h/db"


def test_default_url_comes_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ORCH_DATABASE_URL", raising=False)
    with Store() as store:
        assert store.url == f"sqlite:///{tmp_path}/home/orch.db"
        job = store.create_job(name="n", objective="clm", owner="o", spec={}, spec_yaml="", gpus=0, cpus=1)
        assert job.artifact_dir == str(tmp_path / "home" / "jobs" / str(job.id))
    assert (tmp_path / "home" / "orch.db").is_file()


# -- jobs ---------------------------------------------------------------------------------


def test_create_and_get(store: Store, tmp_path: Path) -> None:
    before = datetime.now(timezone.utc)
    job_id = new_job(store, priority=5, max_attempts=3, artifact_root=tmp_path / "art")
    job = store.get_job(job_id)
    assert job is not None
    assert (job.name, job.objective, job.owner) == ("tiny-clm", "clm", "alice")
    assert job.state == JobState.QUEUED
    assert job.spec == {"model": "tiny", "lr": 1e-4}
    assert job.spec_yaml == "model: tiny\nlr: 1.0e-4\n"
    assert (job.gpus, job.cpus, job.priority) == (1, 4, 5)
    assert (job.attempts, job.max_attempts) == (0, 3)
    assert job.artifact_dir == str(tmp_path / "art" / str(job_id))
    assert job.ray_submission_id is None and job.error is None
    assert job.started_at is None and job.finished_at is None
    assert before <= job.created_at == job.updated_at <= datetime.now(timezone.utc)
    [event] = store.events(job_id)
    assert (event.from_state, event.to_state) == (None, "queued")
    assert event.reason == "submitted by alice"
    assert event.at == job.created_at
    assert store.get_job(job_id + 1000) is None


def test_default_artifact_root_is_orch_home(store: Store) -> None:
    job_id = new_job(store)
    job = store.get_job(job_id)
    assert job is not None
    assert job.artifact_dir == str(config.orch_home() / "jobs" / str(job_id))


@pytest.mark.parametrize(
    "bad",
    [
        {"spec": {"x": object()}},  # not JSON
        {"spec": {"lr": float("nan")}},  # not portable JSON
        {"spec": ["not", "a", "dict"]},
        {"gpus": -1},
        {"cpus": -2},
        {"max_attempts": 0},
        {"name": ""},
        {"owner": "  "},
    ],
)
def test_create_bad_input_writes_nothing(store: Store, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        new_job(store, **bad)
    assert store.list_jobs() == []
    new_job(store)  # the store is still usable and the id sequence is intact
    [job] = store.list_jobs()
    assert len(store.events(job.id or 0)) == 1


def test_list_jobs(store: Store) -> None:
    a = new_job(store, owner="alice")
    b = new_job(store, owner="bob")
    c = new_job(store, owner="alice")
    assert store.transition(b, C, "user")
    assert [j.id for j in store.list_jobs()] == [c, b, a]  # newest first
    assert [j.id for j in store.list_jobs(owner="alice")] == [c, a]
    assert [j.id for j in store.list_jobs(states=[Q])] == [c, a]
    assert [j.id for j in store.list_jobs(states={C, F})] == [b]
    assert store.list_jobs(states=[]) == []
    assert [j.id for j in store.list_jobs(limit=2)] == [c, b]
    assert [j.id for j in store.list_jobs(states=[Q], owner="alice", limit=1)] == [c]


def test_queue_order(store: Store) -> None:
    low = new_job(store, priority=0)
    high1 = new_job(store, priority=10)
    mid = new_job(store, priority=5)
    high2 = new_job(store, priority=10)
    gone = new_job(store, priority=99)
    neg = new_job(store, priority=-1)
    assert store.transition(gone, P, "admitted")
    assert [j.id for j in store.queued_jobs()] == [high1, high2, mid, low, neg]


def test_update_job(store: Store) -> None:
    job_id = new_job(store)
    store.update_job(job_id, ray_submission_id="raysubmit_1", error="note")
    job = store.get_job(job_id)
    assert job is not None
    assert (job.ray_submission_id, job.error, job.state) == ("raysubmit_1", "note", "queued")
    assert job.updated_at > job.created_at
    for bad in ({"state": "running"}, {"id": 7}, {"created_at": job.created_at}, {"nope": 1}):
        with pytest.raises(ValueError):
            store.update_job(job_id, **bad)
    with pytest.raises(ValueError):
        store.update_job(job_id, started_at=datetime(2024, 1, 1))  # naive
    with pytest.raises(KeyError):
        store.update_job(job_id + 1000, error="x")
    assert store.get_job(job_id) == job
    assert len(store.events(job_id)) == 1  # bookkeeping is not a state change


# -- transitions --------------------------------------------------------------------------


def test_transition_records_event(store: Store) -> None:
    job_id = new_job(store)
    before = datetime.now(timezone.utc)
    assert store.transition(job_id, P, "admitted: 1 GPU free", ray_submission_id="rs-1")
    after = datetime.now(timezone.utc)
    job = store.get_job(job_id)
    assert job is not None and job.state == "pending" and job.ray_submission_id == "rs-1"
    event = store.events(job_id)[-1]
    assert (event.from_state, event.to_state) == ("queued", "pending")
    assert event.reason == "admitted: 1 GPU free"
    assert before <= event.at <= after
    assert job.updated_at == event.at
    assert job.started_at is None and job.finished_at is None


def test_forbidden_transition_changes_nothing(store: Store) -> None:
    job_id = new_job(store)
    before = store.get_job(job_id)
    assert not store.transition(job_id, R, "skip pending")
    assert not store.transition(job_id, S, "skip everything")
    assert not store.transition(job_id, Q, "self loop")
    assert store.get_job(job_id) == before
    assert len(store.events(job_id)) == 1


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
def test_terminal_state_never_changes(store: Store, terminal: JobState) -> None:
    job_id = new_job(store)
    assert store.transition(job_id, P, "admitted")
    assert store.transition(job_id, R, "started")
    assert store.transition(job_id, terminal, "done", error="boom" if terminal is F else None)
    job = store.get_job(job_id)
    assert job is not None and job.finished_at is not None
    for target in JobState:
        assert not store.transition(job_id, target, "try to revive")
        with pytest.raises(InvalidTransition):
            store.transition(job_id, target, "revive", expected=[terminal])
    assert store.get_job(job_id) == job
    assert [e.to_state for e in store.events(job_id)] == ["queued", "pending", "running", terminal]


def test_expected(store: Store) -> None:
    job_id = new_job(store)
    assert not store.transition(job_id, C, "cancel", expected=[P, R])  # mismatch
    assert state_of(store, job_id) == "queued" and len(store.events(job_id)) == 1
    assert store.transition(job_id, P, "admit", expected=[Q])
    # Q cannot reach RUNNING at all: a programming error, not a lost race.
    with pytest.raises(InvalidTransition):
        store.transition(job_id, R, "start", expected=[Q, P])
    assert state_of(store, job_id) == "pending" and len(store.events(job_id)) == 2
    assert store.transition(job_id, F, "lost", expected=[Q, P, R], error="ray lost it")
    assert state_of(store, job_id) == "failed"


def test_transition_bad_input(store: Store) -> None:
    job_id = new_job(store)
    with pytest.raises(ValueError):
        store.transition(job_id, P, "x", state="running")
    with pytest.raises(ValueError):
        store.transition(job_id, P, "x", name="renamed")
    with pytest.raises(ValueError):
        store.transition(job_id, P, "x", started_at=datetime(2024, 1, 1))  # naive
    with pytest.raises(ValueError):
        store.transition(job_id, "bogus", "x")  # type: ignore[arg-type]
    assert not store.transition(job_id + 1000, P, "no such job")
    assert state_of(store, job_id) == "queued" and len(store.events(job_id)) == 1


def test_started_and_finished_at(store: Store) -> None:
    job_id = new_job(store)
    assert store.transition(job_id, P, "admit")
    assert store.transition(job_id, Q, "submission lost; requeue")
    assert store.transition(job_id, P, "admit again")
    job = store.get_job(job_id)
    assert job is not None and job.started_at is None and job.finished_at is None
    assert store.transition(job_id, R, "driver up", attempts=1)
    running = store.get_job(job_id)
    assert running is not None and running.attempts == 1
    assert running.started_at == store.events(job_id)[-1].at and running.finished_at is None
    assert store.transition(job_id, S, "trained")
    done = store.get_job(job_id)
    assert done is not None
    assert done.started_at == running.started_at
    assert done.finished_at == store.events(job_id)[-1].at
    assert done.finished_at is not None and done.finished_at >= running.started_at


def test_explicit_started_at(store: Store) -> None:
    job_id = new_job(store)
    when = datetime(2025, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert store.transition(job_id, P, "admit")
    assert store.transition(job_id, R, "driver reported start", started_at=when)
    job = store.get_job(job_id)
    assert job is not None and job.started_at == when
    assert_utc(job.started_at)


def test_cancel_from_queue_sets_finished_at(store: Store) -> None:
    job_id = new_job(store)
    assert store.transition(job_id, C, "cancelled by alice")
    job = store.get_job(job_id)
    assert job is not None and job.started_at is None
    assert job.finished_at == store.events(job_id)[-1].at


def test_lost_race_changes_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UPDATE's `WHERE state = <read state>` guard alone refuses a stale writer."""
    job_id = new_job(store)
    assert store.transition(job_id, P, "admit")
    before = store.get_job(job_id)
    # Simulate a writer that read "queued" just before another writer moved the job on.
    monkeypatch.setattr(Store, "_read_state", staticmethod(lambda session, jid: (Q, None)))
    assert not store.transition(job_id, C, "stale cancel")
    monkeypatch.undo()
    assert store.get_job(job_id) == before
    assert [e.to_state for e in store.events(job_id)] == ["queued", "pending"]


def test_race_exactly_one_winner(store: Store) -> None:
    """Threads released together all try queued -> pending: one wins, one event."""
    threads_per_job = 4

    def contend(job_id: int, barrier: threading.Barrier, results: list[bool | BaseException]) -> None:
        try:
            barrier.wait(timeout=10)
            results.append(store.transition(job_id, P, "admit", expected=[Q]))
        except BaseException as exc:  # a thread cannot fail the test; checked below
            results.append(exc)

    for job_id in [new_job(store) for _ in range(5)]:
        barrier = threading.Barrier(threads_per_job)
        results: list[bool | BaseException] = []
        threads = [
            threading.Thread(target=contend, args=(job_id, barrier, results)) for _ in range(threads_per_job)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert sorted(results, key=repr) == [False] * (threads_per_job - 1) + [True]
        assert [e.to_state for e in store.events(job_id)] == ["queued", "pending"]


# -- metrics ------------------------------------------------------------------------------


def test_metrics(store: Store) -> None:
    job_id = new_job(store)
    store.add_metrics(job_id, 1, [(10, "loss", 2.5), (10, "lr", 1e-4), (20, "loss", 2.0)])
    store.add_metrics(job_id, 1, [(30, "loss", 1.5), (20, "eval_loss", 2.2)])
    store.add_metrics(job_id, 1, [])  # no-op
    rows = store.metrics(job_id)
    assert [(m.step, m.name, m.value) for m in rows] == [
        (10, "loss", 2.5),
        (10, "lr", 1e-4),
        (20, "eval_loss", 2.2),
        (20, "loss", 2.0),
        (30, "loss", 1.5),
    ]
    assert all(m.attempt == 1 for m in rows)
    assert [m.step for m in store.metrics(job_id, "loss")] == [10, 20, 30]
    assert store.latest_metrics(job_id) == {
        "loss": (30, 1.5),
        "lr": (10, 1e-4),
        "eval_loss": (20, 2.2),
    }
    # A retry that restarts its step count still supersedes the earlier attempt.
    store.add_metrics(job_id, 2, [(5, "loss", 3.0)])
    assert store.latest_metrics(job_id)["loss"] == (5, 3.0)
    assert store.latest_metrics(job_id + 1000) == {}
    assert store.metrics(job_id + 1000) == []


def test_supersede_metrics_after_a_step(store: Store) -> None:
    job_id, other = new_job(store), new_job(store)
    # Attempt 1 got to step 30; a restart inside the same attempt resumes from step 20.
    store.add_metrics(job_id, 1, [(0, "eval_loss", 4.0), (10, "loss", 2.5), (20, "loss", 2.0),
                                  (20, "eval_loss", 2.2), (30, "loss", 1.5), (30, "lr", 1e-4)])
    store.add_metrics(other, 1, [(30, "loss", 9.0)])
    assert store.supersede_metrics(job_id, 20) == 2
    assert store.supersede_metrics(job_id, 20) == 0  # already marked: nothing more
    store.add_metrics(job_id, 1, [(25, "loss", 1.8)])

    live = [(m.step, m.name, m.value) for m in store.metrics(job_id)]
    assert live == [(0, "eval_loss", 4.0), (10, "loss", 2.5), (20, "eval_loss", 2.2),
                    (20, "loss", 2.0), (25, "loss", 1.8)]
    assert not any(m.superseded for m in store.metrics(job_id))
    assert [m.step for m in store.metrics(job_id, "loss")] == [10, 20, 25]
    everything = store.metrics(job_id, include_superseded=True)
    assert [(m.step, m.name, m.superseded) for m in everything if m.step >= 25] == [
        (25, "loss", False), (30, "loss", True), (30, "lr", True)]
    assert [m.step for m in store.metrics(job_id, "lr", include_superseded=True)] == [30]
    # The resumed run's step 25 is the newest loss, not the rolled-back step 30; lr has no
    # live value left.
    assert store.latest_metrics(job_id) == {"loss": (25, 1.8), "eval_loss": (20, 2.2)}
    # Other jobs are untouched.
    assert [(m.step, m.superseded) for m in store.metrics(other, include_superseded=True)] == [
        (30, False)]
    assert store.latest_metrics(other) == {"loss": (30, 9.0)}


def test_supersede_names_restated_at_the_resume_step(store: Store) -> None:
    job_id = new_job(store)
    store.add_metrics(job_id, 1, [(20, "total_steps", 30.0), (20, "loss", 2.0), (30, "loss", 1.5)])
    # A second run resuming from step 20 writes total_steps at 20 again, not loss.
    assert store.supersede_metrics(job_id, 20, restated=["total_steps"]) == 2
    assert [(m.step, m.name) for m in store.metrics(job_id)] == [(20, "loss")]


def test_supersede_all_metrics_of_a_job(store: Store) -> None:
    job_id, other = new_job(store), new_job(store)
    store.add_metrics(job_id, 1, [(0, "eval_loss", 4.0), (5, "loss", 2.0)])
    store.add_metrics(other, 1, [(0, "eval_loss", 3.0)])
    # A retry without a checkpoint starts over from step 0, its evaluation included.
    assert store.supersede_metrics(job_id, None) == 2
    assert store.metrics(job_id) == [] and store.latest_metrics(job_id) == {}
    store.add_metrics(job_id, 2, [(0, "eval_loss", 4.1)])
    assert [(m.attempt, m.superseded) for m in store.metrics(job_id, include_superseded=True)
            if m.name == "eval_loss"] == [(1, True), (2, False)]
    assert store.latest_metrics(job_id) == {"eval_loss": (0, 4.1)}
    assert len(store.metrics(other)) == 1
    assert store.supersede_metrics(12345, None) == 0  # no such job: nothing to mark


def test_metrics_large_batch(store: Store) -> None:
    job_id = new_job(store)
    rows = [(step, name, step * 0.5) for step in range(1500) for name in ("loss", "lr")]
    store.add_metrics(job_id, 1, rows)
    assert len(store.metrics(job_id)) == 3000
    assert store.latest_metrics(job_id) == {"loss": (1499, 749.5), "lr": (1499, 749.5)}


@pytest.mark.parametrize("bad_row", [(3, "loss", float("nan")), (3, "", 1.0), (3, "loss", "high")])
def test_bad_metrics_write_nothing(store: Store, bad_row: tuple[Any, Any, Any]) -> None:
    job_id = new_job(store)
    with pytest.raises(ValueError):
        store.add_metrics(job_id, 1, [(1, "loss", 2.0), (2, "loss", 1.9), bad_row])
    assert store.metrics(job_id) == []


def test_metrics_for_missing_job_write_nothing(store: Store) -> None:
    with pytest.raises(Exception, match="(?i)foreign key"):
        store.add_metrics(12345, 1, [(1, "loss", 2.0)])
    assert store.metrics(12345) == []


# -- checkpoints --------------------------------------------------------------------------


def add_ckpt(store: Store, job_id: int, step: int, kind: str = "checkpoint") -> int:
    ckpt = store.add_checkpoint(
        job_id,
        attempt=1,
        step=step,
        path=f"/art/{job_id}/checkpoint-{step}",
        size_bytes=3 * 2**30,  # > 2 GiB: needs a 64-bit column
        metrics={"eval_loss": 1.0 / step},
        kind=kind,
    )
    assert ckpt.id is not None
    return ckpt.id


def flags(store: Store, job_id: int) -> list[tuple[int, bool, bool, bool]]:
    return [
        (c.step, c.is_latest, c.is_best, c.deleted) for c in store.checkpoints(job_id, include_deleted=True)
    ]


def test_checkpoint_flags(store: Store) -> None:
    job_id = new_job(store)
    other = new_job(store)
    c100 = add_ckpt(store, job_id, 100)
    add_ckpt(store, other, 50)
    c200 = add_ckpt(store, job_id, 200)
    c300 = add_ckpt(store, job_id, 300)
    assert flags(store, job_id) == [
        (100, False, False, False),
        (200, False, False, False),
        (300, True, False, False),
    ]
    assert flags(store, other) == [(50, True, False, False)]  # other jobs are untouched

    store.set_best_checkpoint(job_id, c200)
    store.set_best_checkpoint(job_id, c100)
    assert [c.is_best for c in store.checkpoints(job_id)] == [True, False, False]
    with pytest.raises(ValueError):
        store.set_best_checkpoint(job_id, add_ckpt(store, other, 60))  # belongs to `other`
    with pytest.raises(KeyError):
        store.set_best_checkpoint(job_id + 1000, c100)
    assert [c.is_best for c in store.checkpoints(job_id)] == [True, False, False]

    store.mark_checkpoint_deleted(c200)
    assert [c.id for c in store.checkpoints(job_id)] == [c100, c300]
    assert flags(store, job_id)[1] == (200, False, False, True)
    with pytest.raises(KeyError):
        store.mark_checkpoint_deleted(999_999)

    final = store.add_checkpoint(
        job_id, attempt=1, step=400, path="/art/final", size_bytes=1, metrics={}, kind="final"
    )
    assert final.kind == "final" and not final.is_latest  # the resume point stays c300
    assert [c.id for c in store.checkpoints(job_id) if c.is_latest] == [c300]

    store.set_best_checkpoint(job_id, None)
    assert not any(c.is_best for c in store.checkpoints(job_id, include_deleted=True))


def test_checkpoint_fields_round_trip(store: Store) -> None:
    job_id = new_job(store)
    ckpt_id = add_ckpt(store, job_id, 10)
    [ckpt] = store.checkpoints(job_id)
    assert ckpt.id == ckpt_id
    assert (ckpt.job_id, ckpt.attempt, ckpt.step, ckpt.kind) == (job_id, 1, 10, "checkpoint")
    assert ckpt.path == f"/art/{job_id}/checkpoint-10"
    assert ckpt.size_bytes == 3 * 2**30
    assert ckpt.metrics == {"eval_loss": 0.1}
    assert_utc(ckpt.created_at)


def test_bad_checkpoints_write_nothing(store: Store) -> None:
    job_id = new_job(store)
    c1 = add_ckpt(store, job_id, 1)
    with pytest.raises(ValueError):
        add_ckpt(store, job_id, 2, kind="snapshot")
    with pytest.raises(ValueError):
        store.add_checkpoint(job_id, attempt=1, step=3, path="/p", size_bytes=1, metrics={"x": float("inf")})
    with pytest.raises(KeyError):
        add_ckpt(store, job_id + 1000, 4)
    assert [(c.id, c.is_latest) for c in store.checkpoints(job_id)] == [(c1, True)]


def test_one_best_and_latest_enforced_by_database(store: Store) -> None:
    job_id = new_job(store)
    add_ckpt(store, job_id, 1)
    add_ckpt(store, job_id, 2)
    with store.engine.begin() as conn, pytest.raises(Exception, match="(?i)unique"):
        conn.execute(text("UPDATE checkpoints SET is_latest = true"))


# -- schema, timestamps, concurrency ------------------------------------------------------


def test_migrations_idempotent_and_match_models(db_url: str) -> None:
    for _ in range(2):
        with Store(db_url) as store:
            new_job(store)
    with Store(db_url) as store, store.engine.connect() as conn:
        head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(head,)]
        assert len(store.list_jobs()) == 2
        # The hand-written migration and the SQLModel tables describe the same schema.
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_metrics_recorded_before_the_superseded_column_stay_live(db_url: str) -> None:
    """0003 adds metrics.superseded NOT NULL to a table that already has rows, and undoes it."""
    cfg = _alembic_config()
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
            now = datetime.now(timezone.utc)
            job_id = conn.execute(text(
                "INSERT INTO jobs (name, objective, owner, state, priority, spec, spec_yaml, gpus,"
                " cpus, attempts, max_attempts, artifact_dir, created_at, updated_at) VALUES"
                " ('old', 'clm', 'ann', 'running', 0, '{}', '', 0, 1, 1, 1, '/a', :now, :now)"
                " RETURNING id"), {"now": now}).scalar_one()
            conn.execute(text("INSERT INTO metrics (job_id, attempt, step, name, value, at)"
                              " VALUES (:job, 1, 3, 'loss', 2.0, :now)"), {"job": job_id, "now": now})
        with Store(db_url) as store:
            [row] = store.metrics(job_id)
            assert (row.step, row.superseded) == (3, False)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
            assert conn.execute(text("SELECT step FROM metrics")).all() == [(3,)]
    finally:
        engine.dispose()
    with Store(db_url) as store:  # and up again
        assert [m.step for m in store.metrics(job_id)] == [3]


def test_plain_postgresql_url_uses_psycopg(db_url: str) -> None:
    """`postgresql://` would mean psycopg2 to SQLAlchemy; orch ships psycopg 3."""
    with Store(db_url.replace("postgresql+psycopg://", "postgresql://")) as store:
        new_job(store)
        assert store.engine.dialect.driver in ("pysqlite", "psycopg")


def test_timestamps_are_utc(store: Store) -> None:
    job_id = new_job(store)
    store.transition(job_id, P, "admit")
    store.transition(job_id, R, "run")
    store.add_metrics(job_id, 1, [(1, "loss", 1.0)])
    store.transition(job_id, S, "done")
    job = store.get_job(job_id)
    assert job is not None
    for value in (job.created_at, job.updated_at, job.started_at, job.finished_at):
        assert_utc(value)
    for event in store.events(job_id):
        assert_utc(event.at)
    assert_utc(store.metrics(job_id)[0].at)
    # Ordering by time in SQL agrees with ordering in Python.
    ats = [e.at for e in store.events(job_id)]
    assert ats == sorted(ats)


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path}/new/dir/orch.db") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def _create_jobs(url: str, worker: int, barrier: Any, errors: Any) -> None:
    """One worker process: open the store on the fresh database and submit 10 jobs."""
    try:
        barrier.wait(timeout=30)  # all workers migrate and write at the same moment
        with Store(url) as store:
            for i in range(10):
                store.create_job(
                    name=f"w{worker}-{i}",
                    objective="clm",
                    owner=f"w{worker}",
                    spec={"i": i},
                    spec_yaml="",
                    gpus=0,
                    cpus=1,
                )
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def test_concurrent_processes_on_fresh_database(db_url: str) -> None:
    """8 processes x 10 jobs, all starting with `Store(url)` on an empty database."""
    # fork: the children start in milliseconds instead of re-importing everything (seconds
    # on a small CI machine); each still opens its own engine and connections.
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_create_jobs, args=(db_url, n, barrier, errors)) for n in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert errors.empty(), errors.get()
    assert [p.exitcode for p in procs] == [0] * 8
    with Store(db_url) as store:
        jobs = store.list_jobs()
        assert len(jobs) == 80
        assert len({j.id for j in jobs}) == 80
        assert sorted(j.name for j in jobs) == sorted(f"w{w}-{i}" for w in range(8) for i in range(10))
        for job in jobs[::10]:
            assert len(store.events(job.id or 0)) == 1


def _alembic_config() -> Config:
    from orchestrator.store import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def test_attempts_are_opened_and_closed_with_transitions(store: Store) -> None:
    job = store.create_job(name="a", objective="clm", owner="o", spec={}, spec_yaml="",
                           gpus=0, cpus=1, max_attempts=2)
    assert job.id is not None
    assert store.transition(job.id, JobState.PENDING, "admitted", attempts=1,
                            attempt_started="orch-1-1", ray_submission_id="orch-1-1")
    assert store.transition(job.id, JobState.RUNNING, "started")
    assert store.transition(job.id, JobState.QUEUED, "retry",
                            attempt_ended=("retried", "worker process died"))
    assert store.transition(job.id, JobState.PENDING, "admitted", attempts=2,
                            attempt_started="orch-1-2")
    assert store.transition(job.id, JobState.RUNNING, "started")
    assert store.transition(job.id, JobState.SUCCEEDED, "done", attempt_ended=("succeeded", None))
    rows = store.attempts(job.id)
    assert [(a.attempt, a.ray_submission_id, a.outcome, a.cause) for a in rows] == [
        (1, "orch-1-1", "retried", "worker process died"), (2, "orch-1-2", "succeeded", None)]
    assert all(a.ended_at and a.ended_at >= a.started_at for a in rows)
    # A refused transition opens no attempt.
    assert not store.transition(job.id, JobState.PENDING, "x", attempts=3, attempt_started="z")
    assert len(store.attempts(job.id)) == 2
