"""Jobs, state machine moves, events and attempts in the Store, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.models import AttemptOutcome
from orchestrator.settings import get_settings
from orchestrator.states import TERMINAL_STATES, JobState
from orchestrator.store import InvalidTransition, Store, Supersede
from tests.support import assert_utc, new_job, state_of

Q, P, R = JobState.QUEUED, JobState.PENDING, JobState.RUNNING
S, F, C = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED


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
    assert job.artifact_dir == str(get_settings().home_dir() / "jobs" / str(job_id))


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
    with pytest.raises(InvalidRequest):
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


def test_queue_pages_walk_every_priority_level_in_order(store: Store) -> None:
    ids = [new_job(store, priority=p) for p in (0, 7, 0, 3, 7, 0, 3, -2)]
    expected = [ids[1], ids[4], ids[3], ids[6], ids[0], ids[2], ids[5], ids[7]]
    for size in (1, 2, 3, 8, 50):  # pages that end inside a level, at its end, or past all
        walked: list[int] = []
        after: tuple[int, int] | None = None
        while True:
            page = store.queue_page(limit=size, after=after)
            assert len(page) <= size
            walked += [j.id for j in page]
            if len(page) < size:
                break
            after = (page[-1].priority, page[-1].id)
        assert walked == expected, size
    usage, caps, head = store.admission_view(3)
    assert [j.id for j in head] == expected[:3] and usage == {} and caps == {}
    assert store.queue_page(limit=5, after=(-2, ids[7])) == []


def test_queue_reads_are_index_range_scans_without_a_sort(store: Store) -> None:
    """A page of the queue costs the same however long the queue: no statement that reads
    it sorts the queued jobs (ORDER BY priority DESC, id ASC would sort all of them)."""
    from orchestrator.store import jobs as jobs_module

    for p in (0, 5, 5, 1):
        new_job(store, priority=p)
    statements = {"top": jobs_module._QUEUE_TOP.params(n=20),
                  "level": jobs_module._QUEUE_LEVEL.params(n=20, p=5, after=1),
                  "below": jobs_module._QUEUE_BELOW.params(n=20, p=5)}
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            # The planner would seq-scan and sort a table this small whatever the query;
            # forbid that, so the plan shows whether the index alone can serve the order.
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        for name, stmt in statements.items():
            sql = str(stmt.compile(dialect=store.engine.dialect,
                                   compile_kwargs={"literal_binds": True}))
            prefix = "EXPLAIN" if store.dialect == "postgresql" else "EXPLAIN QUERY PLAN"
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"{prefix} {sql}"))
            assert "ix_jobs_queue" in plan, (name, plan)
            assert "Sort" not in plan and "TEMP B-TREE" not in plan, (name, plan)


def test_update_job(store: Store) -> None:
    job_id = new_job(store)
    store.update_job(job_id, ray_submission_id="raysubmit_1", error="note")
    job = store.get_job(job_id)
    assert job is not None
    assert (job.ray_submission_id, job.error, job.state) == ("raysubmit_1", "note", "queued")
    assert job.updated_at > job.created_at
    for bad in ({"state": "running"}, {"id": 7}, {"created_at": job.created_at}, {"nope": 1}):
        with pytest.raises(InvalidRequest):
            store.update_job(job_id, **bad)
    with pytest.raises(InvalidRequest):
        store.update_job(job_id, started_at=datetime(2024, 1, 1))  # naive
    with pytest.raises(NotFound):
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
    with pytest.raises(InvalidRequest):
        store.transition(job_id, P, "x", state="running")
    with pytest.raises(InvalidRequest):
        store.transition(job_id, P, "x", name="renamed")
    with pytest.raises(InvalidRequest):
        store.transition(job_id, P, "x", started_at=datetime(2024, 1, 1))  # naive
    with pytest.raises(InvalidRequest):
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




def test_attempts_are_opened_and_closed_with_transitions(store: Store) -> None:
    job = store.create_job(name="a", objective="clm", owner="o", spec={}, spec_yaml="",
                           gpus=0, cpus=1, max_attempts=2)
    assert job.id is not None
    assert store.transition(job.id, JobState.PENDING, "admitted", attempts=1,
                            attempt_started="orch-1-1", ray_submission_id="orch-1-1")
    assert store.transition(job.id, JobState.RUNNING, "started")
    assert store.transition(job.id, JobState.QUEUED, "retry",
                            attempt_ended=(AttemptOutcome.RETRIED, "worker process died"))
    assert store.transition(job.id, JobState.PENDING, "admitted", attempts=2,
                            attempt_started="orch-1-2")
    assert store.transition(job.id, JobState.RUNNING, "started")
    assert store.transition(job.id, JobState.SUCCEEDED, "done",
                            attempt_ended=(AttemptOutcome.SUCCEEDED, None))
    rows = store.attempts(job.id)
    assert [(a.attempt, a.ray_submission_id, a.outcome, a.cause) for a in rows] == [
        (1, "orch-1-1", AttemptOutcome.RETRIED, "worker process died"),
        (2, "orch-1-2", AttemptOutcome.SUCCEEDED, None)]
    assert all(a.ended_at and a.ended_at >= a.started_at for a in rows)
    # A refused transition opens no attempt.
    assert not store.transition(job.id, JobState.PENDING, "x", attempts=3, attempt_started="z")
    assert len(store.attempts(job.id)) == 2


# -- admission in bulk, and the attempts' worker tokens ------------------------------------


def test_claim_jobs_admits_in_one_transaction_and_skips_jobs_moved_meanwhile(store: Store) -> None:
    a, b, c = new_job(store, gpus=1), new_job(store, gpus=2), new_job(store, gpus=0, cpus=3)
    store.transition(b, C, "cancelled by bob")  # a concurrent cancel won the race for b
    claims = store.claim_jobs([c, a, b])
    assert [(x.job_id, x.attempt, x.submission_id, x.gpus, x.cpus) for x in claims] == [
        (c, 1, f"orch-{c}-1", 0, 3), (a, 1, f"orch-{a}-1", 1, 4)]
    assert all(x.token.startswith("orch_w_") and len(x.token) > 40 for x in claims)
    assert len({x.token for x in claims}) == 2
    for claim in claims:
        job = store.get_job(claim.job_id)
        assert job is not None and job.state == P and job.attempts == 1
        assert job.ray_submission_id == claim.submission_id
        [event] = [e for e in store.events(claim.job_id) if e.to_state == P]
        assert event.reason.startswith(f"admitted: {claim.gpus} GPU(s), {claim.cpus} CPU(s)")
        assert event.details == {"attempt": 1, "submission_id": claim.submission_id}
        [attempt] = store.attempts(claim.job_id)
        assert (attempt.attempt, attempt.outcome) == (1, AttemptOutcome.RUNNING)
        # The database keeps only the token's hash.
        assert attempt.token_hash and claim.token not in attempt.token_hash
    assert state_of(store, b) == "cancelled" and store.attempts(b) == []
    assert store.claim_jobs([a, c]) == []  # pending already: nothing to claim twice


def test_a_worker_token_names_its_live_attempt_only(store: Store) -> None:
    first, other = new_job(store, max_attempts=2), new_job(store)
    [claim] = store.claim_jobs([first])
    [other_claim] = store.claim_jobs([other])
    found = store.live_attempt_for_token(claim.token)
    assert found is not None and (found[0].id, found[1].attempt) == (first, 1)
    assert store.live_attempt_for_token(claim.token + "x") is None
    assert store.live_attempt_for_token("orch_w_made-up") is None
    assert store.live_attempt_for_token(other_claim.token)[0].id == other  # type: ignore[index]
    # The attempt ends (lost; the job is requeued for a retry): its token is dead for good,
    # and the next attempt gets a token of its own.
    store.transition(first, R, "started")
    store.transition(first, Q, "retry", attempt_ended=(AttemptOutcome.RETRIED, "lost"))
    assert store.live_attempt_for_token(claim.token) is None
    [retry] = store.claim_jobs([first])
    assert retry.attempt == 2 and retry.previous_submission_id == f"orch-{first}-1"
    assert store.live_attempt_for_token(retry.token)[1].attempt == 2  # type: ignore[index]
    assert store.live_attempt_for_token(claim.token) is None


def test_worker_reports_with_a_key_are_applied_once(store: Store) -> None:
    job_id = new_job(store)
    [claim] = store.claim_jobs([job_id])
    attempt_id = store.attempts(job_id)[0].id
    assert attempt_id is not None
    for _ in range(2):  # the answer was lost; the worker sends it again
        assert store.add_event(job_id, "group restarted", details={"rank": 0},
                               request=(attempt_id, "k-1"))
    assert store.add_event(job_id, "group restarted", request=(attempt_id, "k-2"))
    notes = [e for e in store.events(job_id) if e.reason == "group restarted"]
    assert len(notes) == 2 and notes[0].details == {"rank": 0}
    assert claim.job_id == job_id


def test_a_start_supersedes_in_the_same_transaction(store: Store) -> None:
    job_id = new_job(store)
    store.add_metrics(job_id, 1, [(1, "loss", 3.0), (5, "loss", 2.0), (5, "total_steps", 9)])
    store.claim_jobs([job_id])
    assert store.transition(job_id, R, "resuming from step 1", expected=[P],
                            supersede=Supersede(after_step=1, restated=["total_steps"]))
    assert [(m.step, m.name) for m in store.metrics(job_id)] == [(1, "loss")]
    # A start that loses its compare-and-set supersedes nothing.
    store.add_metrics(job_id, 1, [(7, "loss", 1.0)])
    assert not store.transition(job_id, R, "again", expected=[P], supersede=Supersede(None))
    assert [m.step for m in store.metrics(job_id)] == [1, 7]


def test_the_drivers_words_become_the_attempts_cause(store: Store) -> None:
    job_id = new_job(store)
    store.claim_jobs([job_id])
    assert store.set_attempt_cause(job_id, 1, "worker process died: SIGKILL")
    assert store.attempts(job_id)[0].cause == "worker process died: SIGKILL"
    store.transition(job_id, F, "lost", attempt_ended=(AttemptOutcome.FAILED, "lost for good"))
    assert not store.set_attempt_cause(job_id, 1, "too late")
    assert store.attempts(job_id)[0].cause == "lost for good"


def test_moves_are_announced_after_the_commit(store: Store) -> None:
    seen: list[tuple[list[int], str]] = []
    store.on_state_change(lambda ids: seen.append((list(ids), store.job_state(ids[0]).value)))
    job = new_job(store)
    assert seen == []  # a new job is no move
    claimed = store.claim_jobs([job])
    assert [c.job_id for c in claimed] == [job] and seen == [([job], "pending")]
    assert not store.transition(job, "succeeded", "no", expected=["running"])  # refused
    assert store.transition(job, "running", "started", expected=["pending"])
    assert seen == [([job], "pending"), ([job], "running")]
