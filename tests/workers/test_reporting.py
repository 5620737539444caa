"""The store reporter on real tiny runs: what a resumed run rewrites is counted once."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from orchestrator.spec import load_spec  # noqa: E402
from tests.support import Killed, attempt_session, dies_after_logging  # noqa: E402
from workers import attempt  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SMALL = ["training.max_steps=6", "training.epochs=null", "training.save_steps=2",
         "training.eval_steps=2", "training.batch_size=4", "training.max_length=32",
         "dataset.max_train_samples=64", "dataset.max_eval_samples=8", "training.logging_steps=1"]


def test_resumed_runs_leave_one_live_row_per_metric_and_step(tmp_path: Path) -> None:
    """The whole worker side in process, against a real control plane (its app and store):
    a run dies after step 5, and its worker group restarts inside the same attempt from
    checkpoint-4, which is indistinguishable by attempt from the dead group's rows."""
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", SMALL)
    with attempt_session(tmp_path, spec) as session:
        store, job_id = session.store, session.job_id
        # Attempt 0 (an earlier one) left rows: a fresh start supersedes every one of them.
        store.add_metrics(job_id, 0, [(0, "eval_loss", 9.0), (1, "train_loss", 9.0),
                                      (3, "train_loss", 9.0)])
        client = session.client()
        first = attempt.begin(client, where="on the test", details={})
        assert first.go and first.resume_from is None
        # flush_seconds=0: every value is sent at once, as it would be in a run long enough
        # for the timed flushes, so the dead run leaves rows past its last checkpoint.
        with pytest.raises(Killed):
            attempt.train(first, client, callbacks=[dies_after_logging(5)], flush_seconds=0)
        assert all(m.attempt == 1 for m in store.metrics(job_id))
        assert max(m.step for m in store.metrics(job_id, "train_loss")) == 5

        # Ray Train restarts the worker group inside the same attempt: it finds the job
        # running, records the restart and resumes from the newest complete checkpoint.
        again = attempt.begin(client, where="on the test", details={})
        assert again.go and again.resume_from and again.resume_from.endswith("checkpoint-4")
        attempt.train(again, client)
        assert store.require_job(job_id).state == "succeeded"

        live = store.metrics(job_id)
        # "epoch" is left out: the Trainer adds it to every log line, so a single run
        # would log it several times at a step (only the first is kept).
        repeated = {k: n for k, n in Counter((m.name, m.step) for m in live).items() if n > 1}
        assert not repeated, repeated
        assert [m.step for m in live if m.name == "train_loss"] == [1, 2, 3, 4, 5, 6]
        assert [m.step for m in live if m.name == "eval_loss"] == [0, 2, 4, 6]
        assert [m.step for m in live if m.name == "total_steps"] == [0, 4]  # each run's start

        old = [m for m in store.metrics(job_id, include_superseded=True) if m.superseded]
        assert {(m.attempt, m.step) for m in old if m.attempt == 0} == {(0, 0), (0, 1), (0, 3)}
        # Of the dead group's rows only those after the checkpoint, each one rewritten since.
        rolled_back = {(m.name, m.step) for m in old if m.attempt == 1}
        assert ("train_loss", 5) in rolled_back and {step for _, step in rolled_back} == {5}
        assert rolled_back <= {(m.name, m.step) for m in live}
        assert store.latest_metrics(job_id)["train_loss"][0] == 6
        restarts = [e for e in store.events(job_id) if "restarted the worker group" in e.reason]
        assert [e.details["resume_step"] for e in restarts] == [4]


def test_checkpoints_carry_only_an_evaluation_at_their_own_step(tmp_path: Path) -> None:
    """eval_steps: null, save_steps: 2: the checkpoints at steps 2 and 4 were never evaluated.
    They must not carry (and be ranked by) the untrained step-0 evaluation."""
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", [*SMALL, "training.eval_steps=null",
                                                 "checkpoints.keep_last=5"])
    with attempt_session(tmp_path, spec) as session:
        store, job_id = session.store, session.job_id
        client = session.client()
        attempt.train(attempt.begin(client, where="here", details={}), client)

        ckpts = {c.step: c for c in store.checkpoints(job_id) if c.kind == "checkpoint"}
        assert sorted(ckpts) == [2, 4, 6]
        assert ckpts[2].metrics == {} and ckpts[4].metrics == {}  # no evaluation at 2 or 4
        evals = {m.step: m.value for m in store.metrics(job_id, "eval_loss")}
        assert sorted(evals) == [0, 6]
        assert ckpts[6].metrics["eval_loss"] == pytest.approx(evals[6])
        # Only the evaluated checkpoint can be the best one.
        assert [c.step for c in store.checkpoints(job_id) if c.is_best] == [6]
