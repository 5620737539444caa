"""Scheduler unit tests: admission order and capacity, reconciliation with Ray, cancel.

Ray is replaced by a recording fake executor; the store is real (SQLite and PostgreSQL).
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from orchestrator.cluster import Capacity
from orchestrator.executor import RayJobInfo, RayStatus
from orchestrator.models import AttemptOutcome
from orchestrator.scheduler import Scheduler
from orchestrator.states import JobState
from orchestrator.store import Store, submission_id
from tests.support import FakeExecutor


def add_job(store: Store, gpus: int = 1, cpus: int = 1, priority: int = 0, owner: str = "ann",
            max_attempts: int = 1) -> int:
    job = store.create_job(name="j", objective="clm", owner=owner, spec={}, spec_yaml="",
                           gpus=gpus, cpus=cpus, priority=priority, max_attempts=max_attempts)
    assert job.id is not None
    return job.id


def state(store: Store, job_id: int) -> str:
    job = store.get_job(job_id)
    assert job is not None
    return job.state


@pytest.fixture
def fake() -> FakeExecutor:
    return FakeExecutor()


@pytest.fixture
def sched(store: Store, fake: FakeExecutor) -> Scheduler:
    return Scheduler(store, fake, Capacity(gpus=2, cpus=8, nodes=1))


def test_admits_by_priority_then_submission_order(store: Store, fake: FakeExecutor,
                                                   sched: Scheduler) -> None:
    low = add_job(store, gpus=1)
    high = add_job(store, gpus=1, priority=5)
    later = add_job(store, gpus=1)
    sched.tick()
    assert fake.submitted == [submission_id(high, 1), submission_id(low, 1)]
    assert state(store, later) == JobState.QUEUED
    job = store.get_job(high)
    assert job and job.attempts == 1 and job.ray_submission_id == submission_id(high, 1)
    assert store.events(high)[-1].reason.startswith("admitted: 1 GPU(s)")


def test_head_of_queue_is_never_skipped(store: Store, fake: FakeExecutor,
                                        sched: Scheduler) -> None:
    running = add_job(store, gpus=1)
    sched.tick()
    big = add_job(store, gpus=2)
    small = add_job(store, gpus=1)
    sched.tick()
    # One GPU is free and `small` would fit, but `big` is ahead and must not starve.
    assert state(store, big) == JobState.QUEUED and state(store, small) == JobState.QUEUED
    assert sched.wait_reason(store.get_job(big)) == "waiting for 2 GPUs: 1 free"  # type: ignore[arg-type]
    assert sched.wait_reason(store.get_job(small)) == "1 job ahead"  # type: ignore[arg-type]
    # The running job ends: its GPU is free again and the big job goes first.
    store.transition(running, JobState.RUNNING, "started", expected=[JobState.PENDING])
    store.transition(running, JobState.SUCCEEDED, "done", expected=[JobState.RUNNING])
    sched.tick()
    assert state(store, big) == JobState.PENDING and state(store, small) == JobState.QUEUED


def test_cpu_capacity_counts_too(store: Store, sched: Scheduler) -> None:
    a = add_job(store, gpus=0, cpus=6)
    b = add_job(store, gpus=0, cpus=4)
    sched.tick()
    assert state(store, a) == JobState.PENDING and state(store, b) == JobState.QUEUED
    assert "waiting for 4 CPUs: 2 free" in sched.wait_reason(store.get_job(b))  # type: ignore[arg-type]


def test_a_shrunken_cluster_has_none_free_never_a_negative_number(store: Store,
                                                                   sched: Scheduler) -> None:
    running = add_job(store, gpus=2)
    sched.tick()
    waiting = add_job(store, gpus=1)
    # A node left: the cluster now declares fewer GPUs than the running job holds.
    sched.capacity = dataclasses.replace(sched.capacity, gpus=1)
    assert state(store, running) == JobState.PENDING
    assert sched.wait_reason(store.get_job(waiting)) == "waiting for 1 GPU: 0 free"  # type: ignore[arg-type]


def test_never_fits_names_the_field(sched: Scheduler) -> None:
    assert sched.never_fits(2, 1) is None
    message = sched.never_fits(3, 1)
    assert message and message.startswith("resources.gpus: the job asks for 3 GPUs")
    assert (sched.never_fits(0, 9) or "").startswith("resources.cpus")


def test_failed_submission_requeues_and_pauses_admission(store: Store, fake: FakeExecutor,
                                                         sched: Scheduler) -> None:
    fake.fail_submit = True
    job = add_job(store)
    sched.tick()
    assert state(store, job) == JobState.QUEUED
    assert "could not submit to Ray (dashboard unreachable); requeued" in store.events(job)[-1].reason
    assert sched.unreachable_since is not None
    assert sched.wait_reason(store.get_job(job)).startswith("waiting for the Ray cluster")  # type: ignore[arg-type]
    fake.fail_submit = False
    sched.tick()  # Ray answers again: admission resumes
    admitted = store.get_job(job)
    assert admitted and admitted.state == JobState.PENDING and admitted.attempts == 2
    assert [(a.attempt, a.outcome) for a in store.attempts(job)] == [
        (1, AttemptOutcome.NOT_STARTED), (2, AttemptOutcome.RUNNING)]


@pytest.mark.parametrize(
    ("ray_status", "expected_error"),
    [
        (RayStatus.FAILED, "the Ray job failed: driver crashed"),
        (RayStatus.SUCCEEDED, "the driver exited without recording a result"),
        (RayStatus.STOPPED, "stopped outside orch"),
        (RayStatus.MISSING, "Ray has no record of the running job"),
    ],
)
def test_running_job_whose_ray_job_ended_is_failed_with_the_reason(
        store: Store, fake: FakeExecutor, sched: Scheduler, ray_status: RayStatus,
        expected_error: str) -> None:
    job = add_job(store)
    sched.tick()
    store.transition(job, JobState.RUNNING, "started", expected=[JobState.PENDING])
    fake.statuses[submission_id(job, 1)] = RayJobInfo(ray_status, "driver crashed")
    sched.tick()
    failed = store.get_job(job)
    assert failed and failed.state == JobState.FAILED
    assert expected_error in (failed.error or "") and "Traceback: boom" in (failed.error or "")


def test_outcome_recorded_by_the_worker_is_kept(store: Store, fake: FakeExecutor,
                                                sched: Scheduler) -> None:
    job = add_job(store)
    sched.tick()
    store.transition(job, JobState.RUNNING, "started", expected=[JobState.PENDING])
    store.transition(job, JobState.SUCCEEDED, "final model saved", expected=[JobState.RUNNING])
    fake.statuses[submission_id(job, 1)] = RayJobInfo(RayStatus.SUCCEEDED)
    sched.tick()
    assert state(store, job) == JobState.SUCCEEDED
    assert [e.to_state for e in store.events(job)][-1] == JobState.SUCCEEDED


def test_submission_lost_before_start_is_requeued(store: Store, fake: FakeExecutor,
                                                  sched: Scheduler) -> None:
    job = add_job(store)
    sched.tick()
    del fake.statuses[submission_id(job, 1)]
    fake.submitted.clear()
    fake.fail_submit = True  # keep it queued on this tick so the requeue is visible
    sched._reconcile()
    assert state(store, job) == JobState.QUEUED
    assert "requeued" in store.events(job)[-1].reason


def test_cancel_from_each_state(store: Store, fake: FakeExecutor, sched: Scheduler) -> None:
    queued = add_job(store, gpus=2)
    blocked = add_job(store, gpus=2)
    sched.tick()
    assert sched.cancel(blocked, "cancelled by ann") == (True, f"job {blocked} cancelled (it never started)")
    store.transition(queued, JobState.RUNNING, "started", expected=[JobState.PENDING])
    changed, message = sched.cancel(queued, "cancelled by ann")
    assert changed and "Ray job was stopped" in message
    assert fake.stopped == [submission_id(queued, 1)]
    assert state(store, queued) == JobState.CANCELLED
    assert sched.cancel(queued, "again") == (False, f"job {queued} already cancelled")
    assert sched.cancel(999, "x") == (False, "job 999 not found")
    # A cancelled job's GPUs count as free again.
    assert sched.free().gpus == 2


def test_infrastructure_failure_is_retried_then_fails(store: Store, fake: FakeExecutor,
                                                      sched: Scheduler) -> None:
    job = add_job(store, max_attempts=3)
    for attempt in (1, 2, 3):
        sched.tick()
        current = store.get_job(job)
        assert current and current.state == JobState.PENDING and current.attempts == attempt
        store.transition(job, JobState.RUNNING, "started", expected=[JobState.PENDING])
        fake.statuses[submission_id(job, attempt)] = RayJobInfo(RayStatus.FAILED, "worker died")
        sched.tick()
    failed = store.get_job(job)
    assert failed and failed.state == JobState.FAILED and "worker died" in (failed.error or "")
    assert [(a.attempt, a.outcome) for a in store.attempts(job)] == [
        (1, AttemptOutcome.RETRIED), (2, AttemptOutcome.RETRIED), (3, AttemptOutcome.FAILED)]
    reasons = [e.reason for e in store.events(job) if e.to_state == JobState.QUEUED][1:]
    assert "retry 1 of 2, resuming from the latest checkpoint" in reasons[0]
    assert "retry 2 of 2" in reasons[1]
    # The retry stopped the earlier attempt's Ray job before submitting the next.
    assert fake.stopped == [submission_id(job, 1), submission_id(job, 2)]


def test_error_recorded_by_the_worker_is_not_retried(store: Store, fake: FakeExecutor,
                                                     sched: Scheduler) -> None:
    job = add_job(store, max_attempts=3)
    sched.tick()
    store.transition(job, JobState.RUNNING, "started", expected=[JobState.PENDING])
    store.transition(job, JobState.FAILED, "training failed: KeyError", expected=[JobState.RUNNING],
                     error="KeyError", attempt_ended=(AttemptOutcome.FAILED, "KeyError"))
    fake.statuses[submission_id(job, 1)] = RayJobInfo(RayStatus.FAILED, "exit 1")
    sched.tick()
    assert state(store, job) == JobState.FAILED and fake.submitted == [submission_id(job, 1)]


def test_cluster_loss_moves_running_jobs_out_of_running(store: Store, fake: FakeExecutor) -> None:
    sched = Scheduler(store, fake, Capacity(gpus=2, cpus=8, nodes=1), cluster_loss_grace=0.3)
    retried = add_job(store, max_attempts=2)
    doomed = add_job(store)
    sched.tick()
    for job in (retried, doomed):
        store.transition(job, JobState.RUNNING, "started", expected=[JobState.PENDING])
    fake.down = True
    sched.tick()  # inside the grace period: nothing changes yet
    assert state(store, retried) == state(store, doomed) == JobState.RUNNING
    time.sleep(0.4)
    sched.tick()
    assert state(store, retried) == JobState.QUEUED
    assert state(store, doomed) == JobState.FAILED
    assert "the Ray cluster was unreachable" in (store.get_job(doomed).error or "")  # type: ignore[union-attr]
    sched.tick()  # no admissions while Ray is unreachable
    assert state(store, retried) == JobState.QUEUED
    fake.down = False
    sched.tick()
    current = store.get_job(retried)
    assert current and current.state == JobState.PENDING and current.attempts == 2


def test_per_user_gpu_cap_holds_back_only_that_user(store: Store, fake: FakeExecutor) -> None:
    sched = Scheduler(store, fake, Capacity(gpus=4, cpus=8, nodes=1), user_gpu_cap=2)
    first = add_job(store, gpus=2, owner="ann")
    second = add_job(store, gpus=1, owner="ann")
    bob = add_job(store, gpus=1, owner="bob")
    sched.tick()
    assert state(store, first) == JobState.PENDING and state(store, bob) == JobState.PENDING
    assert state(store, second) == JobState.QUEUED
    assert sched.wait_reason(store.get_job(second)) == (  # type: ignore[arg-type]
        "waiting for ann's other jobs: they hold 2 GPUs and the per-user cap is 2")
    assert (sched.never_fits(3, 1) or "").endswith(
        "each user may hold at most 2 at once; lower resources.gpus")


def test_a_users_own_gpu_cap_overrides_the_default(store: Store, fake: FakeExecutor) -> None:
    store.create_user("ann", actor="op", gpu_cap=1)
    sched = Scheduler(store, fake, Capacity(gpus=8, cpus=8, nodes=1), user_gpu_cap=3)
    first, second = add_job(store, owner="ann"), add_job(store, owner="ann")
    bobs = [add_job(store, gpus=2, owner="bob"), add_job(store, owner="bob")]
    sched.tick()
    assert [state(store, j) for j in (first, second, *bobs)] == [
        JobState.PENDING, JobState.QUEUED, JobState.PENDING, JobState.PENDING]
    assert sched.wait_reason(store.get_job(second)) == (  # type: ignore[arg-type]
        "waiting for ann's other jobs: they hold 1 GPUs and the per-user cap is 1")
    assert (sched.never_fits(2, 1, owner="ann", gpu_cap=1) or "").endswith(
        "ann may hold at most 1 at once; lower resources.gpus")


def test_the_drivers_own_words_head_the_failure_reason(store: Store, fake: FakeExecutor,
                                                       sched: Scheduler) -> None:
    job = add_job(store)
    sched.tick()
    # The driver reported why before its Ray Job ended; the logs are context, not parsed.
    fake.log_text = "training...\nsomething printed: worker process died: OOM"
    assert store.set_attempt_cause(job, 1, "worker process died: SIGKILL")
    fake.statuses[submission_id(job, 1)] = RayJobInfo(RayStatus.FAILED, "exit code 3")
    sched.tick()
    failed = store.get_job(job)
    assert failed and (failed.error or "").startswith("worker process died: SIGKILL\n")
    assert (failed.error or "").endswith("something printed: worker process died: OOM")


@pytest.mark.parametrize(("exit_code", "cause"), [
    (-9, "worker process died: killed by SIGKILL (signal 9)"),   # Python's Popen
    (137, "worker process died: killed by SIGKILL (signal 9)"),  # through a shell
    (143, "worker process died: killed by SIGTERM (signal 15)"),
    (1, "the Ray job failed: Job entrypoint command failed with exit code 1"),
    (None, "the Ray job failed: Job entrypoint command failed with exit code 1"),
])
def test_a_process_killed_from_outside_is_named_and_retried(
        store: Store, fake: FakeExecutor, sched: Scheduler, exit_code: int | None,
        cause: str) -> None:
    """A single worker trains in the Ray Job's entrypoint: killed, it can report nothing,
    and Ray's exit status is all there is to say why."""
    job = add_job(store, max_attempts=2)
    sched.tick()
    store.transition(job, JobState.RUNNING, "started", expected=[JobState.PENDING])
    fake.statuses[submission_id(job, 1)] = RayJobInfo(
        RayStatus.FAILED, "Job entrypoint command failed with exit code 1", exit_code)
    sched.tick()
    first = store.attempts(job)[0]
    assert first.outcome == AttemptOutcome.RETRIED and (first.cause or "").startswith(cause)


