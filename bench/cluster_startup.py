"""What a freshly started local Ray cluster spends its CPU on, and what that costs the
first job.

Idle profile (default): starts the local cluster the way `orch up` does
(`orchestrator.cluster.start_local`: token auth, dashboard, orch's ports), samples the CPU
time (user + system) of every process of that cluster, and only of it, for `--seconds`,
and stops it. CPU seconds, unlike wall time, stay meaningful on a shared machine.

First job (`--job`): `orch up`, then at once `orch submit --wait` of the spec, sampling the
cluster's processes and the control plane throughout; then the same on a fresh cluster
left to settle for `--settle` seconds first. Prints both CPU tables and the Trainer's own
`train_runtime` of each job (from the store, `orch metrics JOB -o json`).

    python bench/cluster_startup.py                        # idle profile, 90 s
    python bench/cluster_startup.py --env RAY_xxx=1        # the same with a Ray setting
    python bench/cluster_startup.py --job jobs/t5_summarize.yaml \
        --set training.max_steps=600 --set training.epochs=null
    python bench/cluster_startup.py --poll-cost 200     # CPU of one Jobs API status read
    python bench/cluster_startup.py --job jobs/t5_summarize.yaml --sequence 2 --per-job \
        --set training.max_steps=100 --set training.epochs=null  # CPU: first job vs second

Last lines: idle, `startup_cpu_s: X` and `settled_after_s: Y` (start of the first window
from which on every window used less than `--settled-cpu` CPU seconds per 10 s; -1 if
none); with --job, `first_job_train_runtime_s`, `settled_job_train_runtime_s` and
`first_job_ratio: X` (first / settled; the goal is <= 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CpuSampler, bench_env  # noqa: E402


def idle_profile(args: argparse.Namespace) -> None:
    from orchestrator import cluster

    if cluster.is_up():
        sys.exit(f"a cluster already answers on {cluster.target().jobs_url}; stop it first")
    failure: list[BaseException] = []
    ready: list[float] = []

    def start() -> None:
        try:
            cluster.start_local(num_cpus=args.num_cpus, settle_timeout=0)
            ready.append(time.monotonic())
            if args.settle_wait:
                cluster.wait_settled()
            ready.append(time.monotonic())
        except BaseException as exc:  # reported below, after the cluster is stopped
            failure.append(exc)

    try:
        with CpuSampler(interval=args.interval) as sampler:
            starter = threading.Thread(target=start)
            starter.start()
            time.sleep(args.seconds)
            starter.join()
    finally:
        cluster.stop_local()
    if failure:
        raise failure[0]
    edges = [float(t) for t in range(0, int(args.seconds) + 1, args.window)]
    print(f"settings: {' '.join(args.env) or '(defaults)'}; load average "
          f"{os.getloadavg()[0]:.1f}; `ray start` returned after "
          f"{ready[0] - sampler.started:.1f} s"
          + (f", wait_settled after {ready[1] - sampler.started:.1f} s" if args.settle_wait else "")
          + f"; sampler's own CPU {sampler.own_cpu_s:.1f} s")
    print("\n".join(sampler.table(edges)))
    totals = sampler.window_totals
    per_10s = [t * 10 / args.window for t in totals]
    settled = next((edges[w] for w in range(len(totals))
                    if all(t < args.settled_cpu for t in per_10s[w:])), -1)
    print(f"startup_cpu_s: {sum(totals):.1f}")
    print(f"settled_after_s: {settled:.0f}")


def poll_cost(args: argparse.Namespace) -> None:
    """CPU per Jobs API status read (what the control plane does for every active job on
    every scheduler tick), over all of the cluster's processes and the caller: a Ray Job
    that sleeps is polled `--poll-cost` times, against the same wall time without polling."""
    import psutil

    from orchestrator import cluster

    cluster.apply_auth_env()  # before Ray is imported: it reads these once
    from ray.job_submission import JobSubmissionClient

    if cluster.is_up():
        sys.exit(f"a cluster already answers on {cluster.target().jobs_url}; stop it first")
    try:
        cluster.start_local(num_cpus=args.num_cpus)
        client = JobSubmissionClient(cluster.target().jobs_url)
        sid = client.submit_job(entrypoint="sleep 600", entrypoint_num_cpus=0)
        while client.get_job_info(sid).status.value != "RUNNING":
            time.sleep(0.5)
        cluster.wait_settled()
        procs = cluster.local_cluster_processes()

        def cpu() -> float:
            total = time.process_time()
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
            return total

        c0, t0 = cpu(), time.monotonic()
        for _ in range(args.poll_cost):
            client.get_job_info(sid)
        c1, t1 = cpu(), time.monotonic()
        time.sleep(t1 - t0)  # the same wall time, not polling: the idle baseline
        c2, t2 = cpu(), time.monotonic()
        client.stop_job(sid)
    finally:
        cluster.stop_local()
    per_call_ms = ((c1 - c0) - (c2 - c1) * (t1 - t0) / (t2 - t1)) / args.poll_cost * 1000
    print(f"load average {os.getloadavg()[0]:.1f}; {args.poll_cost} get_job_info calls in "
          f"{t1 - t0:.1f} s; idle baseline {(c2 - c1) / (t2 - t1) * 100:.1f}% of a core")
    print(f"get_job_info_cpu_ms: {per_call_ms:.1f}  (cluster processes and caller together; "
          f"at one call per 0.5 s tick: {per_call_ms / 5:.1f}% of a core per active job)")


def orch(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        sys.exit(f"orch {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_runtime(env: dict[str, str], job_id: int) -> float:
    data = json.loads(orch(env, "metrics", str(job_id), "--name", "train_runtime", "-o", "json").stdout)
    return float(data["metrics"][-1]["value"])


def cycle(args: argparse.Namespace, delays: list[float], title: str) -> list[float]:
    """One fresh cluster: `orch up`, then for each delay: wait that long, `orch submit
    --wait`; then `orch down`. Prints the CPU table (a column per `--window` seconds, or
    with --per-job one per phase); returns the jobs' train_runtimes."""
    env = {**os.environ, **bench_env()}
    env.pop("RAY_ADDRESS", None)
    env.pop("ORCH_SERVER_URL", None)
    import psutil

    sets = [a for o in args.overrides for a in ("--set", o)]
    marks: list[tuple[str, float]] = []
    runtimes: list[float] = []

    def orch_pids() -> list[int]:
        """The control plane (detached: found by its pid file) and our CLI children."""
        pid_file = Path(env["ORCH_HOME"]) / "server.pid"
        server = [int(pid_file.read_text())] if pid_file.exists() else []
        return server + [p.pid for p in psutil.Process().children()]

    try:
        with CpuSampler(interval=args.interval, extra=orch_pids) as sampler:
            orch(env, "up", *(["--num-cpus", str(args.num_cpus)] if args.num_cpus else []))
            marks.append(("orch up", time.monotonic() - sampler.started))
            for n, delay in enumerate(delays, 1):
                if delay:
                    time.sleep(delay)
                    marks.append((f"wait {delay:.0f} s", time.monotonic() - sampler.started))
                submitted = orch(env, "submit", "--wait", "-q", args.job, *sets)
                marks.append((f"job {n}", time.monotonic() - sampler.started))
                # Before `orch down`: the CLI would start a new server (and cluster) on demand.
                runtimes.append(train_runtime(env, int(submitted.stdout.split()[0])))
            time.sleep(args.interval * 1.5)  # one more sample after the last job
    finally:
        orch(env, "down", check=False)
    end = marks[-1][1]
    edges = ([0.0, *(t for _, t in marks)] if args.per_job
             else [float(e) for e in sorted({*range(0, int(end), args.window), int(end)})])
    print(f"\n## {title}")
    print(f"load average {os.getloadavg()[0]:.1f}; marks (s after the start): "
          + ", ".join(f"{name} done {t:.1f}" for name, t in marks)
          + f"; train_runtime {', '.join(f'{r:.1f}' for r in runtimes)} s; "
          f"sampler's own CPU {sampler.own_cpu_s:.1f} s")
    print("\n".join(sampler.table(edges, skip=lambda k: k == "orch worker (Ray Job entrypoint)")))
    return runtimes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90, help="idle profile's length")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--window", type=int, default=10, help="seconds per table column")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--settled-cpu", type=float, default=0.8,
                        help="CPU seconds per 10 s under which the idle cluster is settled")
    parser.add_argument("--settle-wait", action="store_true",
                        help="idle profile: also time orchestrator.cluster.wait_settled")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for `ray start` (e.g. a RAY_* setting)")
    parser.add_argument("--poll-cost", type=int, default=0, metavar="N",
                        help="instead: CPU per Jobs API status read, over N reads")
    parser.add_argument("--job", help="a spec: compare its first run after `orch up` with a settled one")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--settle", type=float, default=60, help="seconds the settled run waits")
    parser.add_argument("--sequence", type=int, default=0,
                        help="instead: this many jobs in a row on one fresh cluster")
    parser.add_argument("--per-job", action="store_true",
                        help="table columns: `orch up`, then each job (not time windows)")
    args = parser.parse_args()
    os.environ.update(bench_env())
    os.environ.update(dict(item.split("=", 1) for item in args.env))
    if args.poll_cost:
        return poll_cost(args)
    if not args.job:
        return idle_profile(args)
    if args.sequence:
        cycle(args, [0.0] * args.sequence, f"{args.sequence} jobs in a row right after `orch up`")
        return
    first = cycle(args, [0.0], "first job, submitted at once after `orch up`")[0]
    settled = cycle(args, [args.settle], f"job submitted {args.settle:.0f} s after `orch up`")[0]
    print(f"\nspec: {args.job} {' '.join(args.overrides)}; settings: {' '.join(args.env) or '(defaults)'}")
    print(f"first_job_train_runtime_s: {first:.1f}")
    print(f"settled_job_train_runtime_s: {settled:.1f}")
    print(f"first_job_ratio: {first / settled:.3f}")


if __name__ == "__main__":
    main()
