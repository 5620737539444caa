"""Atomic checkpoints and resume, in-process.

A kill in the middle of a checkpoint write is simulated by making the Trainer fail while
it writes the RNG state (after the weights and optimizer, before trainer_state.json).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer  # noqa: E402

from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.store import Store  # noqa: E402
from workers.driver import resume_point  # noqa: E402
from workers.reporting import is_complete_checkpoint  # noqa: E402
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
    store = Store(f"sqlite:///{tmp_path}/orch.db")
    job = store.create_job(name="r", objective="clm", owner="o", spec={}, spec_yaml="",
                           gpus=0, cpus=1, artifact_root=tmp_path)
    assert job.id is not None
    complete, broken = tmp_path / "checkpoint-10", tmp_path / "checkpoint-20"
    for path in (complete, broken):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
    (complete / "trainer_state.json").write_text("{}")  # the broken one lacks it
    for step, path in ((10, complete), (20, broken)):
        store.add_checkpoint(job.id, attempt=1, step=step, path=str(path), size_bytes=1, metrics={})
    path, words = resume_point(store, store.get_job(job.id))
    assert path == str(complete) and words.startswith("resuming from step 10")
    # Nothing usable: start over, unless the job continues another job's checkpoint.
    fresh = SimpleNamespace(id=999, resume_from=None, parent_job_id=None)
    assert resume_point(store, fresh) == (None, "from the start")
    child = SimpleNamespace(id=999, resume_from=str(complete), parent_job_id=job.id)
    assert resume_point(store, child)[0] == str(complete)
    store.close()
