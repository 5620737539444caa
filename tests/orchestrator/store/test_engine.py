"""The Store's engine and schema: migrations, timestamps, concurrent processes."""

from __future__ import annotations

import multiprocessing
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlmodel import SQLModel

from orchestrator.states import JobState
from orchestrator.store import Store, make_engine
from tests.support import assert_utc, new_job

# -- schema, timestamps, concurrency ------------------------------------------------------

P, R, S = JobState.PENDING, JobState.RUNNING, JobState.SUCCEEDED


def test_migrations_idempotent_and_match_models(db_url: str) -> None:
    for _ in range(2):
        with Store(db_url) as store:
            new_job(store)
    with Store(db_url) as store, store.engine.connect() as conn:
        head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(head,)]
        assert len(store.list_jobs()) == 2
        # The hand-written migration and the SQLModel tables describe the same schema.
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_metrics_recorded_before_the_superseded_column_stay_live(db_url: str) -> None:
    """0003 adds metrics.superseded NOT NULL to a table that already has rows, and undoes it."""
    cfg = _alembic_config()
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
            now = datetime.now(timezone.utc)
            job_id = conn.execute(text(
                "INSERT INTO jobs (name, objective, owner, state, priority, spec, spec_yaml, gpus,"
                " cpus, attempts, max_attempts, artifact_dir, created_at, updated_at) VALUES"
                " ('old', 'clm', 'ann', 'running', 0, '{}', '', 0, 1, 1, 1, '/a', :now, :now)"
                " RETURNING id"), {"now": now}).scalar_one()
            conn.execute(text("INSERT INTO metrics (job_id, attempt, step, name, value, at)"
                              " VALUES (:job, 1, 3, 'loss', 2.0, :now)"), {"job": job_id, "now": now})
        with Store(db_url) as store:
            [row] = store.metrics(job_id)
            assert (row.step, row.superseded) == (3, False)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
            assert conn.execute(text("SELECT step FROM metrics")).all() == [(3,)]
    finally:
        engine.dispose()
    with Store(db_url) as store:  # and up again
        assert [m.step for m in store.metrics(job_id)] == [3]


def test_plain_postgresql_url_uses_psycopg(db_url: str) -> None:
    """`postgresql://` would mean psycopg2 to SQLAlchemy; orch ships psycopg 3."""
    with Store(db_url.replace("postgresql+psycopg://", "postgresql://")) as store:
        new_job(store)
        assert store.engine.dialect.driver in ("pysqlite", "psycopg")


def test_timestamps_are_utc(store: Store) -> None:
    job_id = new_job(store)
    store.transition(job_id, P, "admit")
    store.transition(job_id, R, "run")
    store.add_metrics(job_id, 1, [(1, "loss", 1.0)])
    store.transition(job_id, S, "done")
    job = store.get_job(job_id)
    assert job is not None
    for value in (job.created_at, job.updated_at, job.started_at, job.finished_at):
        assert_utc(value)
    for event in store.events(job_id):
        assert_utc(event.at)
    assert_utc(store.metrics(job_id)[0].at)
    # Ordering by time in SQL agrees with ordering in Python.
    ats = [e.at for e in store.events(job_id)]
    assert ats == sorted(ats)


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path}/new/dir/orch.db") as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def _create_jobs(url: str, worker: int, barrier: Any, errors: Any) -> None:
    """One worker process: open the store on the fresh database and submit 10 jobs."""
    try:
        barrier.wait(timeout=30)  # all workers migrate and write at the same moment
        with Store(url) as store:
            for i in range(10):
                store.create_job(
                    name=f"w{worker}-{i}",
                    objective="clm",
                    owner=f"w{worker}",
                    spec={"i": i},
                    spec_yaml="",
                    gpus=0,
                    cpus=1,
                )
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def test_concurrent_processes_on_fresh_database(db_url: str) -> None:
    """8 processes x 10 jobs, all starting with `Store(url)` on an empty database."""
    # fork: the children start in milliseconds instead of re-importing everything (seconds
    # on a small CI machine); each still opens its own engine and connections.
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_create_jobs, args=(db_url, n, barrier, errors)) for n in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert errors.empty(), errors.get()
    assert [p.exitcode for p in procs] == [0] * 8
    with Store(db_url) as store:
        jobs = store.list_jobs()
        assert len(jobs) == 80
        assert len({j.id for j in jobs}) == 80
        assert sorted(j.name for j in jobs) == sorted(f"w{w}-{i}" for w in range(8) for i in range(10))
        for job in jobs[::10]:
            assert len(store.events(job.id or 0)) == 1


def _alembic_config() -> Config:
    from orchestrator.store import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg




def test_0004_keeps_one_live_metric_and_one_row_per_checkpoint_path(db_url: str) -> None:
    """Rows written before 0004 may repeat (one run logged `epoch` several times at a step;
    a later attempt registered a path again): the newest stays, and the schema's new unique
    indexes then hold."""
    cfg = _alembic_config()
    engine = make_engine(db_url)
    now = datetime.now(timezone.utc)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0003")
            job_id = conn.execute(text(
                "INSERT INTO jobs (name, objective, owner, state, priority, spec, spec_yaml, gpus,"
                " cpus, attempts, max_attempts, artifact_dir, created_at, updated_at) VALUES"
                " ('old', 'clm', 'ann', 'running', 0, '{}', '', 0, 1, 1, 1, '/a', :now, :now)"
                " RETURNING id"), {"now": now}).scalar_one()
            for value in (1.0, 1.0, 2.0):
                conn.execute(text("INSERT INTO metrics (job_id, attempt, step, name, value, at)"
                                  " VALUES (:job, 1, 3, 'epoch', :v, :now)"),
                             {"job": job_id, "v": value, "now": now})
            for attempt in (1, 2):
                conn.execute(text(
                    "INSERT INTO checkpoints (job_id, attempt, step, path, size_bytes, metrics,"
                    " kind, is_best, is_latest, deleted, created_at) VALUES (:job, :a, 5,"
                    " '/a/checkpoint-5', 1, '{}', 'checkpoint', false, false, false, :now)"),
                    {"job": job_id, "a": attempt, "now": now})
        with Store(db_url) as store:
            assert [m.value for m in store.metrics(job_id)] == [2.0]
            assert len(store.metrics(job_id, include_superseded=True)) == 3
            assert [c.attempt for c in store.checkpoints(job_id)] == [2]
    finally:
        engine.dispose()
