"""Checkpoint storage: a directory or an fsspec URL (a local S3-compatible object store).

The helpers on both kinds of location, then the training core against s3://: checkpoints
staged and uploaded, registered under their URLs, retention deleting from the bucket, the
final model loadable, and a run resuming from a checkpoint fetched from the bucket.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import TrainerCallback  # noqa: E402

from orchestrator.spec import SpecError, load_spec  # noqa: E402
from tests.support import (
    attempt_session,  # noqa: E402
    make_bucket,  # noqa: E402
)
from workers import (
    attempt,  # noqa: E402
    storage,  # noqa: E402
)
from workers.storage import RESUME_DIR, STAGING_DIR  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SMALL = ["training.max_steps=6", "training.epochs=null", "training.save_steps=2",
         "training.eval_steps=2", "training.batch_size=4", "dataset.max_train_samples=64",
         "dataset.max_eval_samples=8", "training.logging_steps=1"]


@pytest.fixture
def bucket(s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket in the session's object store; this process's AWS_* point at it."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    yield make_bucket(s3_env, f"orch-{uuid.uuid4().hex[:12]}")


def fake_checkpoint(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"w" * 100)
    (root / "sub" / "extra.bin").write_bytes(b"e" * 10)
    return root


@pytest.mark.parametrize("kind", ["url", "path"])
def test_checkpoint_helpers_on_a_url_and_a_path(kind: str, bucket: str, tmp_path: Path) -> None:
    base = f"{bucket}/runs" if kind == "url" else str(tmp_path / "store")
    where = storage.join(base, "checkpoints", "checkpoint-2")
    local = fake_checkpoint(tmp_path / "staged")
    if kind == "url":
        assert storage.upload(local, where) == 2
    else:
        os.makedirs(Path(where).parent)
        os.replace(local, where)
    assert storage.size_bytes(where) == 110
    assert not storage.is_complete_checkpoint(where)  # trainer_state.json is written last
    state = tmp_path / "state"
    state.mkdir()
    (state / "trainer_state.json").write_text("{}")
    if kind == "url":
        storage.upload(state, where)  # a second upload into the same prefix adds files
    else:
        os.replace(state / "trainer_state.json", Path(where) / "trainer_state.json")
    assert storage.is_complete_checkpoint(where)

    fetched = storage.download(where, tmp_path / "fetched") if kind == "url" else Path(where)
    assert (fetched / "sub" / "extra.bin").read_bytes() == b"e" * 10
    storage.remove(where)
    assert not storage.is_complete_checkpoint(where) and storage.size_bytes(where) == 0
    storage.remove(where)  # nothing there: fine


def test_job_artifacts_put_a_url_job_under_its_id(tmp_path: Path) -> None:
    url = storage.job_artifacts("s3://b/team", 7, tmp_path)
    assert url.url == "s3://b/team/7" and url.local_dir == tmp_path
    assert url.checkpoint(40) == "s3://b/team/7/checkpoints/checkpoint-40"
    assert url.final == "s3://b/team/7/final"
    path = storage.job_artifacts(str(tmp_path), 7, tmp_path / "7")
    assert path.url is None and path.final == str(tmp_path / "7" / "final")


def test_reachability_names_what_is_missing(bucket: str) -> None:
    assert storage.check_reachable(f"{bucket}/some/prefix") is None
    assert "does not exist" in (storage.check_reachable("s3://no-such-bucket-here/x") or "")
    # A filesystem whose package is not installed (gcsfs is not a dependency).
    assert "not installed" in (storage.check_reachable("gs://bucket/x") or "")


def test_spec_accepts_object_store_urls_and_refuses_the_rest(tmp_path: Path) -> None:
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", ["checkpoints.storage=s3://bucket/team/"])
    assert spec.checkpoints.storage == "s3://bucket/team"
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", [f"checkpoints.storage=file://{tmp_path}"])
    assert spec.checkpoints.storage == str(tmp_path)  # a plain path: renamed into place
    for bad, words in (("memory://x/y", "inside one process"), ("nope://b/x", "unknown URL scheme"),
                       ("s3://", "names no bucket")):
        with pytest.raises(SpecError) as err:
            load_spec(JOBS / "gpt2_clm.yaml", [f"checkpoints.storage={bad}"])
        assert "checkpoints.storage" in str(err.value) and words in str(err.value), str(err.value)


def test_training_uploads_checkpoints_and_resumes_from_the_bucket(bucket: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", [*SMALL, "checkpoints.keep_last=1",
                                                  f"checkpoints.storage={bucket}/team"])
    with attempt_session(tmp_path, spec) as session:
        store, job_id = session.store, session.job_id
        job = store.require_job(job_id)
        artifacts = storage.job_artifacts(f"{bucket}/team", job_id, job.artifact_dir)
        # What an attempt that died mid-upload left under checkpoint-4: cleared before the
        # upload.
        storage.upload(fake_checkpoint(tmp_path / "junk"), artifacts.checkpoint(4))

        client = session.client()
        decision = attempt.begin(client, where="here", details={})
        attempt.train(decision, client)

        ckpts = store.checkpoints(job_id, include_deleted=True)
        assert [(c.step, c.kind, c.path) for c in ckpts] == [
            (2, "checkpoint", artifacts.checkpoint(2)), (4, "checkpoint", artifacts.checkpoint(4)),
            (6, "checkpoint", artifacts.checkpoint(6)), (6, "final", artifacts.final)]
        live = [c for c in ckpts if not c.deleted]
        for ckpt in ckpts:  # retention deletes from the bucket what it marks deleted
            assert storage.is_complete_checkpoint(ckpt.path) == (
                ckpt in live and ckpt.kind == "checkpoint")
            assert ckpt.size_bytes > 0
        assert "extra.bin" not in str(storage.list_files(artifacts.checkpoint(4)))
        # The node's disk was only a staging area.
        local = Path(job.artifact_dir)
        assert not any((local / "checkpoints" / STAGING_DIR).rglob("*"))
        assert not (local / "checkpoints" / "checkpoint-6").exists()
        assert not (local / "final").exists()
        final = storage.download(artifacts.final, tmp_path / "final")
        assert AutoModelForCausalLM.from_pretrained(final).config.model_type == "gpt2"

        # `orch resume` of it: a new job whose worker fetches the newest live checkpoint
        # from the bucket and trains steps 7-8 only.
        more, _ = load_spec(JOBS / "gpt2_clm.yaml", [*SMALL, "training.max_steps=8",
                                                      f"checkpoints.storage={bucket}/team"])
        seen: list[int] = []

        class Steps(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                seen.append(state.global_step)

        new_id = session.submit(more, parent_job_id=job_id, resume_from=artifacts.checkpoint(6))
        client = session.client(new_id)
        decision = attempt.begin(client, where="here", details={})
        assert decision.resume_from == artifacts.checkpoint(6)
        attempt.train(decision, client, callbacks=[Steps()])
        assert seen == [7, 8]
        new = store.require_job(new_id)
        new_artifacts = storage.job_artifacts(f"{bucket}/team", new_id, new.artifact_dir)
        assert storage.is_complete_checkpoint(new_artifacts.checkpoint(8))
        assert not (Path(new.artifact_dir) / RESUME_DIR).exists()  # the fetched copy is gone


def test_preflight_refuses_a_bucket_that_is_not_there(bucket: str) -> None:
    from orchestrator.preflight import check_storage

    good, _ = load_spec(JOBS / "gpt2_clm.yaml", [f"checkpoints.storage={bucket}/team"])
    assert check_storage(good) == []
    bad, _ = load_spec(JOBS / "gpt2_clm.yaml", ["checkpoints.storage=s3://not-a-bucket-of-ours/team"])
    [problem] = check_storage(bad)
    assert problem.startswith("checkpoints.storage: s3://not-a-bucket-of-ours does not exist")


def test_a_link_at_or_under_a_job_directory_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "7"
    fake_checkpoint(job / "checkpoints" / "checkpoint-2")
    storage.refuse_links(job)  # no link: fine
    storage.refuse_links(tmp_path / "not-made-yet")  # nothing there yet: fine
    (job / "checkpoints" / "checkpoint-2" / "sub" / "x").symlink_to("/etc/passwd")
    with pytest.raises(storage.LinkRefused, match="sub/x is a symbolic link inside the job"):
        storage.refuse_links(job)
    (job / "checkpoints" / "checkpoint-2" / "sub" / "x").unlink()
    (job / "final").symlink_to(tmp_path, target_is_directory=True)  # a linked directory
    with pytest.raises(storage.LinkRefused, match="final is a symbolic link"):
        storage.refuse_links(job)
    linked = tmp_path / "8"
    linked.symlink_to(job)
    with pytest.raises(storage.LinkRefused, match="the job directory .*/8 is a symbolic link"):
        storage.refuse_links(linked)


def test_the_trainer_checks_for_links_before_each_save(tmp_path: Path) -> None:
    from transformers import TrainerControl

    from workers.guards import NoLinks

    guard = NoLinks(tmp_path)
    (tmp_path / "checkpoints").symlink_to("/etc")
    guard.on_step_end(None, None, TrainerControl(should_save=False))  # type: ignore[arg-type]
    with pytest.raises(storage.LinkRefused):
        guard.on_step_end(None, None, TrainerControl(should_save=True))  # type: ignore[arg-type]
    with pytest.raises(storage.LinkRefused):  # before the final model is written
        guard.on_train_end(None, None, TrainerControl())  # type: ignore[arg-type]
