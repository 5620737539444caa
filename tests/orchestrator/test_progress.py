"""orchestrator.progress: the one definition of step/total, time, ETA and wait reason."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from orchestrator import progress
from orchestrator.cluster import Capacity
from orchestrator.scheduler import Scheduler
from orchestrator.store import Store
from tests.support import FakeExecutor
from tests.support import mlm_spec_dict as spec_dict

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def point(step: int, attempt: int, seconds: float) -> progress.PacePoint:
    return (step, attempt, T0 + timedelta(seconds=seconds))


def test_pace_is_the_recent_steps_per_second_of_the_latest_attempt() -> None:
    # Newest first: 10 steps in 5 s lately, after a slow start the average would include.
    recent = [point(40, 2, 100), point(35, 2, 97.5), point(30, 2, 95)]
    assert progress.steps_per_second(recent) == pytest.approx(2.0)
    # A previous attempt's points (before a retry restarted from a checkpoint) are left out.
    assert progress.steps_per_second([*recent, point(38, 1, 20)]) == pytest.approx(2.0)
    # One point, or points sent in one batch (one recorded time): no pace.
    assert progress.steps_per_second([point(40, 1, 100)]) is None
    assert progress.steps_per_second([point(40, 1, 100), point(35, 1, 100)]) is None
    assert progress.steps_per_second([]) is None


def test_eta_is_the_remaining_steps_at_that_pace() -> None:
    assert progress.eta_seconds(40, 100, 2.0) == pytest.approx(30.0)
    assert progress.eta_seconds(100, 100, 2.0) == 0
    assert progress.eta_seconds(40, None, 2.0) is None
    assert progress.eta_seconds(40, 100, None) is None


def test_durations_and_times_for_people() -> None:
    assert [progress.duration(s) for s in (None, 4, 252, 3900, 2 * 86400 + 3 * 3600)] == [
        "", "4s", "4m12s", "1h05m", "2d03h"]
    now = T0 + timedelta(days=3)
    assert [progress.ago(now - timedelta(seconds=s), now)
            for s in (1, 42, 180, 5 * 3600, 4 * 86400)] == [
        "just now", "42s ago", "3 min ago", "5 h ago", "4 d ago"]
    assert progress.step_of(120, 300) == "120/300"
    assert progress.step_of(120, None) == "120"
    assert progress.step_of(None, 300) == ""


def _at(store: Store, job_id: int, step: int, when: datetime) -> None:
    """Set when the store recorded the job's train_loss at `step` (the worker's batches
    arrive every few seconds; a test cannot wait for them)."""
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE metrics SET at = :at WHERE job_id = :job AND step = :step "
                          "AND name = 'train_loss'"),
                     {"at": when.astimezone(timezone.utc).replace(tzinfo=None)
                      if store.dialect == "sqlite" else when, "job": job_id, "step": step})


def test_progress_of_a_page_of_jobs_from_the_store(store: Store) -> None:
    sched = Scheduler(store, FakeExecutor(), Capacity(gpus=1, cpus=4, nodes=1))

    def job(gpus: int = 0) -> int:
        return int(store.create_job(name="j", objective="mlm", owner="me", spec=spec_dict(),
                                    spec_yaml="", gpus=gpus, cpus=1).id or 0)

    running, queued, done = job(), job(gpus=2), job()
    for job_id in (running, done):
        store.transition(job_id, "pending", "admitted")
        store.transition(job_id, "running", "started")
    store.add_metrics(running, 1, [(0, "total_steps", 100.0)]
                      + [(s, "train_loss", 3.0 - s / 100) for s in (10, 20, 30, 40)])
    now = datetime.now(timezone.utc)
    for step in (10, 20, 30, 40):  # 10 steps every 4 s: 2.5 steps/s
        _at(store, running, step, now - timedelta(seconds=(40 - step) * 0.4))
    store.add_metrics(done, 1, [(5, "train_loss", 1.0)])
    store.transition(done, "succeeded", "done")

    jobs = [store.get_job(i) for i in (running, queued, done)]
    found = progress.progress_of_jobs(store, sched, jobs, now)  # type: ignore[arg-type]
    assert found[running].step == 40 and found[running].total == 100
    assert found[running].steps_per_second == pytest.approx(2.5)
    assert found[running].eta_seconds == pytest.approx(60 / 2.5)
    assert found[running].waiting_reason is None
    assert found[queued].step is None and found[queued].eta_seconds is None
    assert found[queued].waiting_reason == sched.wait_reason(store.get_job(queued))  # type: ignore[arg-type]
    assert found[queued].ran_for is None and found[queued].queued_for is not None
    assert found[done].eta_seconds is None and found[done].step == 5
    # The store's recent points: newest first, at most as many as asked for.
    recent = store.recent_points([running], "train_loss", 3)[running]
    assert [p[0] for p in recent] == [40, 30, 20]
