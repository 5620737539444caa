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
# A stand-in for one of Ray's processes: its arguments (marks like Ray's) stay in its
# command line; `listen=PORT` holds a port, `open=FILE` keeps a file open, `child` starts a
# child whose command line carries no mark at all (like Ray's retitled agents and workers).
STAND_IN = (
    "import socket, subprocess, sys, time\n"
    "keep = []\n"
    "for arg in sys.argv[1:]:\n"
    "    if arg.startswith('listen='):\n"
    "        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "        s.bind(('127.0.0.1', int(arg[7:]))); s.listen(); keep.append(s)\n"
    "    elif arg.startswith('open='):\n"
    "        keep.append(open(arg[5:], 'a'))\n"
    "    elif arg == 'child':\n"
    "        keep.append(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']))\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n")


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
    port = cluster_env["ORCH_RAY_PORT"]

    def session(name: str, gcs_port: int) -> Path:
        """A session directory as Ray writes it: its GCS port in gcs_server_port_<node>."""
        path = tmp_path / f"session_{name}_{os.getpid()}"
        (path / "logs").mkdir(parents=True)
        (path / "gcs_server_port_0123abcd").write_text(str(gcs_port))
        return path

    ours, theirs = session("ours", port), session("theirs", port + 1)

    def start(*args: str, title: str | None = None) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([title or sys.executable, "-c", STAND_IN, *args],
                                executable=sys.executable, stdout=subprocess.PIPE)
        spawned.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return proc

    gcs = start(f"--gcs_server_port={port}", f"--log_dir={ours}/logs")
    raylet = start(f"--gcs-address=127.0.0.1:{port}", "child")
    child = psutil.Process(raylet.pid).children()[0]
    by_session = start(f"--session-dir={ours}")
    # Orphans of an earlier, incomplete stop: ours by the session of the files they hold.
    agent = start(f"listen={cluster_env['ORCH_RAY_AGENT_PORT']}",
                  f"open={ours}/logs/dashboard_agent.log", title="ray::DashboardAgent")
    env_agent = start(f"open={ours}/logs/runtime_env_agent.log", title="ray::RuntimeEnvAgent")
    # Another cluster's, one of them on our dashboard port (Ray's default is orch's).
    other = [start(f"--gcs-address=127.0.0.1:{port + 1}", f"--log_dir={theirs}/logs"),
             start(f"listen={cluster_env['ORCH_RAY_DASHBOARD_PORT']}", f"open={theirs}/logs/d.log"),
             start(f"open={theirs}/logs/w.log", title="ray::IDLE"),
             start(f"listen={cluster_env['ORCH_RAY_CLIENT_PORT']}")]

    found = {p.pid for p in cluster.local_cluster_processes()}
    assert found == {gcs.pid, raylet.pid, child.pid, by_session.pid, agent.pid, env_agent.pid}

    cluster.stop_local(timeout=10)
    for proc in (gcs, raylet, by_session, agent, env_agent):
        proc.wait(timeout=10)
    assert not _alive(child.pid)
    assert _port_free(cluster_env["ORCH_RAY_AGENT_PORT"])
    assert all(proc.poll() is None for proc in other), "stop_local stopped another cluster's process"


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


def _wait_for_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"


def test_start_local_waits_for_a_head_already_on_its_port_instead_of_starting_another(
        cluster_env: dict[str, int], spawned: list[subprocess.Popen[bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A head holds the GCS port but its dashboard is too busy to answer at first (a loaded
    machine): wait for it. A second `ray start` would be refused as 'already running'."""
    spawned.append(subprocess.Popen(
        [sys.executable, "-c", STAND_IN, f"listen={cluster_env['ORCH_RAY_PORT']}"],
        stdout=subprocess.PIPE))
    _wait_for_ready(spawned[-1])
    answers = iter([False, False, False])
    asked: list[float] = []

    def slow_dashboard(url: str | None = None, timeout: float = 2.0) -> bool:
        asked.append(timeout)
        return next(answers, True)

    def no_second_start(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"started Ray again: {args}")

    monkeypatch.setattr(cluster, "is_up", slow_dashboard)
    monkeypatch.setattr(cluster.subprocess, "run", no_second_start)
    assert cluster.start_local(settle_timeout=0).local
    assert len(asked) == 4  # the quick probe, then waited until it answered

    # A head that never answers: a clear error naming the setting, still no second start.
    monkeypatch.setattr(cluster, "is_up", lambda url=None, timeout=2.0: False)
    with pytest.raises(cluster.ClusterError, match="ORCH_RAY_PORT.*did not answer within 1s"):
        cluster.start_local(settle_timeout=0, head_wait=1)
