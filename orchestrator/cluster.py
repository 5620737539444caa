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
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from orchestrator.errors import ClusterError
from orchestrator.settings import get_settings


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
    path = token_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def start_local(num_cpus: int | None = None, num_gpus: int | None = None) -> ClusterTarget:
    """Start the local cluster unless it is already up. Idempotent."""
    tgt = target()
    if not tgt.local:
        raise ClusterError("RAY_ADDRESS points at an existing cluster; orch does not start it")
    if is_up(tgt.jobs_url):
        return tgt
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
    env = {**os.environ, **auth_env()}
    env.pop("RAY_ADDRESS", None)
    log = get_settings().home_dir() / "ray" / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not is_up(tgt.jobs_url, timeout=10):
        tail = log.read_text()[-1500:]
        raise ClusterError(f"could not start the local Ray cluster (see {log}):\n{tail}")
    return tgt


def stop_local(timeout: float = 15.0) -> None:
    """Stop the local cluster on our port, and only it.

    Not `ray stop`: that kills every Ray process of the machine, including other users' and
    other test sessions' clusters. Ours are the processes that name our GCS port or our
    session directory (read from our GCS server's command line); the workers die with their
    raylet.
    """
    import psutil

    if not target().local:
        raise ClusterError("RAY_ADDRESS points at an existing cluster; orch does not stop it")
    port = ray_port()
    # An argument ending in our port: --gcs_server_port=6390, --gcs-address=10.0.0.1:6390.
    marks = (f"={port}\0", f":{port}\0")
    procs: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        line = "\0".join(proc.info["cmdline"] or []) + "\0"
        if proc.pid != os.getpid() and any(mark in line for mark in marks):
            procs.append(proc)
    sessions = set()
    for proc in procs:
        for arg in proc.info["cmdline"] or []:
            if "/session_" in arg:
                sessions.add(arg[arg.index("/session_"):].split("/")[1])
    if sessions:
        for proc in psutil.process_iter(["cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if proc not in procs and any(f"/{s}/" in line or line.endswith(f"/{s}") for s in sessions):
                procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


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
