"""The local cluster's processes: `stop_local` stops every one of its own cluster's
processes (agents and workers included, whose titles Ray rewrites) and never another
cluster's."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator import cluster
from tests.support import CLUSTER_TEST_PORTS, offset_ports

# Ports of these tests' own, apart from the session cluster's and the benchmarks'.
PORTS = offset_ports(CLUSTER_TEST_PORTS)
# A process that sleeps, with its arguments in its command line, like Ray's daemons.
SLEEPER = "import time; time.sleep(120)"
# A parent (marked like a raylet) whose child carries no mark at all, like Ray's retitled
# agents and workers.
PARENT = ("import subprocess, sys, time\n"
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
          "time.sleep(120)")
# Retitled like a Ray agent, with a log file of its session open, orphaned (no parent of ours).
AGENT = ("import sys, time\n"
         "log = open(sys.argv[1], 'a'); time.sleep(120)")
# Holds the agent port, unmarked, like an agent orphaned by an earlier, incomplete stop.
LISTENER = ("import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(120)")


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    for key, port in PORTS.items():
        monkeypatch.setenv(key, str(port))
    return PORTS


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:  # whatever the test left alive, children included
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        except psutil.Error:
            pass
        proc.kill()
        proc.wait()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_stop_local_stops_its_whole_process_tree_and_nothing_else(
        cluster_env: dict[str, int], spawned: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    port, agent_port = cluster_env["ORCH_RAY_PORT"], cluster_env["ORCH_RAY_AGENT_PORT"]
    ours, theirs = f"session_ours_{os.getpid()}", f"session_theirs_{os.getpid()}"

    def start(code: str, *args: str, title: str | None = None) -> subprocess.Popen[bytes]:
        spawned.append(subprocess.Popen([title or sys.executable, "-c", code, *args],
                                        executable=sys.executable))
        return spawned[-1]

    (tmp_path / ours / "logs").mkdir(parents=True)

    gcs = start(SLEEPER, f"--gcs_server_port={port}", f"--log_dir={tmp_path}/{ours}/logs")
    raylet = start(PARENT, f"--gcs-address=127.0.0.1:{port}")
    by_session = start(SLEEPER, f"--session-dir={tmp_path}/{ours}")
    orphan = start(LISTENER, str(agent_port))
    agent = start(AGENT, f"{tmp_path}/{ours}/logs/agent.log", title="ray::RuntimeEnvAgent")
    other = start(SLEEPER, f"--gcs-address=127.0.0.1:{port + 1}", f"--log_dir={tmp_path}/{theirs}/logs")
    deadline = time.monotonic() + 30
    while (_port_free(agent_port) or not psutil.Process(raylet.pid).children()
           or not psutil.Process(agent.pid).open_files()):
        assert time.monotonic() < deadline, "the stand-in processes did not start"
        time.sleep(0.05)
    child = psutil.Process(raylet.pid).children()[0]

    found = {p.pid for p in cluster.local_cluster_processes()}
    assert found == {gcs.pid, raylet.pid, child.pid, by_session.pid, orphan.pid, agent.pid}

    cluster.stop_local(timeout=10)
    for proc in (gcs, raylet, by_session, orphan, agent):
        proc.wait(timeout=10)
    assert not _alive(child.pid)
    assert _port_free(agent_port)
    assert other.poll() is None, "stop_local stopped another cluster's process"


def test_stop_local_leaves_nothing_of_a_real_cluster(cluster_env: dict[str, int]) -> None:
    """One real `ray start` (the ~10-20 s this file costs): every process Ray started for
    it, the retitled agents included, is gone after stop_local, and its ports are free."""
    cluster.start_local(num_cpus=1, num_gpus=0, settle_timeout=0)
    try:
        procs = cluster.local_cluster_processes()
        titles = {" ".join(p.cmdline())[:40] for p in procs}
        # The agents Ray retitles are found (by descent from the raylet).
        assert any(t.startswith("ray::DashboardAgent") for t in titles), titles
        assert any(t.startswith("ray::RuntimeEnvAgent") for t in titles), titles
        sessions = {name for p in procs for arg in p.cmdline()
                    for name in re.findall(r"/(session_[^/\s'\"]+)", arg)}
        assert len(sessions) == 1, sessions
    finally:
        cluster.stop_local()
    assert not [p.pid for p in procs if _alive(p.pid)]
    session = f"/{sessions.pop()}"
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if session in " ".join(p.info["cmdline"] or [])]
    assert not left, f"processes of the stopped session remain: {left}"
    assert all(_port_free(port) for port in cluster_env.values()), cluster_env


def test_wait_settled_waits_for_the_cluster_to_go_quiet_and_no_longer_than_its_limit(
        cluster_env: dict[str, int], spawned: list[subprocess.Popen[bytes]]) -> None:
    # A stand-in daemon of our cluster, busy until it has used CPU_S of CPU, then idle.
    # (A low busy_cores keeps the test right on a crowded machine, where the stand-in
    # gets a small share of a core.)
    burner = ("import sys, time\n"
              "while time.process_time() < float(sys.argv[1]): pass\n"
              "time.sleep(120)")
    port = cluster_env["ORCH_RAY_PORT"]
    spawned.append(subprocess.Popen([sys.executable, "-c", burner, "0.8", f"--gcs_server_port={port}"]))
    started = time.monotonic()
    cluster.wait_settled(timeout=30, busy_cores=0.02, window=0.5)
    used = psutil.Process(spawned[-1].pid).cpu_times()
    assert used.user + used.system >= 0.75, "returned while it was busy"
    assert time.monotonic() - started < 25
    # Busy for longer than the limit: it gives up at the limit.
    spawned.append(subprocess.Popen([sys.executable, "-c", burner, "60", f"--gcs_server_port={port}"]))
    assert 1.5 <= cluster.wait_settled(timeout=1.5, busy_cores=0.02, window=0.5) < 5
