"""Checkpoints in the Store, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.models import CheckpointKind
from orchestrator.store import Store
from tests.support import add_ckpt, assert_utc, flags, new_job

# -- checkpoints --------------------------------------------------------------------------


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
    with pytest.raises(NotFound):
        store.set_best_checkpoint(job_id, add_ckpt(store, other, 60))  # belongs to `other`
    with pytest.raises(NotFound):
        store.set_best_checkpoint(job_id + 1000, c100)
    assert [c.is_best for c in store.checkpoints(job_id)] == [True, False, False]

    assert store.mark_checkpoints_deleted(job_id, [c200]) == 1
    assert [c.id for c in store.checkpoints(job_id)] == [c100, c300]
    assert flags(store, job_id)[1] == (200, False, False, True)
    assert store.mark_checkpoints_deleted(job_id, [999_999]) == 0
    assert store.mark_checkpoints_deleted(other, [c100]) == 0  # not the other job's
    assert flags(store, job_id)[0] == (100, False, True, False)

    final = store.add_checkpoint(
        job_id, attempt=1, step=400, path="/art/final", size_bytes=1, metrics={}, kind="final"
    )
    assert final.kind == CheckpointKind.FINAL and not final.is_latest  # the resume point stays c300
    assert [c.id for c in store.checkpoints(job_id) if c.is_latest] == [c300]

    store.set_best_checkpoint(job_id, None)
    assert not any(c.is_best for c in store.checkpoints(job_id, include_deleted=True))


def test_checkpoint_fields_round_trip(store: Store) -> None:
    job_id = new_job(store)
    ckpt_id = add_ckpt(store, job_id, 10)
    [ckpt] = store.checkpoints(job_id)
    assert ckpt.id == ckpt_id
    assert (ckpt.job_id, ckpt.attempt, ckpt.step, ckpt.kind) == (job_id, 1, 10,
                                                                  CheckpointKind.CHECKPOINT)
    assert ckpt.path == f"/art/{job_id}/checkpoint-10"
    assert ckpt.size_bytes == 3 * 2**30
    assert ckpt.metrics == {"eval_loss": 0.1}
    assert_utc(ckpt.created_at)


def test_bad_checkpoints_write_nothing(store: Store) -> None:
    job_id = new_job(store)
    c1 = add_ckpt(store, job_id, 1)
    with pytest.raises(InvalidRequest):
        add_ckpt(store, job_id, 2, kind="snapshot")
    with pytest.raises(InvalidRequest):
        store.add_checkpoint(job_id, attempt=1, step=3, path="/p", size_bytes=1, metrics={"x": float("inf")})
    with pytest.raises(NotFound):
        add_ckpt(store, job_id + 1000, 4)
    assert [(c.id, c.is_latest) for c in store.checkpoints(job_id)] == [(c1, True)]


def test_one_best_and_latest_enforced_by_database(store: Store) -> None:
    job_id = new_job(store)
    add_ckpt(store, job_id, 1)
    add_ckpt(store, job_id, 2)
    with store.engine.begin() as conn, pytest.raises(Exception, match="(?i)unique"):
        conn.execute(text("UPDATE checkpoints SET is_latest = true"))




def test_a_path_registered_again_updates_its_row(store: Store) -> None:
    job_id = new_job(store)
    first = add_ckpt(store, job_id, 10)
    again = store.add_checkpoint(job_id, attempt=2, step=10, path=f"/art/{job_id}/checkpoint-10",
                                 size_bytes=5, metrics={"eval_loss": 0.5})
    assert again.id == first
    [row] = store.checkpoints(job_id, include_deleted=True)
    assert (row.attempt, row.size_bytes, row.metrics, row.is_latest) == (2, 5, {"eval_loss": 0.5},
                                                                          True)


def register(store: Store, job_id: int, step: int, metrics: dict[str, float],
             keep_last: int = 2) -> list[int]:
    _, doomed = store.register_checkpoint(
        job_id, attempt=1, step=step, path=f"/art/{job_id}/checkpoint-{step}", size_bytes=1,
        metrics=metrics, keep_last=keep_last, best_metric="eval_loss", best_mode="min")
    store.mark_checkpoints_deleted(job_id, [c.id for c in doomed if c.id is not None])
    return [c.step for c in doomed]


def test_retention_keeps_the_last_ones_and_the_best(store: Store) -> None:
    job_id = new_job(store)
    assert register(store, job_id, 10, {"eval_loss": 3.0}) == []
    assert register(store, job_id, 20, {"eval_loss": 1.0}) == []
    assert register(store, job_id, 30, {"eval_loss": 2.0}) == [10]
    # 20 is the best: it stays although it is no longer among the last two.
    assert register(store, job_id, 40, {"eval_loss": 2.5}) == []
    assert [(c.step, c.is_best, c.is_latest) for c in store.checkpoints(job_id)] == [
        (20, True, False), (30, False, False), (40, False, True)]
    # A checkpoint without an evaluation at its step is never ranked, however old the
    # evaluation it would otherwise inherit.
    assert register(store, job_id, 50, {}) == [30]
    assert [c.step for c in store.checkpoints(job_id) if c.is_best] == [20]
    assert register(store, job_id, 60, {"eval_loss": 0.5}) == [20, 40]
    assert [(c.step, c.is_best) for c in store.checkpoints(job_id)] == [(50, False), (60, True)]
