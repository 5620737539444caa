"""Metrics in the Store, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.errors import InvalidRequest
from orchestrator.store import Store
from tests.support import new_job

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
    with pytest.raises(InvalidRequest):
        store.add_metrics(job_id, 1, [(1, "loss", 2.0), (2, "loss", 1.9), bad_row])
    assert store.metrics(job_id) == []


def test_metrics_for_missing_job_write_nothing(store: Store) -> None:
    with pytest.raises(Exception, match="(?i)foreign key"):
        store.add_metrics(12345, 1, [(1, "loss", 2.0)])
    assert store.metrics(12345) == []




def test_a_report_sent_twice_is_counted_once(store: Store) -> None:
    """A worker whose answer was lost sends its batch again: each (attempt, step, name) keeps
    one live value, the first."""
    job_id = new_job(store)
    rows = [(1, "train_loss", 2.0), (1, "learning_rate", 1e-3), (2, "train_loss", 1.9)]
    assert store.add_metrics(job_id, 1, rows) == 3
    assert store.add_metrics(job_id, 1, [*rows, (3, "train_loss", 1.8)]) == 1
    assert store.add_metrics(job_id, 1, [(2, "train_loss", 99.0)]) == 0
    assert [(m.step, m.name, m.value) for m in store.metrics(job_id, "train_loss")] == [
        (1, "train_loss", 2.0), (2, "train_loss", 1.9), (3, "train_loss", 1.8)]
    # Another attempt, or the same attempt after its rows were superseded (a restarted worker
    # group), writes those steps again.
    assert store.add_metrics(job_id, 2, [(2, "train_loss", 1.5)]) == 1
    store.supersede_metrics(job_id, 1)
    assert store.add_metrics(job_id, 1, [(2, "train_loss", 1.7)]) == 1
    live = [(m.attempt, m.step, m.value) for m in store.metrics(job_id, "train_loss")]
    assert live == [(1, 1, 2.0), (1, 2, 1.7)]


def test_metric_rows_out_of_range_are_refused(store: Store) -> None:
    job_id = new_job(store)
    for bad in [(1, "x" * 101, 1.0), (-1, "loss", 1.0), (1, "loss", float("inf"))]:
        with pytest.raises(InvalidRequest):
            store.add_metrics(job_id, 1, [(0, "ok", 1.0), bad])
    assert store.metrics(job_id) == []