def test_multi_node_job_with_node_local_storage_is_refused(store: Store, fake: FakeExecutor) -> None:
    from orchestrator.spec import build_spec

    base = {"name": "d", "objective": "clm", "model": "m",
            "dataset": {"train_files": ["t.jsonl"]}}
    two_nodes = Scheduler(store, fake, Capacity(gpus=4, cpus=16, nodes=2, node_gpus=2,
                                                node_cpus=8))
    packed = build_spec(base, ["resources.gpus=2"])
    assert two_nodes.multi_node_problem(packed) is None  # fits one node
    spread = build_spec(base, ["resources.gpus=2", "resources.placement=spread"])
    assert "checkpoints.storage: resources.placement: spread" in two_nodes.multi_node_problem(spread)
    big = build_spec(base, ["resources.gpus=4"])
    assert "checkpoints.storage: resources: 4 workers need more than" in \
        two_nodes.multi_node_problem(big)
    shared = build_spec(base, ["resources.gpus=4", "checkpoints.storage=/mnt/shared"])
    assert two_nodes.multi_node_problem(shared) is None
    bucket = build_spec(base, ["resources.gpus=4", "checkpoints.storage=s3://team/runs"])
    assert two_nodes.multi_node_problem(bucket) is None  # every node uploads to the bucket
    one_node = Scheduler(store, fake, Capacity(gpus=4, cpus=16, nodes=1, node_gpus=4,
                                               node_cpus=16))
    assert one_node.multi_node_problem(spread) is None  # spread over one node is one node


