"""The control plane alone: admission throughput and submit-to-running latency.

No Ray and no training: the no-op executor (`orchestrator/noop.py`) starts a job the
moment the scheduler hands it over. Each database gets a fresh store (a temporary SQLite
file; a new PostgreSQL schema, dropped afterwards).

- admissions/s: 1,000 queued jobs created with `Store.create_job`, then
  `Scheduler.tick()` until none is queued, with plenty of capacity. An admission is the
  scheduler's claim (queued -> pending, with its event and attempt row) plus the no-op
  executor's start (pending -> running). Reported twice: jobs that keep running (they hold
  resources, as real ones do) and jobs that also finish at once (one more transaction).
- submit -> running: a `ControlPlane` + `create_app` served by uvicorn in a thread (real
  HTTP on 127.0.0.1, the app's own scheduler loop), jobs posted one at a time with the body
  the CLI sends (`jobs/bert_mlm.yaml`), each sample taken while nothing else runs. Auth is
  on as on a team server (`ORCH_AUTH=users`): every POST carries a user's token, which the
  server looks up (by its hash) before it reads the body. Latency =
  the `at` of the job's pending -> running event minus the time just before the POST (one
  process, one clock). The first few submissions are warm-up and not counted.

    python bench/scheduler.py                       # both databases
    python bench/scheduler.py --db sqlite --jobs 1000 --samples 200

PostgreSQL: `--pg-url` (default `$ORCH_TEST_POSTGRES_URL` or
postgresql+psycopg://postgres@127.0.0.1:5432/test). Goals: >= 200 admissions/s and a
submit -> running p50 under 100 ms. The exit status is 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psycopg  # noqa: E402
import uvicorn  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from orchestrator.cluster import Capacity  # noqa: E402
from orchestrator.noop import NoopExecutor  # noqa: E402
from orchestrator.scheduler import Scheduler  # noqa: E402
from orchestrator.server import ControlPlane, create_app  # noqa: E402
from orchestrator.settings import get_settings  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.states import JobState  # noqa: E402
from orchestrator.store import Store  # noqa: E402

SPEC = REPO / "jobs" / "bert_mlm.yaml"
PLENTY = Capacity(gpus=1_000_000, cpus=1_000_000, nodes=1)
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GOAL_ADMISSIONS_PER_S = 200
GOAL_P50_MS = 100


# -- databases --------------------------------------------------------------------------
@contextmanager
def fresh_database(kind: str, pg_url: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        path = workdir / f"sqlite-{time.monotonic_ns()}" / "orch.db"
        yield f"sqlite:///{path}"
        return
    base = make_url(pg_url)
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    schema = f"orch_bench_{os.getpid()}_{time.monotonic_ns() % 10**6}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.Error as exc:
        raise SystemExit(f"PostgreSQL at {pg_url} unreachable ({exc}); pass --pg-url or "
                         "--db sqlite") from None
    if base.drivername == "postgresql":
        base = base.set(drivername="postgresql+psycopg")
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# -- admissions/s -----------------------------------------------------------------------
def admissions_per_second(url: str, jobs: int, finish: bool) -> tuple[float, float, int]:
    """(admissions/s, this process's CPU ms per admission, ticks) for `jobs` queued jobs."""
    spec, text = load_spec(SPEC, ())
    with Store(url) as store:
        store.create_user("bench", actor="bench")  # the jobs' owner, as on a team server
        for _ in range(jobs):
            store.create_job(name=spec.name, objective=spec.objective.value, owner="bench",
                             spec=spec.to_dict(), spec_yaml=text, gpus=spec.resources.gpus,
                             cpus=spec.resources.cpus, priority=spec.priority)
        scheduler = Scheduler(store, NoopExecutor(store, finish=finish), PLENTY)
        ticks = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        while store.queued_jobs():
            scheduler.tick()
            ticks += 1
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        expected = JobState.SUCCEEDED if finish else JobState.RUNNING
        done = store.list_jobs(states=[expected])
        if len(done) != jobs:
            raise SystemExit(f"only {len(done)} of {jobs} jobs reached {expected.value}")
    return jobs / elapsed, cpu * 1000 / jobs, ticks


def median_run(kind: str, pg_url: str, workdir: Path, jobs: int, finish: bool,
               repeats: int) -> tuple[float, float, int]:
    """The run with the median rate out of `repeats`, each on a fresh database."""
    runs = []
    for _ in range(repeats):
        with fresh_database(kind, pg_url, workdir) as url:
            runs.append(admissions_per_second(url, jobs, finish))
    return sorted(runs)[len(runs) // 2]


# -- submit -> running ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(plane: ControlPlane) -> Iterator[str]:
    """The real app (its lifespan starts the plane's scheduler loop) on a uvicorn thread."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(plane), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _running_at(store: Store, job_id: int, timeout: float = 30) -> datetime:
    """When the job left pending for running (its event's `at`); waits for it."""
    deadline = time.monotonic() + timeout
    while True:
        for event in store.events(job_id):
            if event.from_state == JobState.PENDING.value and event.to_state == JobState.RUNNING.value:
                return event.at
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} did not start within {timeout:.0f}s")
        time.sleep(0.002)


def submit_latency(url: str, samples: int, warmup: int) -> dict[str, float]:
    spec, text = load_spec(SPEC, ())
    body = {"spec": spec.to_dict(), "spec_yaml": text}
    store = Store(url)
    _, issued = store.create_user("bench", actor="bench")
    team = get_settings().model_copy(update={"auth": "users"})
    plane = ControlPlane(store, NoopExecutor(store), PLENTY, interval=0.5, settings=team)
    latencies, posts = [], []
    cold_ms = 0.0
    auth = {"Authorization": f"Bearer {issued.token}"}
    try:
        with served(plane) as base, httpx.Client(base_url=base, timeout=60,
                                                 headers=auth) as client:
            for i in range(warmup + samples):
                before = datetime.now(timezone.utc)
                t0 = time.perf_counter()
                response = client.post("/jobs", json=body)
                post_ms = (time.perf_counter() - t0) * 1000
                response.raise_for_status()
                ms = (_running_at(store, response.json()["id"]) - before).total_seconds() * 1000
                if i == 0:
                    cold_ms = ms
                if i >= warmup:
                    latencies.append(ms)
                    posts.append(post_ms)
    finally:
        store.close()
    return {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "max": max(latencies), "post_p50": percentile(posts, 50), "cold": cold_ms}


def percentile(values: list[float], pct: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


# -- main -------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=1000, help="queued jobs to admit")
    parser.add_argument("--samples", type=int, default=200, help="timed submissions")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first submissions")
    parser.add_argument("--repeats", type=int, default=3,
                        help="admission runs per case (fresh database each); the median is reported")
    parser.add_argument("--pg-url", default=os.environ.get("ORCH_TEST_POSTGRES_URL", DEFAULT_PG_URL))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    missed = []
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"{args.jobs} jobs to admit (median of {args.repeats}); {args.samples} submissions "
          f"(+{args.warmup} warm-up) over HTTP to uvicorn in a thread", flush=True)
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        # Artifact dirs (never written by the no-op executor) stay out of ~/.orch.
        os.environ["ORCH_HOME"] = tmp
        for kind in kinds:
            rate, cpu_ms, ticks = median_run(kind, args.pg_url, Path(tmp), args.jobs, False,
                                             args.repeats)
            print(f"{kind} admissions/s: {rate:.0f} ({cpu_ms:.2f} ms CPU of this process per "
                  f"admission; {ticks} tick(s))", flush=True)
            rate_done, cpu_done, _ = median_run(kind, args.pg_url, Path(tmp), args.jobs, True,
                                                args.repeats)
            print(f"{kind} admissions/s (no-op jobs also finish): {rate_done:.0f} "
                  f"({cpu_done:.2f} ms CPU per admission)", flush=True)
            with fresh_database(kind, args.pg_url, Path(tmp)) as url:
                lat = submit_latency(url, args.samples, args.warmup)
            print(f"{kind} submit->running p50 ms: {lat['p50']:.1f} p95 ms: {lat['p95']:.1f} "
                  f"max ms: {lat['max']:.1f} (POST round trip p50 ms: {lat['post_p50']:.1f}; "
                  f"first, cold submit ms: {lat['cold']:.0f})", flush=True)
            if rate < GOAL_ADMISSIONS_PER_S:
                missed.append(f"{kind} admissions/s {rate:.0f} < {GOAL_ADMISSIONS_PER_S}")
            if lat["p50"] >= GOAL_P50_MS:
                missed.append(f"{kind} submit->running p50 {lat['p50']:.1f} ms >= {GOAL_P50_MS}")
    print("goals: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
