"""Experiment tracking beside orch's store: TensorBoard event files and an MLflow run.

The spec's `tracking:` section turns them on. Both are Trainer callbacks on the attempt's
leader (rank 0: one voice, as for the store) that see exactly what the store's reporter
sees, under the same names (`train_loss`, `eval_loss`, `learning_rate`, ...), so every
value in TensorBoard and MLflow is a value the store holds for the same step:

  * `tensorboard: true` writes event files to `<job dir>/tensorboard` (scalars as float64
    tensors: bit for bit the store's values). A run resuming from step S starts its events
    with a purge of the steps after S, so TensorBoard drops what the store marks superseded.
  * `mlflow:` logs to one MLflow run per job. The run is found again by its tags
    (`orch.job_id`, and `orch.run_key`, a hash of the job id and its directory, unique per
    orch installation), so a retried attempt and a restarted worker group continue the same
    run; `orch.attempt` names the latest attempt and `orch.attempt.<n>` says where each one
    started. The spec, flattened, is the run's params (logged once); at the end the final
    model is copied into the run's artifacts (`model/`, unless `log_model: false`) and the
    run is marked finished (or failed, when the job fails for an error of its own). After a
    resume, MLflow keeps both values of a rewritten step (it has no notion of superseded).

A tracking store that cannot be opened at the start fails the attempt (the spec asked for
it); one that fails later is logged as a warning and training goes on: orch's store stays
the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from orchestrator.spec import JobSpec, MlflowSpec
from workers import storage
from workers.reporting import METRIC_RENAMES, finite_number

log = logging.getLogger("orch.worker")

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"
MLFLOW_DB = "mlflow.db"
# MLflow's limits: characters of a param value, params and tags per request.
MAX_PARAM_VALUE = 6000
BATCH = 100


def store_values(values: dict[str, Any]) -> dict[str, float]:
    """What the store's reporter records from a log: finite numbers, under the store's names."""
    return {METRIC_RENAMES.get(k, k): float(v) for k, v in values.items() if finite_number(v)}


# ---------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardLogger(TrainerCallback):
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.writer: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        start = state.global_step
        # Every run writes a session start. TensorBoard takes the first as the session's and
        # each later one as a restart: a run resuming from step S rewrites the steps after
        # S, so the events of earlier runs from S + 1 on are dropped (from 0: a run that
        # starts over replaces everything), as the store supersedes them.
        # Flushed every 10 s (TensorBoard's default is 120): a live job's curves keep up.
        self.writer = SummaryWriter(str(self.directory), purge_step=start + 1 if start else 0,
                                    flush_secs=10)
        self._scalars(start, {"total_steps": state.max_steps})

    def _scalars(self, step: int, values: dict[str, Any]) -> None:
        for name, value in store_values(values).items():
            self.writer.add_scalar(name, value, step, new_style=True, double_precision=True)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.writer is not None:
            self._scalars(state.global_step, logs or {})

    def on_evaluate(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ---------------------------------------------------------------------------------------
# MLflow


def mlflow_location(spec_uri: str | None, default: str | None, job_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for an experiment orch creates). A directory (or
    none: the job's own) holds a SQLite store and its artifacts: MLflow's plain-file store
    is in maintenance mode and refuses to start by default."""
    uri = spec_uri or default
    if uri is None:
        directory = job_dir / MLFLOW_DIR
    elif uri.startswith("sqlite:"):
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        if not path:
            return uri, None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return uri, str(Path(path).parent / "artifacts")
    elif "://" in uri and not uri.startswith("file://"):
        return uri, None  # a tracking server keeps its own artifact store
    else:
        directory = Path(uri.split("://", 1)[1] if "://" in uri else uri)
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / MLFLOW_DB}", str(directory / "artifacts")


