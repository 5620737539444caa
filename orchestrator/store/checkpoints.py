"""Checkpoints and final models: one row per location, the job's best and latest, and the
retention rule (keep the last N plus the best).

A checkpoint counts once its row exists: the worker registers it only after every file is
written (and, with an object store, uploaded). Retention is decided here, in the same
transaction as the registration; deleting the files is the worker's part (they are on its
node or in its bucket), after which it marks the rows deleted. A row whose files are gone
stays, as history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlmodel import col

from orchestrator.errors import InvalidRequest, NotFound
from orchestrator.models import Checkpoint, CheckpointKind, utcnow
from orchestrator.store.base import StoreBase, check_json


def pick_best(candidates: Sequence[Checkpoint], metric: str,
              mode: Literal["min", "max"]) -> Checkpoint | None:
    """The checkpoint with the best `metric` (ties: the later one). Checkpoints without a
    value for it (no evaluation at their step) are not ranked at all."""
    ranked = [c for c in candidates if metric in c.metrics]
    sign = 1.0 if mode == "min" else -1.0
    return min(ranked, key=lambda c: (sign * float(c.metrics[metric]), -c.step), default=None)


class CheckpointsStore(StoreBase):
    def add_checkpoint(
        self,
        job_id: int,
        *,
        attempt: int,
        step: int,
        path: str,
        size_bytes: int,
        metrics: dict[str, Any],
        kind: CheckpointKind = CheckpointKind.CHECKPOINT,
    ) -> Checkpoint:
        """Record a checkpoint (or final model) at `path`. A "checkpoint" becomes the job's
        latest (the resume point); a "final" model is not a resume point. Registering a
        path again updates its row (a retried report, or a later attempt writing that step
        again), so each location has one row."""
        try:
            kind = CheckpointKind(kind)
        except ValueError:
            raise InvalidRequest(f"checkpoint kind: one of {[k.value for k in CheckpointKind]}, "
                                 f"got {kind!r}") from None
        with self._writing() as session:
            return self._upsert(session, job_id, attempt, step, path, size_bytes, metrics, kind)

    def register_checkpoint(
        self,
        job_id: int,
        *,
        attempt: int,
        step: int,
        path: str,
        size_bytes: int,
        metrics: dict[str, Any],
        keep_last: int,
        best_metric: str,
        best_mode: Literal["min", "max"],
    ) -> tuple[Checkpoint, list[Checkpoint]]:
        """Record a resumable checkpoint and apply retention in one transaction: mark the
        best one and return the checkpoints whose files should go (neither among the last
        `keep_last` by step nor the best). The caller deletes their files, then calls
        `mark_checkpoints_deleted`."""
        if keep_last < 1:
            raise InvalidRequest(f"keep_last must be >= 1, got {keep_last}")
        with self._writing() as session:
            row = self._upsert(session, job_id, attempt, step, path, size_bytes, metrics,
                               CheckpointKind.CHECKPOINT)
            live = list(session.scalars(
                select(Checkpoint).where(col(Checkpoint.job_id) == job_id,
                                         col(Checkpoint.kind) == CheckpointKind.CHECKPOINT,
                                         ~col(Checkpoint.deleted))
                .order_by(col(Checkpoint.step), col(Checkpoint.id))))
            best = pick_best(live, best_metric, best_mode)
            self._set_best(session, job_id, best.id if best else None)
            keep = {c.id for c in live[-keep_last:]} | ({best.id} if best else set())
            doomed = [c for c in live if c.id not in keep]
        return row, doomed

    @staticmethod
    def _upsert(session: Session, job_id: int, attempt: int, step: int, path: str,
                size_bytes: int, metrics: dict[str, Any], kind: CheckpointKind) -> Checkpoint:
        check_json("metrics", metrics)
        if not path or len(path) > 4096:
            raise InvalidRequest("checkpoint path: 1 to 4096 characters")
        StoreBase._lock_job(session, job_id)
        now = utcnow()
        if kind is CheckpointKind.CHECKPOINT:
            session.execute(
                update(Checkpoint)
                .where(col(Checkpoint.job_id) == job_id, col(Checkpoint.is_latest))
                .values(is_latest=False).execution_options(synchronize_session=False))
            session.flush()
        row = session.execute(select(Checkpoint).where(
            col(Checkpoint.job_id) == job_id, col(Checkpoint.path) == str(path))).scalar_one_or_none()
        if row is None:
            row = Checkpoint(job_id=job_id, path=str(path), attempt=int(attempt), step=int(step),
                             size_bytes=int(size_bytes), metrics=metrics, kind=kind)
            session.add(row)
        row.attempt, row.step, row.size_bytes = int(attempt), int(step), int(size_bytes)
        row.metrics, row.kind, row.deleted, row.created_at = metrics, kind, False, now
        row.is_latest = kind is CheckpointKind.CHECKPOINT
        session.flush()
        return row

    @staticmethod
    def _set_best(session: Session, job_id: int, checkpoint_id: int | None) -> None:
        # Clear first: the partial unique index allows only one is_best row per job.
        session.execute(
            update(Checkpoint).where(col(Checkpoint.job_id) == job_id, col(Checkpoint.is_best))
            .values(is_best=False).execution_options(synchronize_session=False))
        if checkpoint_id is not None:
            session.execute(
                update(Checkpoint).where(col(Checkpoint.id) == checkpoint_id)
                .values(is_best=True).execution_options(synchronize_session=False))

    def set_best_checkpoint(self, job_id: int, checkpoint_id: int | None) -> None:
        """Make `checkpoint_id` the job's only best checkpoint (None: no best)."""
        with self._writing() as session:
            self._lock_job(session, job_id)
            if checkpoint_id is not None:
                owner = session.execute(select(col(Checkpoint.job_id)).where(
                    col(Checkpoint.id) == checkpoint_id)).scalar_one_or_none()
                if owner != job_id:
                    raise NotFound(f"checkpoint {checkpoint_id} is not a checkpoint of job "
                                   f"{job_id}")
            self._set_best(session, job_id, checkpoint_id)

    def mark_checkpoints_deleted(self, job_id: int, checkpoint_ids: Sequence[int]) -> int:
        """Retention removed these checkpoints' files; their rows stay, as history. Only the
        job's own checkpoints are touched. Returns how many rows changed."""
        if not checkpoint_ids:
            return 0
        with self._writing() as session:
            result = session.execute(
                update(Checkpoint)
                .where(col(Checkpoint.job_id) == job_id, col(Checkpoint.id).in_(checkpoint_ids))
                .values(deleted=True, is_latest=False, is_best=False)
                .execution_options(synchronize_session=False))
        return int(result.rowcount)  # type: ignore[attr-defined]

    def checkpoints(self, job_id: int, *, include_deleted: bool = False) -> list[Checkpoint]:
        """By step (then insertion order)."""
        query = select(Checkpoint).where(col(Checkpoint.job_id) == job_id)
        if not include_deleted:
            query = query.where(~col(Checkpoint.deleted))
        query = query.order_by(col(Checkpoint.step), col(Checkpoint.id))
        with self._read() as session:
            return list(session.scalars(query))
