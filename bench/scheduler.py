"""The control plane alone: admission throughput and submit-to-running latency.

No Ray and no training: the no-op executor (`orchestrator/noop.py`) starts a job the
moment the scheduler hands it over. Each database gets a fresh store (a temporary SQLite
file; a new PostgreSQL schema, dropped afterwards).

- admissions/s: N queued jobs (N = 10, 100, 1,000, 10,000), then `Scheduler.tick()` until
  none is queued, with plenty of capacity, handing each admitted job to an executor that
  only records it (what the control plane itself does per admission: the claim -- queued ->
  pending, its event and its attempt row with a new worker token, for every job of the
  tick in one transaction -- and the hand-over), timed until the executor has been handed
  all N (the store is then checked, untimed, for none left queued). Cost per admission
  should not grow with N.
- a deep queue: N queued jobs but room for 10 per tick: the time of one tick, which should
  not grow with N either (the queue is read a page at a time).
- for comparison, 1,000 jobs with the no-op executor, which also starts each job
  (pending -> running, one more transaction per job, as a real worker does).
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
postgresql+psycopg://postgres@127.0.0.1:5432/test). Goals: >= 2,000 admissions/s at every
N, and a submit -> running p50 under 100 ms. The exit status is 1 when a goal is missed.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from orchestrator.cluster import Capacity  # noqa: E402
from orchestrator.executor import Launch, RayJobInfo, RayStatus  # noqa: E402
from orchestrator.models import Job, JobEvent, utcnow  # noqa: E402
from orchestrator.noop import NoopExecutor  # noqa: E402
from orchestrator.scheduler import Scheduler  # noqa: E402
from orchestrator.server import ControlPlane, create_app  # noqa: E402
from orchestrator.settings import get_settings  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.states import JobState  # noqa: E402
from orchestrator.store import Store  # noqa: E402
from tests.support import postgres_schema, postgres_unreachable  # noqa: E402

SPEC = REPO / "jobs" / "bert_mlm.yaml"
PLENTY = Capacity(gpus=1_000_000, cpus=1_000_000, nodes=1)
GOAL_ADMISSIONS_PER_S = 2000
GOAL_P50_MS = 100
QUEUE_SIZES = (10, 100, 1000, 10_000)


# -- databases --------------------------------------------------------------------------
@contextmanager
def fresh_database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        path = workdir / f"sqlite-{time.monotonic_ns()}" / "orch.db"
        yield f"sqlite:///{path}"
        return
    if reason := postgres_unreachable():
        raise SystemExit(f"{reason}; set ORCH_TEST_POSTGRES_URL or pass --db sqlite")
    with postgres_schema(f"orch_bench_{os.getpid()}_{time.monotonic_ns() % 10**6}") as url:
        yield url


def queue_jobs(store: Store, count: int) -> None:
    """`count` queued jobs with their creation events, inserted in bulk (setup, not timed)."""
    spec, text = load_spec(SPEC, ())
    now = utcnow()
    table = Job.__table__
    with store.engine.begin() as conn:
        ids = conn.execute(table.insert().returning(table.c.id), [
            {"name": spec.name, "objective": spec.objective.value, "owner": f"user{i % 7}",
             "state": JobState.QUEUED, "priority": 0, "spec": spec.to_dict(), "spec_yaml": text,
             "gpus": 0, "cpus": 1, "attempts": 0, "max_attempts": 1, "artifact_dir": "/x",
             "created_at": now, "updated_at": now} for i in range(count)]).scalars().all()
        conn.execute(JobEvent.__table__.insert(), [
            {"job_id": job_id, "from_state": None, "to_state": JobState.QUEUED,
             "reason": "submitted", "at": now} for job_id in ids])


class Recorder:
    """An executor that only records what it is handed: the control plane's own cost."""

    jobs_url = None

    def __init__(self) -> None:
        self.launched = 0

    def submit(self, launch: Launch) -> None:
        self.launched += 1

    def info(self, submission: str) -> RayJobInfo:
        return RayJobInfo(RayStatus.PENDING)

    def stop(self, submission: str) -> None:
        pass

    def logs(self, submission: str) -> str | None:
        return None


class CountingNoop(NoopExecutor):
    """The no-op executor (each job also started: pending -> running), counting."""

    launched = 0

    def submit(self, launch: Launch) -> None:
        super().submit(launch)
        self.launched += 1


