"""Recovery with real processes killed by signals: the worker, the control plane, Ray.

Runs last among the acceptance tests (the Ray-loss test kills the session's cluster and
starts it again).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.support import (
    FAKE_CPUS,
    FAKE_GPUS,
    assert_each_live_loss_once,
    make_bucket,
    run_orch,
    wait_until,
)

pytestmark = pytest.mark.ray

CLM = "jobs/gpt2_clm.yaml"
# Small, deterministic (CPU, fixed threads, dropout off in the tiny model), a loss every
# step, a checkpoint every 20; small batches and evaluations, so a step is cheap.
STEPS = 100
SMALL = ["--set", "training.batch_size=4", "--set", "training.max_length=64",
         "--set", "dataset.max_eval_samples=16"]
RESUMABLE = ["--set", f"training.max_steps={STEPS}", "--set", "training.save_steps=20",
             "--set", "training.eval_steps=20", "--set", "training.logging_steps=1",
             "--set", "training.seed=7", "--set", "retries=1", *SMALL, "-q"]


def submit(env: dict[str, str], *args: str) -> int:
    return int(run_orch(env, "submit", *args, check=True).stdout)


def worker_pid(store, job_id: int) -> int:  # type: ignore[no-untyped-def]
    details = next(e.details for e in reversed(store.events(job_id)) if e.to_state == "running")
    return int(details["pid"])


def state_of(store, job_id: int) -> str:  # type: ignore[no-untyped-def]
    return store.get_job(job_id).state


def losses(store, job_id: int, attempt: int | None = None) -> dict[int, float]:  # type: ignore[no-untyped-def]
    return {m.step: m.value for m in store.metrics(job_id, name="train_loss")
            if attempt is None or m.attempt == attempt}


def test_killed_worker_is_retried_and_resumes_exactly(orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    reference = submit(orch_env, CLM, *RESUMABLE)
    victim = submit(orch_env, CLM, *RESUMABLE)
    # Kill the victim's worker process once its first checkpoint is registered.
    wait_until(lambda: state_of(orch_store, victim) == "running" and orch_store.checkpoints(victim),
               240, "the first checkpoint")
    killed_at = max(losses(orch_store, victim), default=0)
    os.kill(worker_pid(orch_store, victim), signal.SIGKILL)

    for job in (reference, victim):
        wait_until(lambda job=job: state_of(orch_store, job) in ("succeeded", "failed"), 300,
                   f"job {job} to finish")
        assert state_of(orch_store, job) == "succeeded", orch_store.get_job(job).error

    attempts = orch_store.attempts(victim)
    assert [a.outcome for a in attempts] == ["retried", "succeeded"]
    assert attempts[0].cause.startswith("worker process died")
    resumed = next(e for e in reversed(orch_store.events(victim)) if e.to_state == "running")
    resume_step = resumed.details["resume_step"]
    assert f"resuming from step {resume_step}" in resumed.reason
    assert 20 <= resume_step < STEPS, (resume_step, killed_at)

    # Same final step; every loss after the resume point equals the uninterrupted run's.
    ref, after = losses(orch_store, reference), losses(orch_store, victim, attempt=2)
    assert max(ref) == max(after) == STEPS
    assert min(after) == resume_step + 1
    # The killed attempt's losses after the resume point are kept, but superseded.
    killed = [m for m in orch_store.metrics(victim, name="train_loss", include_superseded=True)
              if m.attempt == 1]
    assert [m.step for m in killed if not m.superseded] == list(range(1, resume_step + 1))
    assert all(m.step > resume_step for m in killed if m.superseded)
    assert assert_each_live_loss_once(orch_store, victim) == list(range(1, STEPS + 1))
    worst = max(abs(ref[s] - after[s]) for s in after)
    print(f"resume equivalence: resumed at step {resume_step}, max |loss diff| {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_cancelled_job_resumes_as_a_new_job(storage: str, orch_env, orch_store, s3_env,  # type: ignore[no-untyped-def]
                                            monkeypatch) -> None:
    """`orch resume` of a cancelled job, with checkpoints on this node or in a bucket (the
    control plane finds the latest checkpoint there; the new job's worker fetches it)."""
    extra: list[str] = []
    if storage == "s3":
        for key, value in s3_env.items():  # this process reads the bucket too
            monkeypatch.setenv(key, value)
        extra = ["--set", f"checkpoints.storage={make_bucket(s3_env, 'orch-resume')}/runs"]
    old = submit(orch_env, CLM, *RESUMABLE, *extra)
    wait_until(lambda: orch_store.checkpoints(old), 240, "the first checkpoint")
    run_orch(orch_env, "cancel", str(old), check=True)
    step = max(c.step for c in orch_store.checkpoints(old))

    proc = run_orch(orch_env, "resume", str(old), "--wait", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = int(proc.stdout.split()[2])
    job = orch_store.get_job(new)
    assert job.state == "succeeded" and job.parent_job_id == old
    assert job.resume_from.endswith(f"checkpoint-{step}")
    if storage == "s3":
        from workers.storage import is_complete_checkpoint

        assert job.resume_from == f"s3://orch-resume/runs/{old}/checkpoints/checkpoint-{step}"
        final = next(c for c in orch_store.checkpoints(new) if c.kind == "final")
        assert final.path == f"s3://orch-resume/runs/{new}/final"
        assert is_complete_checkpoint(orch_store.checkpoints(new)[0].path)
    assert orch_store.get_job(old).state == "cancelled"  # terminal states never change
    assert min(losses(orch_store, new)) == step + 1 and max(losses(orch_store, new)) == STEPS
    again = run_orch(orch_env, "resume", str(new))
    assert again.returncode == 1 and "only failed or cancelled jobs can be resumed" in again.stderr


def test_control_plane_killed_and_restarted(orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    """The server is SIGKILLed while a job trains and another waits, and `orch up` brings it
    back at once. Jobs keep running (they are Ray Jobs); their workers keep their reports
    and retry, so no metric is lost or counted twice; nothing runs twice. (A 20 s outage,
    on a team server, is tests/acceptance/test_team.py's real-Ray test.)"""
    steps = 120
    # One GPU, one worker actor (starts fast); the second job needs every CPU, so it stays
    # queued behind the first across the outage (and is one worker actor too, not a group).
    long = submit(orch_env, CLM, "--set", f"training.max_steps={steps}", "--set",
                  "training.logging_steps=1", "--set", "resources.gpus=1", "-q")
    waiting = submit(orch_env, CLM, "--set", "training.max_steps=10", "--set",
                     f"resources.cpus={FAKE_CPUS}", "-q")
    wait_until(lambda: state_of(orch_store, long) == "running"
               and losses(orch_store, long), 180, "the first losses")
    before = json.loads(run_orch(orch_env, "list", "-o", "json", check=True).stdout)

    pid = int(Path(orch_env["ORCH_HOME"], "server.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid) or
               psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, "the server to die")
    killed_at = max(losses(orch_store, long))
    started = time.monotonic()
    # `orch list` only reads: it never starts a server. `orch up` brings it back.
    assert "no orch server is running" in run_orch(orch_env, "list").stderr
    run_orch(orch_env, "up", timeout=240, check=True)
    after = json.loads(run_orch(orch_env, "list", "-o", "json", check=True).stdout)
    print(f"control plane back and answering in {time.monotonic() - started:.1f}s"
          f" (the job was at step {killed_at})")
    assert [j["id"] for j in after] == [j["id"] for j in before]

    for job in (long, waiting):
        wait_until(lambda job=job: state_of(orch_store, job) in ("succeeded", "failed"), 300,
                   f"job {job} to finish")
        assert state_of(orch_store, job) == "succeeded", orch_store.get_job(job).error
        # Found again, never run twice: one attempt each, one Ray job each.
        assert [a.outcome for a in orch_store.attempts(job)] == ["succeeded"]
        states = [e.to_state for e in orch_store.events(job)]
        assert states == ["queued", "pending", "running", "succeeded"], states
    # Every step's loss arrived once, including those reported during the outage.
    assert assert_each_live_loss_once(orch_store, long) == list(range(1, steps + 1))
    assert killed_at < steps, "the job finished before the outage: make it longer"


def test_ray_cluster_lost_and_back(orch_env, orch_store) -> None:  # type: ignore[no-untyped-def]
    job = submit(orch_env, CLM, "--set", "training.max_steps=200", "--set",
                 "training.save_steps=20", "--set", "training.eval_steps=20", "--set",
                 "retries=1", *SMALL, "-q")
    wait_until(lambda: state_of(orch_store, job) == "running" and orch_store.checkpoints(job),
               240, "the first checkpoint")

    # Kill every process of the session's Ray cluster (and only that cluster's).
    port = orch_env["ORCH_RAY_PORT"]
    doomed = [p for p in psutil.process_iter(["cmdline"])
              if any(f":{port}" in a or f"={port}" in a for a in (p.info["cmdline"] or []))]
    assert doomed
    lost_at = time.monotonic()
    for proc in doomed:
        proc.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(worker_pid(orch_store, job), signal.SIGKILL)

    grace = float(orch_env["ORCH_CLUSTER_LOSS_GRACE"])
    wait_until(lambda: state_of(orch_store, job) != "running", grace + 30, "the job to leave running")
    left_after = time.monotonic() - lost_at
    print(f"Ray cluster lost: job left running after {left_after:.1f}s (grace {grace:.0f}s)")
    assert state_of(orch_store, job) == "queued"

    # The job's logs are still there without Ray: the control plane keeps them.
    logs = run_orch(orch_env, "logs", str(job), check=True).stdout
    assert f"orch job {job} attempt 1" in logs

    # The cluster comes back: the job is admitted again and resumes from its checkpoint.
    run_orch(orch_env, "up", "--num-gpus", str(FAKE_GPUS), "--num-cpus", str(FAKE_CPUS),
             timeout=240, check=True)
    wait_until(lambda: state_of(orch_store, job) in ("succeeded", "failed"), 400, "the retry")
    assert state_of(orch_store, job) == "succeeded", orch_store.get_job(job).error
    assert [a.outcome for a in orch_store.attempts(job)] == ["retried", "succeeded"]
    resumed = next(e for e in reversed(orch_store.events(job)) if e.to_state == "running")
    assert "resuming from step" in resumed.reason and resumed.details["resume_step"] > 0
