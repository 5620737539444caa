"""Streams a training run to the control plane: metrics (batched) and checkpoints.

A Trainer callback, so the training core stays free of bookkeeping. It only queues reports
on the attempt's `Outbox` (workers.control_plane), which sends them from a background thread:
a training step never waits for the network. Metrics are buffered here and handed over in
one batch per flush (every few seconds, at each evaluation and save, and at the end).

A checkpoint's metrics are those of the evaluation at its own step; a checkpoint saved at a
step without an evaluation carries none and is not ranked for best (its metrics would be
an older model's).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from orchestrator.api import WorkerCheckpoint
from workers import storage
from workers.control_plane import Outbox

# HF log keys renamed so the store's names say what they are.
METRIC_RENAMES = {"loss": "train_loss", "train_loss": "train_loss_avg"}


def finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


class AttemptReporter(TrainerCallback):
    def __init__(self, outbox: Outbox, *, upload_to: str | None = None,
                 flush_seconds: float = 2.0, max_buffer: int = 200) -> None:
        self.outbox = outbox
        # The job's fsspec URL when checkpoints are uploaded to an object store (see
        # workers.storage); they are registered under it instead of the local directory.
        self.upload_to = upload_to
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._buffer: list[tuple[int, str, float]] = []
        self._last_flush = time.monotonic()
        self._eval_by_step: dict[int, dict[str, float]] = {}
        self.last_step = 0

    # -- metrics ---------------------------------------------------------------------------
    def record(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if finite_number(value):
                self._buffer.append((step, METRIC_RENAMES.get(key, key), float(value)))
        if (len(self._buffer) >= self.max_buffer
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            rows, self._buffer = self._buffer, []
            self.outbox.put_metrics(rows)
        self._last_flush = time.monotonic()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        # global_step is the step this run starts from (the checkpoint's when resuming).
        self.record(state.global_step, {"total_steps": state.max_steps})
        self.flush()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        evals = {k: float(v) for k, v in logs.items()
                 if k.startswith("eval_") and finite_number(v)}
        if evals:
            self._eval_by_step.setdefault(state.global_step, {}).update(evals)
        self.record(state.global_step, logs)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        self.flush()

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        if self.outbox.over:
            # The control plane ended this attempt (cancelled, say): stop at once rather
            # than train on for nobody.
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.last_step = state.global_step
        self.flush()

    # -- checkpoints -----------------------------------------------------------------------
    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        # The Trainer calls on_save after the checkpoint is completely written (and, with
        # an object store, uploaded by every rank).
        name = f"checkpoint-{state.global_step}"
        location = (storage.join(self.upload_to, storage.CHECKPOINTS_DIR, name) if self.upload_to
                    else str(Path(str(args.output_dir)) / name))
        if not storage.is_complete_checkpoint(location):
            return
        self.flush()
        self.outbox.put_checkpoint(WorkerCheckpoint(
            step=state.global_step, path=location, size_bytes=storage.size_bytes(location),
            metrics=self._eval_by_step.get(state.global_step, {})))

    def final_model(self, step: int, location: str, metrics: dict[str, float]) -> WorkerCheckpoint:
        """The final model's report (sent with the attempt's end)."""
        self.flush()
        return WorkerCheckpoint(step=step, path=location, size_bytes=storage.size_bytes(location),
                                metrics={k: v for k, v in metrics.items() if finite_number(v)})
