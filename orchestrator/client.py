"""HTTP client of the control plane, and the local control plane's lifecycle.

`ORCH_SERVER_URL` set: a team's server (with `ORCH_API_TOKEN` if it needs one).
Otherwise the CLI uses a local server on 127.0.0.1:`ORCH_SERVER_PORT` (8770), starting it
detached when none answers, as SkyPilot's CLI does with its API server.
"""

from __future__ import annotations

import fcntl
import getpass
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from orchestrator.config import orch_home


class OrchError(RuntimeError):
    """An error to show the user as one line (no traceback)."""


def local_port() -> int:
    return int(os.environ.get("ORCH_SERVER_PORT", "8770"))


def local_url() -> str:
    return f"http://127.0.0.1:{local_port()}"


def _pid_file() -> Path:
    return orch_home() / "server.pid"


def server_log() -> Path:
    return orch_home() / "server.log"


def _health(url: str, timeout: float = 2) -> str:
    """"up", "down" (nothing listens) or "busy" (something listens but is slow)."""
    try:
        ok = httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.ConnectError:
        return "down"
    except httpx.HTTPError:
        return "busy"
    return "up" if ok else "busy"


def _server_pid() -> int | None:
    """The pid in the pid file, if that process is alive."""
    try:
        pid = int(_pid_file().read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"orchestrator.cli" not in cmdline.read_bytes():
        return None  # the pid was reused by another program
    return pid


def start_local_server(timeout: float = 120) -> str:
    """Start the local control plane (and through it the local Ray cluster) if needed.

    Only a port nobody listens on, with no live server process on record, means "no
    server": a slow server (busy, or still starting) is waited for, never duplicated.
    """
    url = local_url()
    if _health(url) == "up":
        return url
    home = orch_home()
    home.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    # One starter at a time: many CLIs racing on a cold machine start one server.
    with (home / "server.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = None
        if _health(url) == "down" and _server_pid() is None:
            with server_log().open("ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "orchestrator.cli", "server",
                     "--host", "127.0.0.1", "--port", str(local_port())],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,  # outlives this CLI and its terminal
                )
            _pid_file().write_text(str(proc.pid))
        while time.monotonic() < deadline:
            if _health(url) == "up":
                return url
            if proc is not None and proc.poll() is not None:
                _pid_file().unlink(missing_ok=True)
                tail = server_log().read_text(errors="replace")[-1200:]
                raise OrchError(f"the local orch server exited while starting; log {server_log()}:\n{tail}")
            time.sleep(0.2)
    raise OrchError(f"the local orch server did not answer within {timeout:.0f}s; see {server_log()}")


def stop_local_server(timeout: float = 20) -> bool:
    """Stop the local control plane. Jobs keep running on Ray; the store keeps their state."""
    pid_file = _pid_file()
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (ValueError, ProcessLookupError):
        pid_file.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


class Client:
    def __init__(self, url: str | None = None, token: str | None = None,
                 user: str | None = None) -> None:
        configured = os.environ.get("ORCH_SERVER_URL")
        self.url = (url or configured or "").rstrip("/")
        self._managed = not (url or configured)
        self.token = token or os.environ.get("ORCH_API_TOKEN")
        self.user = user or os.environ.get("ORCH_USER") or getpass.getuser()

    def _base(self) -> str:
        if not self.url:
            self.url = start_local_server() if self._managed else local_url()
        return self.url

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"X-Orch-User": self.user}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        base = self._base()
        try:
            response = httpx.request(method, f"{base}{path}", headers=headers, timeout=120,
                                     **kwargs)
        except httpx.HTTPError as exc:
            raise OrchError(f"cannot reach the orch server at {base} ({exc})") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text}
            problems = body.get("problems")
            detail = "; ".join(problems) if problems else body.get("detail", response.text)
            raise OrchError(str(detail))
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body or {})
