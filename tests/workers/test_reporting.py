"""The store reporter on real tiny runs: what a resumed run rewrites is counted once."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.store import Store  # noqa: E402
from workers.reporting import StoreReporter, latest_complete_checkpoint  # noqa: E402
from workers.training import run_training  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SMALL = ["training.max_steps=6", "training.epochs=null", "training.save_steps=2",
         "training.eval_steps=2", "training.batch_size=4", "training.max_length=32",
         "dataset.max_train_samples=64", "dataset.max_eval_samples=8", "training.logging_steps=1"]


class Killed(RuntimeError):
    pass


class DiesAfterLogging(TrainerCallback):
    """Kills the run once the reporter (an earlier callback) has recorded `step`'s loss."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if state.global_step == self.step and "loss" in (logs or {}):
            raise Killed(f"killed after step {self.step}")


def test_resumed_runs_leave_one_live_row_per_metric_and_step(tmp_path: Path) -> None:
    spec, text = load_spec(JOBS / "gpt2_clm.yaml", SMALL)
    store = Store(f"sqlite:///{tmp_path}/orch.db")
    job = store.create_job(name=spec.name, objective="clm", owner="o", spec=spec.to_dict(),
                           spec_yaml=text, gpus=0, cpus=1, artifact_root=tmp_path)
    assert job.id is not None
    job_id, out = job.id, tmp_path / "run"
    # Attempt 1 died before its first checkpoint: attempt 2 starts over from step 0.
    store.add_metrics(job_id, 1, [(0, "eval_loss", 9.0), (1, "train_loss", 9.0),
                                  (3, "train_loss", 9.0)])

    # flush_seconds=0: every value reaches the store at once, as it would in a run long
    # enough for the timed flushes, so the dead run leaves rows past its last checkpoint.
    first = StoreReporter(store, job_id, 2, spec, flush_seconds=0)
    with pytest.raises(Killed):
        run_training(spec, out, callbacks=[first, DiesAfterLogging(5)])
    assert all(m.attempt == 2 for m in store.metrics(job_id))  # attempt 1 superseded at start
    assert max(m.step for m in store.metrics(job_id, "train_loss")) == 5

    # Ray Train restarts the worker group inside the same attempt, from checkpoint-4: the
    # dead group's step 5 would otherwise be indistinguishable from the new one's.
    resume = latest_complete_checkpoint(store, job_id)
    assert resume is not None and resume.step == 4
    second = StoreReporter(store, job_id, 2, spec)
    run_training(spec, out, callbacks=[second], resume_from_checkpoint=resume.path)

    live = store.metrics(job_id)
    # "epoch" is left out: the Trainer adds it to every log line, so a single run already
    # records it once per line at a step (loss, evaluation, end-of-training summary).
    repeated = {k: n for k, n in Counter((m.name, m.step) for m in live if m.name != "epoch").items()
                if n > 1}
    assert not repeated, repeated
    assert [m.step for m in live if m.name == "train_loss"] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in live if m.name == "eval_loss"] == [0, 2, 4, 6]
    assert [m.step for m in live if m.name == "total_steps"] == [0, 4]  # each run's start

    old = [m for m in store.metrics(job_id, include_superseded=True) if m.superseded]
    assert {(m.attempt, m.step) for m in old if m.attempt == 1} == {(1, 0), (1, 1), (1, 3)}
    # Of the dead group's rows only those after the checkpoint, each one rewritten since.
    rolled_back = {(m.name, m.step) for m in old if m.attempt == 2}
    assert ("train_loss", 5) in rolled_back and {step for _, step in rolled_back} == {5}
    assert rolled_back <= {(m.name, m.step) for m in live}
    assert store.latest_metrics(job_id)["train_loss"][0] == 6
    store.close()


def test_checkpoints_carry_only_an_evaluation_at_their_own_step(tmp_path: Path) -> None:
    """eval_steps: null, save_steps: 2: the checkpoints at steps 2 and 4 were never evaluated.
    They must not carry (and be ranked by) the untrained step-0 evaluation."""
    spec, text = load_spec(JOBS / "gpt2_clm.yaml", [*SMALL, "training.eval_steps=null",
                                                    "checkpoints.keep_last=5"])
    store = Store(f"sqlite:///{tmp_path}/orch.db")
    job = store.create_job(name=spec.name, objective="clm", owner="o", spec=spec.to_dict(),
                           spec_yaml=text, gpus=0, cpus=1, artifact_root=tmp_path)
    assert job.id is not None
    run_training(spec, tmp_path / "run", callbacks=[StoreReporter(store, job.id, 1, spec)])

    ckpts = {c.step: c for c in store.checkpoints(job.id) if c.kind == "checkpoint"}
    assert sorted(ckpts) == [2, 4, 6]
    assert ckpts[2].metrics == {} and ckpts[4].metrics == {}  # no evaluation at 2 or 4
    evals = {m.step: m.value for m in store.metrics(job.id, "eval_loss")}
    assert sorted(evals) == [0, 6]
    assert ckpts[6].metrics["eval_loss"] == pytest.approx(evals[6])
    # Only the evaluated checkpoint can be the best one.
    assert [c.step for c in store.checkpoints(job.id) if c.is_best] == [6]
    store.close()