def test_a_tick_claims_every_job_that_fits_at_once(store: Store, fake: FakeExecutor,
                                                   sched: Scheduler,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [add_job(store, gpus=0, cpus=2) for _ in range(5)]
    claims: list[list[int]] = []
    original = store.claim_jobs
    monkeypatch.setattr(store, "claim_jobs", lambda ids: claims.append(list(ids)) or original(ids))
    sched.tick()
    assert claims == [jobs[:4]]  # 8 CPUs: four fit, the fifth waits; one claim for the four
    assert [launch.job_id for launch in fake.launches] == jobs[:4]
    assert all(launch.token.startswith("orch_w_") and launch.workers == 1
               for launch in fake.launches)
    assert state(store, jobs[4]) == JobState.QUEUED


def test_a_failed_submission_requeues_the_rest_of_the_tick(store: Store, fake: FakeExecutor,
                                                           sched: Scheduler) -> None:
    first, second = add_job(store), add_job(store)
    calls = []

    def submit_once(launch: object) -> None:
        calls.append(launch)
        if len(calls) > 1:
            raise RuntimeError("dashboard went away")
        FakeExecutor.submit(fake, launch)

    fake.submit = submit_once  # type: ignore[method-assign]
    sched.tick()
    assert state(store, first) == JobState.PENDING and state(store, second) == JobState.QUEUED
    assert [a.outcome for a in store.attempts(second)] == [AttemptOutcome.NOT_STARTED]
    assert sched.unreachable_since is not None


def test_the_queue_is_read_in_pages_in_admission_order(store: Store, fake: FakeExecutor,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "QUEUE_PAGE", 2)
    sched = Scheduler(store, fake, Capacity(gpus=3, cpus=64, nodes=1))
    jobs = [add_job(store, gpus=1, priority=p) for p in (0, 5, 0, 5, 1)]
    assert [j.id for j in sched.queue()] == [jobs[1], jobs[3], jobs[4], jobs[0], jobs[2]]
    sched.tick()  # three GPUs: the three highest, across two pages
    assert [state(store, j) for j in jobs] == ["queued", "pending", "queued", "pending", "pending"]
    assert sched.wait_reason(store.get_job(jobs[2])) == (  # type: ignore[arg-type]
        "waiting for 1 GPU: 0 free, 1 job ahead")


def test_wait_reasons_of_a_page_match_each_jobs_own(store: Store, fake: FakeExecutor,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "QUEUE_PAGE", 2)  # the walk spans pages
    sched = Scheduler(store, fake, Capacity(gpus=2, cpus=64, nodes=1), user_gpu_cap=2)
    add_job(store, gpus=2, owner="ann")
    sched.tick()  # ann holds both GPUs
    queued = [add_job(store, gpus=g, owner=o, priority=p)
              for g, o, p in ((1, "bob", 0), (1, "ann", 9), (2, "bob", 1), (1, "cy", 0))]
    jobs = [store.require_job(j) for j in queued]
    one_by_one = {j.id: sched.wait_reason(j) for j in jobs}
    assert sched.wait_reasons(jobs) == one_by_one
    assert sched.wait_reasons(list(reversed(jobs))) == one_by_one
    assert one_by_one[queued[1]].startswith("waiting for ann's other jobs")  # capped: not ahead
    assert one_by_one[queued[3]] == "waiting for 1 GPU: 0 free, 2 jobs ahead"
    assert sched.wait_reasons([]) == {}


def test_a_ticks_statements_do_not_grow_with_the_queue(store: Store, fake: FakeExecutor) -> None:
    """Room for 3 of a queue of 10, then of 500: no more statements, one claim of 3. (The
    short queue may take one more: its first page runs past the end of the queue.)"""
    from sqlalchemy import event

    sched = Scheduler(store, fake, Capacity(gpus=0, cpus=3, nodes=1))

    def one_tick() -> list[str]:
        seen: list[str] = []

        def record(conn: object, cursor: object, statement: str, *rest: object) -> None:
            seen.append(statement)

        for job in store.list_jobs(states=[JobState.PENDING]):  # room again
            assert job.id is not None
            sched.cancel(job.id, "test: free the room")
        claims_before = len(fake.launches)
        event.listen(store.engine, "before_cursor_execute", record)
        try:
            sched.tick()
        finally:
            event.remove(store.engine, "before_cursor_execute", record)
        assert len(fake.launches) - claims_before == 3
        return seen

    for i in range(10):
        add_job(store, gpus=0, cpus=1, priority=i % 3, owner=f"u{i % 2}")
    shallow = one_tick()
    for i in range(490):
        add_job(store, gpus=0, cpus=1, priority=i % 3, owner=f"u{i % 2}")
    deep = one_tick()
    assert len(deep) <= len(shallow) and set(deep) <= set(shallow)
    assert sum(s.lstrip().upper().startswith("UPDATE") for s in deep) == 2  # claim + names
