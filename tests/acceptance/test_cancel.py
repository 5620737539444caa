"""Cancel: a running job ends cancelled, its Ray work stops, and its GPUs are free again."""

from __future__ import annotations

import getpass
import json
import time

import psutil
import pytest

from tests.support import FAKE_GPUS, alive_actor_names, run_orch, wait_until

pytestmark = pytest.mark.ray

LONG = ["jobs/bert_mlm.yaml", "--set", "training.max_steps=100000", "--set", "training.epochs=null",
        "--set", "resources.cpus=1", "-q"]
# Every GPU of the cluster: a Ray Train group of one worker per GPU.
ALL_GPUS = [*LONG, "--set", f"resources.gpus={FAKE_GPUS}"]
# One GPU: one worker, in the Ray Job's own process, which starts several times faster than
# a group.
ONE_GPU = [*LONG, "--set", "resources.gpus=1"]


def wait_for_state(store, job_id: int, states: set[str], timeout: float = 180) -> None:  # type: ignore[no-untyped-def]
    """Read the store, not `orch status`: a CLI process a second would take a good part of
    a core from the jobs it waits for."""
    wait_until(lambda: store.get_job(job_id).state in states, timeout,
               f"job {job_id} to reach {sorted(states)}", every=0.5)


def test_cancel_running_job_frees_its_gpus_for_the_next(orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    first = int(run_orch(orch_env, "submit", *ALL_GPUS, check=True).stdout)
    wait_for_state(orch_store, first, {"running"})

    # The first holds every GPU, so the second waits, and says why.
    second = int(run_orch(orch_env, "submit", *ONE_GPU, check=True).stdout)
    time.sleep(2)  # several scheduler ticks
    waiting = json.loads(run_orch(orch_env, "status", str(second), "-o", "json").stdout)
    assert waiting["state"] == "queued"
    assert "waiting for 1 GPU: 0 free" in waiting["wait_reason"]

    proc = run_orch(orch_env, "cancel", str(first), check=True)
    assert "cancelled" in proc.stdout
    assert orch_store.get_job(first).state == "cancelled"
    # The local server's token is the OS user's: the cancel is theirs.
    assert orch_store.events(first)[-1].reason == f"cancelled by {getpass.getuser()}"

    # Ray can place the second job's actor on a GPU only once the first's group released it.
    wait_for_state(orch_store, second, {"running"}, timeout=240)

    # A cancelled job stays cancelled; cancelling again is refused.
    again = run_orch(orch_env, "cancel", str(first))
    assert again.returncode == 1 and "already cancelled" in again.stdout

    # The second (one worker) trains in its Ray Job's entrypoint process.
    trainer = next(e.details for e in reversed(orch_store.events(second))
                   if e.to_state == "running")["pid"]
    assert psutil.pid_exists(trainer)
    run_orch(orch_env, "cancel", str(second), check=True)
    assert orch_store.get_job(second).state == "cancelled"
    # Nothing of either job is left on Ray: no Ray Job supervisor (which holds a single
    # worker's GPUs), no Ray Train actor, no training process.
    ray_side = {f"{prefix}orch-{job}-1" for job in (first, second)
                for prefix in ("", "_ray_internal_job_actor_")}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = alive_actor_names(orch_env) & ray_side
        if not alive and not psutil.pid_exists(trainer):
            break
        time.sleep(1)
    assert not alive, f"actors still alive after cancel: {alive}"
    assert not psutil.pid_exists(trainer), "the training process outlived the cancel"


def test_cancel_queued_job_never_starts(orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    blocker = int(run_orch(orch_env, "submit", *ONE_GPU, check=True).stdout)
    queued = int(run_orch(orch_env, "submit", *ALL_GPUS, check=True).stdout)
    try:
        assert run_orch(orch_env, "cancel", str(queued), check=True).stdout.endswith(
            "(it never started)\n")
        assert [e.to_state for e in orch_store.events(queued)] == ["queued", "cancelled"]
        assert orch_store.get_job(queued).ray_submission_id is None
    finally:
        run_orch(orch_env, "cancel", str(blocker))
