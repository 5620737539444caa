"""The metrics path: a worker's reports, through the HTTP API, into the store.

What a training run's reporter does, at full speed and without the training: the worker
side (`workers.control_plane.Outbox`, the same code the Trainer callback feeds) queues
metric rows in the batches the reporter hands over, and its background thread posts them to
a real control plane (`create_app` served by uvicorn in a thread: real HTTP on 127.0.0.1,
the attempt's token, the store on a fresh database). Rows/s = rows / (first queued ->
every row acknowledged), and the store is checked to hold each row exactly once.

    python bench/reporting.py                 # SQLite and PostgreSQL
    python bench/reporting.py --db sqlite --rows 200000

Goal: >= 20,000 rows/s on SQLite. The exit status is 1 when it is missed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastapi.testclient import TestClient  # noqa: E402

from orchestrator.cluster import Capacity  # noqa: E402
from orchestrator.server import ControlPlane, create_app  # noqa: E402
from orchestrator.store import Store  # noqa: E402
from tests.support import FakeExecutor, postgres_schema, postgres_unreachable, served  # noqa: E402
from workers.control_plane import ControlPlaneClient, Outbox  # noqa: E402

GOAL_ROWS_PER_S = 20_000
# What the reporter hands the outbox per flush: ~5 values a step (loss, lr, grad_norm,
# epoch, ...), flushed every 200 buffered values.
FLUSH_ROWS = 200
NAMES = ("train_loss", "learning_rate", "grad_norm", "epoch", "tokens_per_second")


def run(url: str, rows: int) -> tuple[float, int]:
    """(rows/s, rows stored) for `rows` metric values sent by one worker."""
    store = Store(url)
    fake = FakeExecutor()
    plane = ControlPlane(store, fake, Capacity(gpus=1, cpus=8, nodes=1), interval=3600)
    try:
        with TestClient(create_app(plane)) as local, served(local.app) as base:
            job = store.create_job(name="bench", objective="clm", owner="bench",
                                   spec={"resources": {"workers": 1}}, spec_yaml="", gpus=0,
                                   cpus=1)
            plane.scheduler.tick()
            [launch] = fake.launches
            client = ControlPlaneClient(base, launch.token, timeout=60)
            outbox = Outbox(client)
            steps = rows // len(NAMES)
            batch: list[tuple[int, str, float]] = []
            start = time.perf_counter()
            for step in range(steps):
                batch.extend((step, name, step * 0.001) for name in NAMES)
                if len(batch) >= FLUSH_ROWS:
                    outbox.put_metrics(batch)
                    batch = []
            outbox.put_metrics(batch)
            if not outbox.drain(600) or outbox.error:
                raise SystemExit(f"the reports did not all arrive: {outbox.error}")
            elapsed = time.perf_counter() - start
            outbox.close()
            assert job.id is not None
            stored = len(store.metrics(job.id))
    finally:
        store.close()
    return steps * len(NAMES) / elapsed, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    missed = []
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.rows} "
          f"metric values from one worker, {len(NAMES)} per step, handed over {FLUSH_ROWS} at "
          "a time", flush=True)
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        os.environ["ORCH_HOME"] = tmp
        for kind in (["sqlite", "postgresql"] if args.db == "both" else [args.db]):
            if kind == "sqlite":
                rate, stored = run(f"sqlite:///{tmp}/orch.db", args.rows)
            else:
                if reason := postgres_unreachable():
                    raise SystemExit(reason)
                with postgres_schema(f"orch_bench_{os.getpid()}") as url:
                    rate, stored = run(url, args.rows)
            sent = args.rows // len(NAMES) * len(NAMES)
            print(f"{kind} metrics path rows/s: {rate:.0f} ({stored} of {sent} rows stored, "
                  "each once)", flush=True)
            if stored != sent:
                missed.append(f"{kind}: {stored} rows stored, {sent} sent")
            if kind == "sqlite" and rate < GOAL_ROWS_PER_S:
                missed.append(f"sqlite rows/s {rate:.0f} < {GOAL_ROWS_PER_S}")
    print("goals: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
