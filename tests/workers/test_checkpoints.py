"""Atomic checkpoints and resume, in-process.

A kill in the middle of a checkpoint write is simulated by making the Trainer fail while
it writes the RNG state (after the weights and optimizer, before trainer_state.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer  # noqa: E402

from orchestrator.api import WorkerCheckpointRef, WorkerJob  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.states import JobState  # noqa: E402
from workers.attempt import resume_point  # noqa: E402
from workers.storage import is_complete_checkpoint  # noqa: E402
from workers.training import STAGING_DIR, run_training  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SMALL = ["training.max_steps=6", "training.epochs=null", "training.save_steps=2",
         "training.eval_steps=2", "training.batch_size=4", "dataset.max_train_samples=64",
         "dataset.max_eval_samples=8", "training.logging_steps=1"]


class Killed(RuntimeError):
    pass


def test_a_checkpoint_killed_mid_write_never_appears_complete(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", SMALL)
    original = Trainer._save_rng_state

    def dies_at_step_4(self: Trainer, output_dir: str) -> None:
        if self.state.global_step == 4:
            raise Killed("killed while writing checkpoint-4")
        original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(Killed):
        run_training(spec, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert is_complete_checkpoint(ckpts / "checkpoint-2")
    assert not (ckpts / "checkpoint-4").exists()  # only ever renamed into place once complete
    assert (ckpts / STAGING_DIR / "checkpoint-4" / "model.safetensors").exists()

    # The next attempt resumes from the last complete checkpoint and cleans the staging dir.
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    metrics = run_training(spec, tmp_path, resume_from_checkpoint=str(ckpts / "checkpoint-2"))
    assert "eval_loss" in metrics
    assert all(is_complete_checkpoint(ckpts / f"checkpoint-{s}") for s in (2, 4, 6))
    assert not (ckpts / STAGING_DIR).exists() or not any((ckpts / STAGING_DIR).iterdir())


def test_resume_point_skips_checkpoints_that_are_not_complete(tmp_path: Path) -> None:
    complete, broken = tmp_path / "checkpoint-10", tmp_path / "checkpoint-20"
    for path in (complete, broken):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
    (complete / "trainer_state.json").write_text("{}")  # the broken one lacks it

    def job(checkpoints: list[tuple[int, Path]], resume_from: str | None = None) -> WorkerJob:
        return WorkerJob(job_id=1, attempt=1, state=JobState.PENDING, spec={}, artifact_dir="/",
                         checkpoints=[WorkerCheckpointRef(step=s, path=str(p))
                                      for s, p in checkpoints],
                         resume_from=resume_from, parent_job_id=7 if resume_from else None)

    path, step, words = resume_point(job([(20, broken), (10, complete)]))  # newest first
    assert (path, step) == (str(complete), 10) and words.startswith("resuming from step 10")
    # Nothing usable: start over, unless the job continues another job's checkpoint.
    assert resume_point(job([(20, broken)])) == (None, 0, "from the start")
    assert resume_point(job([], resume_from=str(complete)))[:2] == (str(complete), 10)
