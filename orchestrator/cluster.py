"""Which Ray cluster orch runs on, and the local one it starts when none is given.

- `RAY_ADDRESS` set: an existing cluster; its value is the Jobs API address
  (`http://head:8265`), as for Ray's own `ray job` CLI. Token auth, if the cluster has it,
  comes from the usual Ray variables (`RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`).
- Otherwise: a local single-node cluster started with `ray start --head`, with token
  authentication on and its token in `$ORCH_HOME/ray/auth_token`. It runs detached, so it
  outlives the CLI and the control plane; `orch down` stops it.

The Ray port defaults to 6390, not Ray's 6379, which is Redis's port and often taken.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from orchestrator.errors import ClusterError
from orchestrator.settings import get_settings

if TYPE_CHECKING:
    import psutil


@dataclass(frozen=True)
class ClusterTarget:
    jobs_url: str  # Ray Jobs / dashboard HTTP address
    local: bool  # started and owned by orch


def ray_port() -> int:
    return get_settings().ray_port


def dashboard_port() -> int:
    return get_settings().ray_dashboard_port


def gcs_address() -> str:
    """The local cluster's GCS address, as a driver on this machine joins it."""
    from ray.util import get_node_ip_address

    return f"{get_node_ip_address()}:{ray_port()}"


def token_path() -> Path:
    return get_settings().home_dir() / "ray" / "auth_token"


def target() -> ClusterTarget:
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if not address.startswith(("http://", "https://")):
            raise ClusterError(
                f"RAY_ADDRESS={address!r}: orch talks to Ray through the Jobs API; set it to "
                "the dashboard address, e.g. http://head-node:8265"
            )
        return ClusterTarget(jobs_url=address.rstrip("/"), local=False)
    return ClusterTarget(jobs_url=f"http://127.0.0.1:{dashboard_port()}", local=True)


def auth_env() -> dict[str, str]:
    """Environment a Ray client needs for the local cluster's token authentication."""
    if target().local:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path())}
    return {}


def apply_auth_env() -> None:
    for key, value in auth_env().items():
        os.environ.setdefault(key, value)


def is_up(jobs_url: str | None = None, timeout: float = 2.0) -> bool:
    url = jobs_url or target().jobs_url
    try:
        # Any answer means the dashboard is up: with token auth on it answers 401 here.
        return httpx.get(f"{url}/api/version", timeout=timeout).status_code < 500
    except httpx.HTTPError:
        return False


def _ray_bin() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def _ensure_token() -> Path:
    """The local cluster's Ray token: made 0600 from the start (O_EXCL: no window in which
    another user could read it), kept when it exists."""
    path = token_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    return path


# Ray settings for the local cluster: the environment of `ray start`, which every Ray process
# it starts reads. A value already in the environment wins.
RAY_SETTINGS = {
    # At the first driver that connects (for Ray Jobs: the dashboard agent's, at the first
    # submission) the raylet prestarts one idle worker per CPU. orch never uses them: every
    # actor of a job carries its Ray Job's runtime env, so it gets a worker process of its
    # own. They only import Ray (about a CPU-second each, one per CPU: 64 on a 64-core
    # node) while the first job starts, and are then killed as idle.
    "RAY_prestart_worker_first_driver": "0",
}


# The local ports orch and its Ray cluster listen on, by setting.
LOCAL_PORTS = ("server_port", "ray_port", "ray_dashboard_port", "ray_client_port",
               "ray_agent_port")


def check_local_ports() -> None:
    """Refuse, in one line naming the settings, local port settings Ray would trip over:
    the Ray client port inside Ray's worker ports (checked when the settings are read), or
    two of the local ports the same. Called before anything starts (`orch up`, and the
    CLI starting the local server on demand), so a bad setting never ends in Ray's
    traceback or a half-started cluster."""
    from orchestrator.errors import SettingsError
    from orchestrator.settings import env_name

    settings = get_settings()  # a client port in the worker range is refused here
    if not target().local or settings.executor != "ray":
        return  # no local Ray cluster to start
    by_port: dict[int, list[str]] = {}
    for name in LOCAL_PORTS:
        by_port.setdefault(int(getattr(settings, name)), []).append(env_name(name))
    clashes = [f"{' and '.join(names)} are both {port}; give each its own port"
               for port, names in by_port.items() if len(names) > 1]
    if clashes:
        raise SettingsError(clashes)


