"""TensorBoard and MLflow on a real tiny run through the attempt's worker side (an in-process
control plane): what they hold is what the store holds, through a worker-group restart."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from orchestrator.spec import MlflowSpec, load_spec  # noqa: E402
from tests.support import Killed, attempt_session, dies_after_logging  # noqa: E402
from workers import attempt, tracking  # noqa: E402

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SMALL = ["training.max_steps=6", "training.save_steps=2", "training.eval_steps=2",
         "training.batch_size=4", "training.max_length=32", "training.warmup_steps=0",
         "training.logging_steps=1", "dataset.max_train_samples=48",
         "dataset.max_eval_samples=8"]


def tensorboard_scalars(directory: Path) -> dict[tuple[str, int], list[float]]:
    """Every scalar in the event files, read back with the reader TensorBoard's server
    loads them with (which applies the purges a restarted run wrote)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import (
        TENSORS,
        EventAccumulator,
    )
    from tensorboard.util import tensor_util

    reader = EventAccumulator(str(directory), size_guidance={TENSORS: 0})
    reader.Reload()
    found: dict[tuple[str, int], list[float]] = {}
    for tag in reader.Tags()["tensors"]:
        for event in reader.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            assert value.dtype.name == "float64"  # no float32 rounding: the store's values
            found.setdefault((tag, event.step), []).append(float(value))
    return found


def mlflow_history(client: Any, run_id: str) -> dict[tuple[str, int], list[float]]:
    found: dict[tuple[str, int], list[float]] = {}
    for key in client.get_run(run_id).data.metrics:
        history = sorted(client.get_metric_history(run_id, key),
                         key=lambda m: (m.step, m.timestamp))
        for metric in history:
            found.setdefault((key, metric.step), []).append(metric.value)
    return found