def admissions(url: str, jobs: int, executor: str) -> tuple[float, float, int]:
    """(admissions/s, this process's CPU ms per admission, ticks) for `jobs` queued jobs."""
    with Store(url) as store:
        runner = Recorder() if executor == "record" else CountingNoop(store, finish=False)
        scheduler = Scheduler(store, runner, PLENTY)
        # Warm, as a running server's scheduler is: admit a batch of the same size first
        # (untimed), so the timed ticks do not pay for the pool's first connections and
        # SQLAlchemy's statement caches, once per process (tens of ms: most of the time of
        # 10 jobs). Then end the warm jobs, so the timed ticks have no live job to
        # reconcile with Ray: they measure admission alone.
        queue_jobs(store, jobs)
        while store.queued_jobs(limit=1):
            scheduler.tick()
        for job in store.list_jobs(states=[JobState.PENDING, JobState.RUNNING]):
            assert job.id is not None
            store.transition(job.id, JobState.CANCELLED, "bench: warm-up over")
        queue_jobs(store, jobs)
        ticks, handed = 0, runner.launched
        start, cpu_start = time.perf_counter(), time.process_time()
        # Until every job was handed to the executor, which counts them (reading the queue
        # from here to see whether it is empty would time a query admission does not make;
        # the store is checked below, untimed).
        while runner.launched - handed < jobs:
            before = runner.launched
            scheduler.tick()
            ticks += 1
            if runner.launched == before:
                break  # admitted nothing: stuck; reported below
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if store.queued_jobs(limit=1):
            raise SystemExit(f"jobs still queued after {ticks} tick(s)")
        admitted = len(store.list_jobs(states=[JobState.PENDING, JobState.RUNNING]))
        if admitted != jobs:
            raise SystemExit(f"only {admitted} of {jobs} jobs were admitted")
    return jobs / elapsed, cpu * 1000 / jobs, ticks


def deep_queue_tick_ms(url: str, jobs: int, room: int = 10) -> float:
    """One tick's wall time with `jobs` queued and room for `room` of them."""
    with Store(url) as store:
        queue_jobs(store, jobs)
        scheduler = Scheduler(store, Recorder(), Capacity(gpus=0, cpus=room, nodes=1))
        scheduler.tick()  # warm: the first tick pays for connections and statement caches
        for job in store.list_jobs(states=[JobState.PENDING]):
            assert job.id is not None
            store.transition(job.id, JobState.CANCELLED, "bench: free the room")
        start = time.perf_counter()
        scheduler.tick()
        return (time.perf_counter() - start) * 1000


def median_of(repeats: int, run: Callable[[], tuple[float, ...]]) -> tuple[float, ...]:
    """The run with the median first value out of `repeats`."""
    runs = sorted(run() for _ in range(repeats))
    return runs[len(runs) // 2]


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
            if event.from_state == JobState.PENDING and event.to_state == JobState.RUNNING:
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
                if response.status_code != 201:
                    raise SystemExit(f"POST /jobs answered {response.status_code}: {response.text}")
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
    parser.add_argument("--sizes", type=int, nargs="+", default=list(QUEUE_SIZES),
                        help="queue lengths to admit")
    parser.add_argument("--samples", type=int, default=200, help="timed submissions")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first submissions")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per case (fresh database each); the median is reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    missed = []
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; median of "
          f"{args.repeats} runs per case; {args.samples} submissions (+{args.warmup} warm-up) "
          "over HTTP to uvicorn in a thread", flush=True)
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        # Artifact dirs (never written here) stay out of ~/.orch.
        os.environ["ORCH_HOME"] = tmp
        # A team server reads the example's model and data where the operator allows.
        os.environ["ORCH_DATA_ROOTS"] = str(REPO / "jobs")
        work = Path(tmp)
        for kind in kinds:
            # A home per database: job ids start at 1 in each, and orch never reuses a
            # job's directory.
            os.environ["ORCH_HOME"] = str(work / kind)
            for size in args.sizes:
                def run(size: int = size, kind: str = kind) -> tuple[float, ...]:
                    with fresh_database(kind, work) as url:
                        return admissions(url, size, "record")
                rate, cpu_ms, ticks = median_of(args.repeats, run)
                print(f"{kind} admissions/s with {size} queued: {rate:.0f} ({1000 / rate:.3f} ms "
                      f"per admission, {cpu_ms:.3f} ms of it this process's CPU; {ticks:.0f} "
                      "tick(s))", flush=True)
                if rate < GOAL_ADMISSIONS_PER_S:
                    missed.append(f"{kind} admissions/s with {size} queued: {rate:.0f} < "
                                  f"{GOAL_ADMISSIONS_PER_S}")
            for size in args.sizes:
                def deep(size: int = size, kind: str = kind) -> tuple[float, ...]:
                    with fresh_database(kind, work) as url:
                        return (deep_queue_tick_ms(url, size),)
                (tick_ms,) = median_of(args.repeats, deep)
                print(f"{kind} one tick with {size} queued and room for 10: {tick_ms:.1f} ms",
                      flush=True)

            def noop(kind: str = kind) -> tuple[float, ...]:
                with fresh_database(kind, work) as url:
                    return admissions(url, 1000, "noop")
            rate_noop, cpu_noop, _ = median_of(args.repeats, noop)
            print(f"{kind} admissions/s with the no-op executor also starting each job (1000 "
                  f"queued): {rate_noop:.0f} ({cpu_noop:.2f} ms CPU per admission)", flush=True)
            with fresh_database(kind, work) as url:
                lat = submit_latency(url, args.samples, args.warmup)
            print(f"{kind} submit->running p50 ms: {lat['p50']:.1f} p95 ms: {lat['p95']:.1f} "
                  f"max ms: {lat['max']:.1f} (POST round trip p50 ms: {lat['post_p50']:.1f}; "
                  f"first, cold submit ms: {lat['cold']:.0f})", flush=True)
            if lat["p50"] >= GOAL_P50_MS:
                missed.append(f"{kind} submit->running p50 {lat['p50']:.1f} ms >= {GOAL_P50_MS}")
    print("goals: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