def _listening(port: int) -> bool:
    """Something accepts connections on this local port (Ray's GCS listens on every
    interface, so loopback reaches it)."""
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_up(jobs_url: str, timeout: float) -> bool:
    """Whether the dashboard answers within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if is_up(jobs_url, timeout=min(10.0, max(0.5, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def start_local(num_cpus: int | None = None, num_gpus: int | None = None,
                settle_timeout: float = 30.0, head_wait: float = 120.0) -> ClusterTarget:
    """Start the local cluster unless it is already up, then wait (at most `settle_timeout`
    seconds) until it has finished starting up (see `wait_settled`). Idempotent: a head
    already on the cluster's port is waited for (at most `head_wait` seconds), not started
    again."""
    tgt = target()
    check_local_ports()
    if not tgt.local:
        raise ClusterError("RAY_ADDRESS points at an existing cluster; orch does not start it")
    if is_up(tgt.jobs_url):
        return tgt
    if _listening(ray_port()):
        # A head already holds our GCS port: one still starting, or a dashboard too busy to
        # answer within is_up's 2 s on a loaded machine. A second `ray start` would only be
        # refused ("already running"): wait for this one instead.
        if wait_up(tgt.jobs_url, timeout=head_wait):
            return tgt
        raise ClusterError(
            f"a Ray head holds port {ray_port()} (ORCH_RAY_PORT), but its dashboard at "
            f"{tgt.jobs_url} did not answer within {head_wait:.0f}s; `orch down` stops a "
            "cluster of orch's, or give orch another port")
    _ensure_token()
    num_cpus = num_cpus if num_cpus is not None else get_settings().ray_num_cpus
    num_gpus = num_gpus if num_gpus is not None else get_settings().ray_num_gpus
    cmd = [
        _ray_bin(), "start", "--head",
        f"--port={ray_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port()}",
        # Ray's other fixed ports, settable so that two local clusters can share a machine.
        f"--ray-client-server-port={get_settings().ray_client_port}",
        f"--dashboard-agent-listen-port={get_settings().ray_agent_port}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        # On a CPU machine this declares fake GPU capacity: GPU scheduling is exercised and
        # training falls back to the CPU.
        cmd.append(f"--num-gpus={num_gpus}")
    env = {**RAY_SETTINGS, **os.environ, **auth_env()}
    env.pop("RAY_ADDRESS", None)
    log = get_settings().home_dir() / "ray" / "ray-start.log"
    with log.open("w") as out:
        # umask 077: Ray's session files and logs (/tmp/ray/...) hold what its jobs carry
        # (an attempt's token among them); only this user may read them.
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
                              umask=0o077)
    if proc.returncode != 0 or not wait_up(tgt.jobs_url, timeout=head_wait):
        tail = log.read_text()[-1500:]
        raise ClusterError(f"could not start the local Ray cluster (see {log}):\n{tail}")
    if settle_timeout > 0:
        waited = wait_settled(settle_timeout)
        with log.open("a") as out:
            out.write(f"orch: the cluster settled {waited:.1f}s after `ray start` returned "
                      f"(limit {settle_timeout:.0f}s)\n")
    return tgt


def wait_settled(timeout: float = 30.0, busy_cores: float = 0.15, window: float = 2.0) -> float:
    """Wait until the local cluster's processes, together, use less than `busy_cores` of
    a CPU over `window` seconds; at most `timeout` seconds. Returns the seconds waited.

    `ray start` returns while the dashboard's modules, the agents and the monitors are
    still importing and registering (several CPU-seconds); a job submitted meanwhile
    competes with them for the CPU. An idle cluster uses about 0.05 of a core. Cheap:
    a few psutil reads every half second.
    """
    import psutil

    started = time.monotonic()
    procs: dict[int, psutil.Process] = {}
    samples: list[tuple[float, float]] = []  # (time, CPU seconds of all known processes)
    cpu: dict[int, float] = {}
    last_search = -1e9
    while True:
        now = time.monotonic()
        if now - last_search >= window:  # new processes appear while it starts
            procs.update({p.pid: p for p in local_cluster_processes()})
            last_search = now
        for pid, proc in list(procs.items()):
            try:
                times = proc.cpu_times()
                cpu[pid] = times.user + times.system
            except psutil.Error:
                del procs[pid]  # exited: its last reading stands
        samples.append((now, sum(cpu.values())))
        # The quietness of the last `window`: only processes seen throughout it count fully,
        # so a process found late (its whole start-up counted at once) keeps us waiting.
        earlier = [s for s in samples if s[0] <= now - window]
        if earlier and (samples[-1][1] - earlier[-1][1]) / (now - earlier[-1][0]) < busy_cores:
            return now - started
        if now - started >= timeout:
            return now - started
        time.sleep(0.5)


def _our_ports() -> set[int]:
    """The TCP ports our local cluster's processes listen on (from the same settings
    `start_local` passes to `ray start`)."""
    return {ray_port(), dashboard_port(), get_settings().ray_client_port,
            get_settings().ray_agent_port}


# A session directory, /tmp/ray/session_2026-01-31_12-00-00_123456_789, in a command line
# (an argument may hold a whole command line: the raylet's agent commands) or a file path.
_SESSION_DIR = re.compile(r"(/[^\s'\"=]*?/session_[^/\s'\"]+)")


def local_cluster_processes() -> list[psutil.Process]:
    """Every process of the local cluster on our port, and of no other cluster.

    Ours are: the processes with an argument ending in our GCS port (gcs_server, raylet,
    dashboard, monitors, client server); those naming one of their session directories;
    and all their descendants. The descendants matter: Ray retitles its agents
    (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`), its workers (`ray::IDLE`,
    `ray::<Actor>`) and the dashboard's module processes, so their command lines name
    neither the port nor the session. A retitled process orphaned by an earlier,
    incomplete stop (no longer anyone's descendant), or one listening on our dashboard,
    client or agent port, is ours when its session is: when a file it has open lies in a
    session directory whose GCS port (Ray's `gcs_server_port_*` file there) is ours. Ray's
    own defaults for those three ports are orch's, so a port alone proves nothing: it may
    be a plain `ray start` cluster's.
    """
    import psutil

    port = ray_port()
    me = os.getpid()
    # An argument ending in our port: --gcs_server_port=6390, --gcs-address=10.0.0.1:6390.
    marks = (f"={port}\0", f":{port}\0")
    found: dict[int, psutil.Process] = {}
    procs: dict[int, tuple[psutil.Process, list[str]]] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == me:
            continue
        cmdline = proc.info["cmdline"] or []
        procs[proc.pid] = (proc, cmdline)
        if any(mark in "\0".join(cmdline) + "\0" for mark in marks):
            found[proc.pid] = proc
    verdicts = {d: True for pid in found for d in _SESSION_DIR.findall(" ".join(procs[pid][1]))}

    def ours(session_dir: str) -> bool:
        if session_dir not in verdicts:
            verdicts[session_dir] = any(
                f.read_text().strip() == str(port)
                for f in Path(session_dir).glob("gcs_server_port_*") if f.is_file())
        return verdicts[session_dir]

    for pid, (_, cmdline) in procs.items():  # those naming one of our sessions
        if pid not in found and any(map(ours, _SESSION_DIR.findall(" ".join(cmdline)))):
            found[pid] = procs[pid][0]
    _add_descendants(found, procs)
    # Retitled processes that are nobody's descendant any more, and listeners on our
    # other ports: ours if their open files lie in one of our sessions.
    suspects = {pid for pid, (_, cmdline) in procs.items()
                if cmdline and cmdline[0].startswith(("ray::", "ray-dashboard-"))}
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in _our_ports():
                suspects.add(conn.pid)
    for pid in suspects - found.keys():
        if pid in procs and any(ours(d) for path in _open_paths(procs[pid][0])
                                for d in _SESSION_DIR.findall(path)):
            found[pid] = procs[pid][0]
    _add_descendants(found, procs)
    return list(found.values())


def _add_descendants(found: dict[int, psutil.Process],
                     procs: dict[int, tuple[psutil.Process, list[str]]]) -> None:
    children: dict[int, list[int]] = {}
    for pid, (proc, _) in procs.items():
        with contextlib.suppress(Exception):
            children.setdefault(proc.ppid(), []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = procs[child][0]
                todo.append(child)


def _open_paths(proc: psutil.Process) -> list[str]:
    import psutil

    try:
        return [f.path for f in proc.open_files()]
    except psutil.Error:
        return []


def stop_local(timeout: float = 15.0) -> None:
    """Stop the local cluster on our port, and only it.

    Not `ray stop`: that kills every Ray process of the machine, including other users' and
    other test sessions' clusters. See `local_cluster_processes` for which processes are
    ours; all of them are collected before any is signalled, as a raylet that exits first
    would otherwise orphan its agents and workers (re-parented, no longer found as its
    descendants).

    The GCS server goes last: on SIGTERM the raylet and the autoscaler monitor still talk
    to it (the monitor publishes its exit through it), and with the GCS gone first they
    wait out their RPC retries, 15 s and more, where in this order everything has exited
    within a few seconds. What is still alive after `timeout` (per stage) is killed.
    """
    import psutil

    if not target().local:
        raise ClusterError("RAY_ADDRESS points at an existing cluster; orch does not stop it")
    procs = local_cluster_processes()
    gcs = [p for p in procs if _is_gcs_server(p)]
    for stage in ([p for p in procs if p not in gcs], gcs):
        for proc in stage:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(stage, timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


def _is_gcs_server(proc: psutil.Process) -> bool:
    import psutil

    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]) == "gcs_server"


@dataclass(frozen=True)
class Capacity:
    gpus: int
    cpus: int
    nodes: int
    # The largest single node (0: unknown): more workers than it holds means a multi-node job.
    node_gpus: int = 0
    node_cpus: int = 0


def capacity(jobs_url: str | None = None) -> Capacity:
    """Total GPUs and CPUs of the cluster's alive nodes (from Ray's state API)."""
    from ray.util.state import list_nodes

    apply_auth_env()
    try:
        nodes = list_nodes(address=jobs_url or target().jobs_url, detail=True)
    except Exception as exc:  # the state API raises several kinds of error
        raise ClusterError(f"cannot read the cluster's nodes: {exc}") from exc
    alive = [n for n in nodes if n.state == "ALIVE"]
    return Capacity(
        gpus=int(sum(n.resources_total.get("GPU", 0) for n in alive)),
        cpus=int(sum(n.resources_total.get("CPU", 0) for n in alive)),
        nodes=len(alive),
        node_gpus=int(max((n.resources_total.get("GPU", 0) for n in alive), default=0)),
        node_cpus=int(max((n.resources_total.get("CPU", 0) for n in alive), default=0)),
    )
