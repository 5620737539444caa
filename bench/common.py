"""What the benchmarks share: ports of their own, and names for a Ray cluster's processes."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Callable

# Bases distinct from the tests' (tests/conftest.py) and from a user's defaults; shifted
# by ORCH_TEST_PORT_OFFSET so that two checkouts on one machine never share a cluster.
_PORTS = {"ORCH_SERVER_PORT": 8772, "ORCH_RAY_PORT": 6392, "ORCH_RAY_DASHBOARD_PORT": 8267,
          "ORCH_RAY_CLIENT_PORT": 9021, "ORCH_RAY_AGENT_PORT": 52385}


def bench_env(home: str | None = None) -> dict[str, str]:
    """ORCH_* settings for a benchmark's own local cluster and control plane."""
    offset = int(os.environ.get("ORCH_TEST_PORT_OFFSET", "0"))
    env = {key: str(base + offset) for key, base in _PORTS.items()}
    env.update(ORCH_HOME=home or tempfile.mkdtemp(prefix="orch-bench-"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def process_kind(cmdline: list[str]) -> str:
    """A short name for one of a Ray cluster's processes, from its (re)titled command line."""
    if not cmdline:
        return "?"
    first = cmdline[0]
    line = " ".join(cmdline)
    if first.startswith("ray::"):
        title = first.split()[0].split(".")[0]  # ray::JobSupervisor, ray::RayTrainWorker._
        return "idle worker (ray::IDLE)" if title == "ray::IDLE" else title
    if first.startswith("ray-dashboard-"):  # the dashboard's module processes
        return "dashboard module " + first.split()[0].removeprefix("ray-dashboard-").rsplit("-", 1)[0]
    for needle, kind in (("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"),
                         ("dashboard/dashboard.py", "dashboard head"),
                         ("multiprocessing.forkserver", "dashboard forkserver"),
                         ("log_monitor.py", "log_monitor"), ("autoscaler/_private/monitor.py", "monitor"),
                         ("ray.util.client.server", "client server"),
                         ("workers.driver", "orch worker (Ray Job entrypoint)"),
                         ("dashboard/agent.py", "DashboardAgent"),
                         ("orchestrator.cli server", "orch server"),
                         ("orchestrator.cli submit", "orch CLI (submit --wait)"),
                         ("orchestrator.cli", "orch CLI (other)"),
                         ("runtime_env/agent/main.py", "RuntimeEnvAgent")):
        if needle in line:
            return kind
    return os.path.basename(first)[:30]


class CpuSampler:
    """Samples the CPU time of every process of the local cluster (and of `extra` pids'
    process trees) in a background thread, for per-window, per-kind accounting.

    A full search for the cluster's processes (`local_cluster_processes`, ~40 ms of CPU)
    runs every `full_every` seconds; in between only the known processes and their new
    descendants are read, to keep the sampler's own CPU small (it prints it).
    """

    def __init__(self, interval: float = 1.0, full_every: float = 5.0,
                 extra: Callable[[], list[int]] = lambda: []) -> None:
        self.interval = interval
        self.full_every = full_every
        self.extra = extra
        self.cpu: dict[int, float] = {}     # pid -> latest cumulative CPU seconds
        self.kinds: dict[int, str] = {}     # pid -> kind, from its latest title
        self.series: list[tuple[float, dict[int, float]]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.own_cpu_s = 0.0

    def __enter__(self) -> CpuSampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        from orchestrator import cluster

        known: dict[int, psutil.Process] = {}
        last_full = -1e9
        cpu_start = time.thread_time()
        while not self._stop.is_set():
            tick = time.monotonic()
            if tick - last_full >= self.full_every:
                for proc in cluster.local_cluster_processes():
                    known.setdefault(proc.pid, proc)
                last_full = tick
            for pid in self.extra():
                with contextlib.suppress(psutil.Error):
                    known.setdefault(pid, psutil.Process(pid))
            for pid, proc in list(known.items()):
                if not proc.is_running():  # gone, or its pid reused by another process
                    del known[pid]
            # New descendants (workers, agents, drivers): one pass over the process table.
            parents: dict[int, int] = {}
            for proc in psutil.process_iter(["ppid"]):
                parents[proc.pid] = proc.info["ppid"]
            for pid in sorted(parents):  # a parent's pid is usually smaller than its child's
                if pid not in known and parents[pid] in known:
                    with contextlib.suppress(psutil.Error):
                        known[pid] = psutil.Process(pid)
            for pid, proc in list(known.items()):
                try:
                    if not proc.is_running():  # gone, or its pid reused by another process
                        raise psutil.NoSuchProcess(pid)
                    with proc.oneshot():
                        times = proc.cpu_times()
                        self.cpu[pid] = times.user + times.system
                        self.kinds[pid] = process_kind(proc.cmdline())
                except psutil.Error:
                    del known[pid]  # exited: its last sample stands
            self.series.append((tick - self.started, dict(self.cpu)))
            self.own_cpu_s = time.thread_time() - cpu_start
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - tick)))

    def at(self, t: float) -> dict[int, float]:
        """Cumulative CPU per pid at the last sample taken no later than `t` s after start."""
        best: dict[int, float] = {}
        for when, values in self.series:
            if when > t:
                break
            best = values
        return best

    def table(self, edges: list[float], skip: Callable[[str], bool] = lambda k: False) -> list[str]:
        """A markdown table: CPU seconds per kind of process between consecutive `edges`
        (seconds after the start), in all, and how many processes of that kind were seen
        (a process that exits between two samples loses its CPU since the last one: many
        pids of one kind means churn). Kinds for which `skip` is true are left out of 'all'."""
        samples = [self.at(t) for t in edges]
        names = sorted(set(self.kinds.values()))
        pids = {k: sum(1 for kind in self.kinds.values() if kind == k) for k in names}
        per_kind = {k: [sum(samples[w + 1].get(p, 0) - samples[w].get(p, 0)
                            for p, kind in self.kinds.items() if kind == k)
                        for w in range(len(edges) - 1)] for k in names}
        head = f"| {'process':<32} |" + "".join(f" {f'{a:.0f}-{b:.0f}s':>8} |"
                                               for a, b in itertools.pairwise(edges)) + "    total | pids |"
        lines = [head, "|" + "---|" * (len(edges) + 2)]
        for k in sorted(names, key=lambda k: -sum(per_kind[k])):
            if sum(per_kind[k]) < 0.05:
                continue  # e.g. `sleep 1`: the JobSupervisor's watchdog shell starts one a second
            lines.append(f"| {k:<32} |" + "".join(f" {v:8.1f} |" for v in per_kind[k])
                         + f" {sum(per_kind[k]):8.1f} | {pids[k]:4d} |")
        totals = [sum(per_kind[k][w] for k in names if not skip(k)) for w in range(len(edges) - 1)]
        label = "all" + (" (but the skipped)" if any(map(skip, names)) else "")
        lines.append(f"| {label:<32} |" + "".join(f" {v:8.1f} |" for v in totals)
                     + f" {sum(totals):8.1f} | {len(self.kinds):4d} |")
        self.window_totals = totals
        return lines