def flat_params(spec: JobSpec) -> dict[str, str]:
    """The spec as MLflow params: dotted keys, values as text (lists as JSON)."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        text = value if isinstance(value, str) else json.dumps(value)
        params[prefix] = text[:MAX_PARAM_VALUE]

    walk("", spec.to_dict())
    return params


class MlflowLogger(TrainerCallback):
    def __init__(self, spec: JobSpec, settings: MlflowSpec, *, job_id: int, attempt: int,
                 job_dir: Path, default_uri: str | None) -> None:
        self.spec = spec
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.job_dir = job_dir
        self.default_uri = default_uri
        self.client: Any = None
        self.run_id: str | None = None
        self.broken = False

    @property
    def run_key(self) -> str:
        return hashlib.sha256(f"{self.job_id}:{self.job_dir}".encode()).hexdigest()[:32]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        if self.run_id is None:
            self.start(state.global_step)
        self._log(state.global_step, {"total_steps": state.max_steps})

    def start(self, step: int) -> str:
        """Open (or find again) the job's run; returns its id. Raises a one-line error."""
        uri, artifacts = mlflow_location(self.settings.tracking_uri, self.default_uri,
                                         self.job_dir)
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ValueError("tracking.mlflow: the mlflow-skinny package is not installed "
                             "where the job runs; pip install 'orch[tracking]' there (or "
                             "remove tracking.mlflow)") from None
        try:
            self.client = MlflowClient(uri)
            self.run_id = self._run(artifacts, step)
        except Exception as exc:  # every store fails its own way: all mean "cannot log"
            raise ValueError(f"tracking.mlflow: cannot open the MLflow run at {uri}: "
                             f"{type(exc).__name__}: {str(exc)[:300]}") from None
        log.info("job %s: MLflow run %s at %s", self.job_id, self.run_id, uri)
        return self.run_id

    def _run(self, artifacts: str | None, step: int) -> str:
        from mlflow.entities import Param, RunTag

        name = self.settings.experiment or self.spec.name
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None else
                         self.client.create_experiment(name, artifact_location=artifacts))
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`orch.run_key` = '{self.run_key}'",
            max_results=1)
        started = f"started at step {step} on {socket.gethostname()}"
        if found:
            run = found[0]
            tags = run.data.tags
            key = f"orch.attempt.{self.attempt}"
            if key in tags:  # Ray Train restarted the worker group inside this attempt
                restarts = int(tags.get(f"{key}.restarts", "0")) + 1
                self.client.set_tag(run.info.run_id, f"{key}.restarts", str(restarts))
            run_id = str(run.info.run_id)
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = str(self.client.create_run(
                experiment_id, run_name=f"orch-{self.job_id}-{self.spec.name}",
                tags={"orch.job_id": str(self.job_id), "orch.run_key": self.run_key,
                      "orch.job_name": self.spec.name,
                      "orch.objective": self.spec.objective.value}).info.run_id)
            params = [Param(k, v) for k, v in flat_params(self.spec).items()]
            for i in range(0, len(params), BATCH):
                self.client.log_batch(run_id, params=params[i:i + BATCH])
        self.client.log_batch(run_id, tags=[
            RunTag("orch.attempt", str(self.attempt)),
            RunTag(f"orch.attempt.{self.attempt}", started)])
        return run_id

    def _log(self, step: int, values: dict[str, Any]) -> None:
        if self.broken or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in store_values(values).items()]
        if not metrics:
            return
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except Exception as exc:  # training goes on; the store has every value anyway
            self.broken = True
            log.warning("job %s: MLflow logging stopped (%s: %s); orch's store keeps every "
                        "metric", self.job_id, type(exc).__name__, exc)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._log(state.global_step, logs or {})

    def finish(self, final_location: str | None, status: str = "FINISHED") -> None:
        """End the run: the final model into its artifacts (unless log_model is off)."""
        if self.run_id is None or self.client is None:
            return
        try:
            if final_location and status == "FINISHED" and self.settings.log_model:
                self.client.set_tag(self.run_id, "orch.final_model", final_location)
                self._log_model(final_location)
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("job %s: could not finish the MLflow run %s (%s: %s)", self.job_id,
                        self.run_id, type(exc).__name__, exc)

    def _log_model(self, location: str) -> None:
        if not storage.is_url(location):
            self.client.log_artifacts(self.run_id, location, "model")
            return
        with tempfile.TemporaryDirectory(prefix="orch-mlflow-") as tmp:
            local = storage.download(location, Path(tmp) / "model")
            self.client.log_artifacts(self.run_id, str(local), "model")


# ---------------------------------------------------------------------------------------
# One attempt's tracking


class Tracking:
    """The tracking of one attempt: its Trainer callbacks, and the run's end."""

    def __init__(self, callbacks: list[TrainerCallback], mlflow: MlflowLogger | None) -> None:
        self.callbacks = callbacks
        self.mlflow = mlflow

    @classmethod
    def for_attempt(cls, spec: JobSpec, *, job_id: int, attempt: int, job_dir: Path,
                    leader: bool) -> Tracking:
        """Nothing for a spec without `tracking:` and on every rank but the leader."""
        wanted = spec.tracking
        if wanted is None or not leader:
            return cls([], None)
        callbacks: list[TrainerCallback] = []
        if wanted.tensorboard:
            callbacks.append(TensorBoardLogger(job_dir / TENSORBOARD_DIR))
        mlflow = None
        if wanted.mlflow is not None:
            from orchestrator.settings import get_settings

            mlflow = MlflowLogger(spec, wanted.mlflow, job_id=job_id, attempt=attempt,
                                  job_dir=job_dir,
                                  default_uri=get_settings().mlflow_tracking_uri)
            callbacks.append(mlflow)
        return cls(callbacks, mlflow)

    def finished(self, final_location: str) -> None:
        if self.mlflow is not None:
            self.mlflow.finish(final_location)

    def failed(self) -> None:
        if self.mlflow is not None:
            self.mlflow.finish(None, status="FAILED")