def test_tensorboard_and_mlflow_hold_the_stores_values(tmp_path: Path) -> None:
    """A run dies after step 5, its worker group restarts from checkpoint-4 in the same
    attempt: TensorBoard shows one value per step, the store's live one; MLflow continues
    the same run, whose latest value of each step is the store's live one."""
    mlruns = tmp_path / "mlruns"
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", [
        *SMALL, "tracking.tensorboard=true", f"tracking.mlflow.tracking_uri={mlruns}",
        "tracking.mlflow.experiment=tiny"])
    with attempt_session(tmp_path, spec) as session:
        client = session.client()
        first = attempt.begin(client, where="here", details={})
        with pytest.raises(Killed):
            attempt.train(first, client, callbacks=[dies_after_logging(5)], flush_seconds=0)
        again = attempt.begin(client, where="here", details={})
        assert again.resume_from and again.resume_from.endswith("checkpoint-4")
        attempt.train(again, client)
        store, job_id = session.store, session.job_id
        job_dir = Path(store.require_job(job_id).artifact_dir)
        # The store's live values (a run logs "epoch" several times at a step: the first
        # one of each run is kept, as the reporter's rows are).
        live = {(m.name, m.step): m.value for m in store.metrics(job_id)}
        rewritten = {(m.name, m.step) for m in store.metrics(job_id, include_superseded=True)
                     if m.superseded}
    assert ("train_loss", 5) in rewritten

    board = tensorboard_scalars(job_dir / tracking.TENSORBOARD_DIR)
    assert set(board) == set(live)
    assert {key: values[0] for key, values in board.items()} == live
    # The restarted run's purge dropped the dead run's step 5: one value there, the live one.
    assert len(board[("train_loss", 5)]) == 1

    from mlflow import MlflowClient

    ml = MlflowClient(f"sqlite:///{mlruns / tracking.MLFLOW_DB}")
    experiment = ml.get_experiment_by_name("tiny")
    runs = ml.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # one run per job, continued by the restart
    run = runs[0]
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["orch.job_id"] == str(job_id) and tags["orch.attempt"] == "1"
    assert tags["orch.attempt.1"] == "started at step 4 on " + os.uname().nodename
    assert tags["orch.attempt.1.restarts"] == "1"
    history = mlflow_history(ml, run.info.run_id)
    assert set(history) == set(live)
    # The first value of each step of each run: the dead run's and the restarted run's.
    firsts = {key: values[0] for key, values in history.items() if key not in rewritten}
    assert firsts == {key: v for key, v in live.items() if key not in rewritten}
    assert all(history[key][-1] == live[key] for key in rewritten if key[0] != "epoch")
    params = run.data.params
    assert params["training.learning_rate"] == str(spec.training.learning_rate)
    assert params["dataset.train_files"].startswith('["/')
    assert params["tracking.mlflow.experiment"] == "tiny"
    artifacts = {a.path for a in ml.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors"} <= artifacts
    assert Path(experiment.artifact_location).parent == mlruns


def test_an_mlflow_store_that_cannot_open_fails_in_one_line(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", ["tracking.mlflow=true"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    logger = tracking.MlflowLogger(spec, MlflowSpec(tracking_uri=f"sqlite:///{blocker}/x.db"),
                                   job_id=1, attempt=1, job_dir=tmp_path, default_uri=None)
    with pytest.raises((ValueError, OSError)) as raised:
        logger.start(0)
    assert "\n" not in str(raised.value)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not installed
    with pytest.raises(ValueError, match=r"pip install 'orch\[tracking\]'"):
        tracking.MlflowLogger(spec, MlflowSpec(), job_id=1, attempt=1, job_dir=tmp_path,
                              default_uri=None).start(0)


def test_mlflow_trouble_mid_run_stops_logging_not_training(caplog: pytest.LogCaptureFixture,
                                                           tmp_path: Path) -> None:
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", ["tracking.mlflow=true"])
    logger = tracking.MlflowLogger(spec, MlflowSpec(), job_id=1, attempt=1, job_dir=tmp_path,
                                   default_uri=None)

    class Down:
        calls = 0

        def log_batch(self, *args: Any, **kwargs: Any) -> None:
            Down.calls += 1
            raise ConnectionError("tracking server unreachable")

    logger.client, logger.run_id = Down(), "run"
    logger._log(1, {"loss": 1.0})
    logger._log(2, {"loss": 0.5})
    assert logger.broken and Down.calls == 1
    assert "MLflow logging stopped" in caplog.text


def test_the_default_store_is_the_jobs_own_directory(tmp_path: Path) -> None:
    uri, artifacts = tracking.mlflow_location(None, None, tmp_path)
    assert uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert artifacts == str(tmp_path / "mlflow" / "artifacts")
    assert tracking.mlflow_location(None, "http://mlflow:5000", tmp_path) == (
        "http://mlflow:5000", None)
    assert tracking.mlflow_location(str(tmp_path / "runs"), None, tmp_path)[0] == (
        f"sqlite:///{tmp_path}/runs/mlflow.db")


@pytest.fixture
def spec_without_tracking() -> Iterator[Any]:
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml")
    yield spec


def test_no_tracking_section_and_other_ranks_add_nothing(spec_without_tracking: Any,
                                                         tmp_path: Path) -> None:
    none = tracking.Tracking.for_attempt(spec_without_tracking, job_id=1, attempt=1,
                                         job_dir=tmp_path, leader=True)
    assert none.callbacks == [] and none.mlflow is None
    spec, _ = load_spec(JOBS / "gpt2_clm.yaml", ["tracking.tensorboard=true",
                                                 "tracking.mlflow=true"])
    follower = tracking.Tracking.for_attempt(spec, job_id=1, attempt=1, job_dir=tmp_path,
                                             leader=False)
    assert follower.callbacks == []
    leader = tracking.Tracking.for_attempt(spec, job_id=1, attempt=1, job_dir=tmp_path,
                                           leader=True)
    assert [type(c).__name__ for c in leader.callbacks] == ["TensorBoardLogger", "MlflowLogger"]
