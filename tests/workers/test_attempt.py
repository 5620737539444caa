"""The attempt's first step on a worker: the sandbox rules and the job directory are checked
again before anything is opened, and a refusal fails the job for good (never retried)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec import build_spec
from orchestrator.states import JobState
from tests.support import REPO, attempt_session
from workers import attempt, guards

# Imported here, not first inside train(): the test server's warm-up thread imports
# transformers at the same time, and its lazy module is not safe to import from two threads.
assert guards.NoLinks

ASSETS = REPO / "jobs" / "assets"


def tiny_spec():  # type: ignore[no-untyped-def]
    return build_spec({
        "name": "w", "objective": "mlm", "model": str(ASSETS / "models" / "bert-tiny"),
        "dataset": {"train_files": [str(ASSETS / "data" / "lm" / "train.jsonl")],
                    "eval_fraction": 0.1},
        "training": {"max_steps": 2}, "retries": 3,
    })


def assert_failed_for_good(session, words: str) -> None:  # type: ignore[no-untyped-def]
    job = session.store.require_job(session.job_id)
    assert job.state == JobState.FAILED and words in (job.error or ""), job.error
    session.admit_again()  # a retry would be admitted here: there is none
    assert session.store.require_job(session.job_id).state == JobState.FAILED
    assert len(session.fake.launches) == 1 and job.attempts == 1


def test_a_spec_outside_the_workers_rules_fails_the_job_without_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server let it in (an older, looser rule); this cluster allows only tmp_path now.
    monkeypatch.setenv("ORCH_DATA_ROOTS", str(tmp_path))
    with attempt_session(tmp_path, tiny_spec()) as session:
        decision = attempt.begin(session.client(), where="on the test", details={})
        assert not decision.go and decision.why_not == "outside the sandbox"
        assert_failed_for_good(session, "the job's spec reaches outside what this cluster "
                                        "allows: model: ")
        error = session.store.require_job(session.job_id).error or ""
        assert "dataset.train_files: " in error and f"ORCH_DATA_ROOTS: {tmp_path}" in error


def test_a_link_planted_in_the_job_directory_fails_the_job_without_retry(
        tmp_path: Path) -> None:
    with attempt_session(tmp_path, tiny_spec()) as session:
        job_dir = Path(session.store.require_job(session.job_id).artifact_dir)
        (job_dir / "checkpoints").mkdir(parents=True)
        (job_dir / "checkpoints" / "checkpoint-2").symlink_to(tmp_path)
        decision = attempt.begin(session.client(), where="on the test", details={})
        assert not decision.go
        assert_failed_for_good(session, "checkpoint-2 is a symbolic link inside the job "
                                        "directory")


def test_every_process_checks_again_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other ranks of a group never run `begin`: `train` checks on each of them. Here
    the rules tighten between the decision and the training."""
    with attempt_session(tmp_path, tiny_spec()) as session:
        client = session.client()
        decision = attempt.begin(client, where="on the test", details={})
        assert decision.go
        monkeypatch.setenv("ORCH_DATA_ROOTS", str(tmp_path))
        with pytest.raises(SpecError, match="outside the directories"):
            attempt.train(decision, client)
        job = session.store.require_job(session.job_id)
        assert job.state == JobState.FAILED and "ORCH_DATA_ROOTS" in (job.error or "")
        assert not (Path(job.artifact_dir) / "final").exists()
