"""Streams a training run into the store: metrics (batched), checkpoints, retention.

A Trainer callback, so the training core stays free of bookkeeping. Metrics are
buffered and written in one INSERT per flush (every few seconds, at each evaluation and
save, and at the end), never one commit per step.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from orchestrator.models import Checkpoint
from orchestrator.spec import JobSpec
from orchestrator.store import Store
from workers import storage
from workers.storage import is_complete_checkpoint

# HF log keys renamed so the store's names say what they are.
_RENAMES = {"loss": "train_loss", "train_loss": "train_loss_avg"}
# Written again at the step a resumed run starts from: total_steps by every run, and the
# Trainer's end-of-run summary by a run resumed from its final checkpoint.
RESTATED_AT_START = ("total_steps", "train_runtime", "train_samples_per_second",
                     "train_steps_per_second", "total_flos", "train_loss_avg")


def latest_complete_checkpoint(store: Store, job_id: int) -> Checkpoint | None:
    """The newest registered checkpoint of a job whose files are still there (on disk, or
    at its URL)."""
    for ckpt in reversed(store.checkpoints(job_id)):  # newest step first
        if ckpt.kind == "checkpoint" and is_complete_checkpoint(ckpt.path):
            return ckpt
    return None


class StoreReporter(TrainerCallback):
    def __init__(self, store: Store, job_id: int, attempt: int, spec: JobSpec,
                 flush_seconds: float = 2.0, max_buffer: int = 200,
                 upload_to: str | None = None) -> None:
        self.store = store
        # The job's fsspec URL when checkpoints are uploaded to an object store (see
        # workers.storage); they are registered under it instead of the local directory.
        self.upload_to = upload_to
        self.job_id = job_id
        self.attempt = attempt
        self.keep_last = spec.checkpoints.keep_last
        self.best_metric = spec.checkpoints.best_metric
        self.best_mode = spec.checkpoints.best_mode
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._buffer: list[tuple[int, str, float]] = []
        self._last_flush = time.monotonic()
        self._eval_by_step: dict[int, dict[str, float]] = {}
        self.last_step = 0

    # -- metrics ---------------------------------------------------------------------------
    def record(self, step: int, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                continue
            self._buffer.append((step, _RENAMES.get(key, key), float(value)))
        if (len(self._buffer) >= self.max_buffer
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            rows, self._buffer = self._buffer, []
            self.store.add_metrics(self.job_id, self.attempt, rows)
        self._last_flush = time.monotonic()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        # global_step is the step this run starts from (the checkpoint's when resuming).
        # Every step after it will be written again, every step at all on a fresh start
        # (the step-0 evaluation included): mark what an earlier run left there (a dead
        # attempt, or this attempt's worker group before Ray Train restarted it) before
        # writing anything, so each step keeps one live row.
        start = state.global_step
        self.store.supersede_metrics(self.job_id, start if start > 0 else None,
                                     restated=RESTATED_AT_START)
        self.record(state.global_step, {"total_steps": state.max_steps})
        self.flush()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if any(k.startswith("eval_") for k in logs):
            # Non-finite values (a diverged run) cannot rank checkpoints or be stored as JSON.
            evals = {k: float(v) for k, v in logs.items()
                     if k.startswith("eval_") and isinstance(v, (int, float))
                     and not isinstance(v, bool) and math.isfinite(float(v))}
            self._eval_by_step.setdefault(state.global_step, {}).update(evals)
        self.record(state.global_step, logs)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        self.flush()

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.last_step = state.global_step
        self.flush()

    # -- checkpoints -----------------------------------------------------------------------
    def _metrics_at(self, step: int) -> dict[str, float]:
        # Only an evaluation of this very step describes the checkpoint: an earlier one
        # (e.g. the untrained step 0 when eval_steps is null) would rank it by another
        # model's numbers. Without one it has no metrics and is left out of the ranking.
        return dict(self._eval_by_step.get(step, {}))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        # The Trainer calls on_save after the checkpoint is completely written (and, with
        # an object store, uploaded by every rank).
        name = f"checkpoint-{state.global_step}"
        location = (storage.join(self.upload_to, storage.CHECKPOINTS_DIR, name) if self.upload_to
                    else str(Path(args.output_dir) / name))
        if not is_complete_checkpoint(location):
            return
        self.flush()
        self.store.add_checkpoint(
            self.job_id, attempt=self.attempt, step=state.global_step, path=location,
            size_bytes=storage.size_bytes(location), metrics=self._metrics_at(state.global_step),
        )
        self.apply_retention()

    def apply_retention(self) -> None:
        """Keep the last `keep_last` checkpoints plus the best one; delete the rest."""
        live = [c for c in self.store.checkpoints(self.job_id) if c.kind == "checkpoint"]
        ranked = [c for c in live if self.best_metric in c.metrics]
        sign = 1.0 if self.best_mode == "min" else -1.0
        # Best value wins; on a tie the later checkpoint.
        best = min(ranked, key=lambda c: (sign * c.metrics[self.best_metric], -c.step),
                   default=None)
        self.store.set_best_checkpoint(self.job_id, best.id if best else None)
        keep = {c.id for c in sorted(live, key=lambda c: c.step)[-self.keep_last:]}
        if best:
            keep.add(best.id)
        for ckpt in live:
            if ckpt.id not in keep:
                storage.remove(ckpt.path)
                self.store.mark_checkpoint_deleted(ckpt.id)

    def final_model(self, step: int, location: str, metrics: dict[str, float]) -> None:
        self.flush()
        self.store.add_checkpoint(
            self.job_id, attempt=self.attempt, step=step, path=location,
            size_bytes=storage.size_bytes(location), metrics=metrics, kind="final",
        )
