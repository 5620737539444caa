"""The Store's reads for the dashboard (job pages, latest values, curves, resume chains), on
SQLite and PostgreSQL."""

from __future__ import annotations

from orchestrator.states import JobState
from orchestrator.store import Store
from orchestrator.store.reads import Series
from tests.support import new_job


def test_job_pages_go_both_ways_and_filter(store: Store) -> None:
    ids = [new_job(store, owner="ann" if i % 2 else "bob") for i in range(7)]
    store.transition(ids[3], JobState.CANCELLED, "cancelled by ann")
    newest = store.job_page(limit=3)
    assert [j.id for j in newest] == ids[6:3:-1]
    older = store.job_page(before_id=newest[-1].id, limit=3)
    assert [j.id for j in older] == ids[3:0:-1]
    # "Newer" from the older page: the 3 jobs just above it, still newest first.
    assert [j.id for j in store.job_page(after_id=older[0].id, limit=3)] == ids[6:3:-1]
    assert [j.id for j in store.job_page(after_id=ids[0], limit=2)] == [ids[2], ids[1]]
    assert [j.id for j in store.job_page(owner="ann", limit=10)] == [ids[5], ids[3], ids[1]]
    assert [j.id for j in store.job_page(states=[JobState.CANCELLED])] == [ids[3]]
    assert store.job_counts() == {JobState.QUEUED: 6, JobState.CANCELLED: 1}
    assert store.job_counts(owner="bob") == {JobState.QUEUED: 4}
    assert store.job_owners() == ["ann", "bob"]
    assert [j.id for j in store.jobs_by_ids([ids[4], 10_000, ids[0]])] == [ids[4], ids[0]]
    assert store.jobs_by_ids([]) == []


def test_latest_values_are_the_newest_live_ones(store: Store) -> None:
    first, second = new_job(store), new_job(store)
    store.add_metrics(first, 1, [(s, "train_loss", 10.0 - s) for s in range(1, 6)]
                      + [(4, "eval_loss", 3.0), (0, "total_steps", 100.0)])
    # A resumed run from step 3 supersedes steps 4 and 5 and writes them again.
    store.supersede_metrics(first, after_step=3)
    store.add_metrics(first, 2, [(4, "train_loss", 0.5)])
    latest = store.latest_values({first: ["train_loss", "eval_loss", "total_steps", "nope"],
                                  second: ["train_loss"]})
    assert latest == {first: {"train_loss": (4, 0.5), "total_steps": (0, 100.0)}, second: {}}
    assert store.latest_values({}) == {}


def test_series_counts_and_names(store: Store) -> None:
    job_id = new_job(store)
    store.add_metrics(job_id, 1, [(s, "train_loss", float(s)) for s in range(1, 11)]
                      + [(5, "eval_loss", 1.0), (10, "eval_loss", 0.5)])
    store.supersede_metrics(job_id, after_step=8)
    store.add_metrics(job_id, 2, [(9, "train_loss", 90.0)])
    assert store.metric_names([job_id]) == ["eval_loss", "train_loss"]
    assert store.metric_names([]) == []
    series = store.metric_series(job_id, ["train_loss", "eval_loss"])
    assert series["train_loss"].steps == list(range(1, 10))
    assert series["train_loss"].values[-1] == 90.0 and not any(series["train_loss"].superseded)
    assert series["eval_loss"] == Series([5], [1.0], [False])
    everything = store.metric_series(job_id, ["train_loss"], include_superseded=True)["train_loss"]
    assert list(zip(everything.steps, everything.superseded, strict=True))[-3:] == [
        (9, True), (9, False), (10, True)]
    window = store.metric_series(job_id, ["train_loss"], after_step=3, max_step=5)
    assert window["train_loss"].steps == [4, 5]
    assert store.metric_series(job_id, []) == {}
    assert store.metric_counts(job_id, ["train_loss", "eval_loss", "nope"]) == {
        "train_loss": 9, "eval_loss": 1, "nope": 0}
    assert store.metric_counts(job_id, ["train_loss"], include_superseded=True) == {
        "train_loss": 11}


def test_lineage_follows_resumes_to_the_first_job(store: Store) -> None:
    root = new_job(store)
    middle = new_job(store, parent_job_id=root)
    leaf = new_job(store, parent_job_id=middle)
    other = new_job(store, parent_job_id=root)
    assert [j.id for j in store.lineage(leaf)] == [root, middle, leaf]
    assert [j.id for j in store.lineage(root)] == [root]
    assert store.lineage(10_000) == []
    assert store.resumed_by(root) == [middle, other]
    assert store.resumed_by(leaf) == []
