"""HTTP client of the control plane, and the local control plane's lifecycle.

`ORCH_SERVER_URL` set: a team's server, with the user's token in `ORCH_API_TOKEN`.
Otherwise the CLI uses a local server on 127.0.0.1:`ORCH_SERVER_PORT` (8770). The verbs that
start work (submit, resume, predict, dashboard, up) start it detached when none answers, as
SkyPilot's CLI does with its API server; the verbs that only read (list, status, logs, ...)
never do: with no local server they say so and exit non-zero, so `orch list` after
`orch down` does not bring the server and its Ray cluster back. It sends the token
that server keeps in `$ORCH_HOME/api_token` (only to that loopback address, never to a
remote server). `ORCH_API_TOKEN`, when set, is sent instead.

Who the caller is comes from the token alone: nothing else the CLI sends names a user.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    OrchError,
    ServerUnreachable,
    SpecError,
    Unauthorized,
)
from orchestrator.local_token import read_local_token

# httpx, pydantic and the settings are imported where they are first needed: this module is
# imported by every `orch` command, `orch --help` included, and those imports are most of
# what a CLI process costs.
if TYPE_CHECKING:
    import httpx
    from pydantic import BaseModel, TypeAdapter

    from orchestrator.settings import Settings

T = TypeVar("T")
_BY_STATUS: dict[int, type[OrchError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound,
                                           409: Conflict, 422: InvalidRequest}


def get_settings() -> Settings:
    from orchestrator.settings import get_settings

    return get_settings()


def local_port() -> int:
    return get_settings().server_port


def local_url() -> str:
    return get_settings().local_server_url()


def _pid_file() -> Path:
    return get_settings().home_dir() / "server.pid"


def server_log() -> Path:
    return get_settings().home_dir() / "server.log"


def _health(url: str, timeout: float = 2) -> str:
    """"up", "down" (nothing listens) or "busy" (something listens but is slow)."""
    httpx = _httpx()
    try:
        ok = http().get(f"{url}/health", timeout=timeout).status_code == 200
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


NO_SERVER = ("no orch server is running at {url}; `orch up` starts one (or set ORCH_SERVER_URL "
             "to a team's server)")


def running_local_server(timeout: float = 120) -> str:
    """The local control plane's URL if one runs (a slow or starting one is waited for);
    never starts one."""
    url = local_url()
    state = _health(url)
    if state == "up":
        return url
    if state == "down" and _server_pid() is None:
        raise ServerUnreachable(NO_SERVER.format(url=url))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        state = _health(url)
        if state == "up":
            return url
        if state == "down" and _server_pid() is None:
            raise ServerUnreachable(NO_SERVER.format(url=url))
    raise ServerUnreachable(f"the local orch server did not answer within {timeout:.0f}s; see {server_log()}")


def start_local_server(timeout: float = 120) -> str:
    """Start the local control plane (and through it the local Ray cluster) if needed.

    Only a port nobody listens on, with no live server process on record, means "no
    server": a slow server (busy, or still starting) is waited for, never duplicated.
    The local settings are checked first: a bad one is one line, before anything starts.
    """
    url = local_url()
    if _health(url) == "up":
        return url
    import subprocess

    from orchestrator.cluster import check_local_ports

    check_local_ports()
    home = get_settings().home_dir()
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
                raise ServerUnreachable(f"the local orch server exited while starting; log "
                                        f"{server_log()}:\n{tail}")
            time.sleep(0.2)
    raise ServerUnreachable(f"the local orch server did not answer within {timeout:.0f}s; see {server_log()}")


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


_HTTP: httpx.Client | None = None


def _httpx() -> Any:
    """httpx, imported without its own command line (`httpx._main`), which imports rich
    and click's whole UI: a CLI process that needs neither would pay for both."""
    if "httpx" not in sys.modules and "httpx._main" not in sys.modules:
        sys.modules["httpx._main"] = None  # type: ignore[assignment]  # httpx falls back
        try:
            import httpx
        finally:
            if sys.modules.get("httpx._main", 0) is None:
                del sys.modules["httpx._main"]
    import httpx

    return httpx


def _may_use_tls() -> bool:
    """Whether this process's requests can meet TLS: an https server, or an https proxy."""
    proxies = [value for key, value in os.environ.items()
               if key.lower() in ("https_proxy", "http_proxy", "all_proxy")]
    return any(url.lower().startswith("https://")
               for url in [get_settings().server_url or "", *proxies])


def http() -> httpx.Client:
    """One HTTP client (one connection pool) per CLI process."""
    global _HTTP
    if _HTTP is None:
        import ssl

        # httpx's default context reads the whole CA bundle, which costs a CLI process a
        # tenth of a CPU-second. Talking plain HTTP (the local server, an http:// team
        # server) needs none: a context with no CAs, that still demands a verified
        # certificate, so a TLS connection it was not meant for fails instead of going
        # unchecked.
        verify: bool | ssl.SSLContext = (True if _may_use_tls()
                                         else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        httpx = _httpx()
        # An idle connection is dropped before the server drops it (uvicorn: after 5 s), so
        # a request never goes out on a connection the server is closing.
        _HTTP = httpx.Client(timeout=120, verify=verify,
                             limits=httpx.Limits(keepalive_expiry=4))
    return _HTTP


class Client:
    """The control plane's API, for the CLI: typed answers (orchestrator.api), and an
    OrchError with the server's one-line reason when it refuses.

    `start`: with no server configured, start the local one when none runs (the verbs that
    start work); otherwise a local server that is not running is an error."""

    def __init__(self, url: str | None = None, token: str | None = None, *,
                 start: bool = False) -> None:
        settings = get_settings()
        configured = settings.server_url
        self.url = (url or configured or "").rstrip("/")
        self._managed = not (url or configured)
        self._start = start
        self.token = token or settings.api_token

    def _base(self) -> str:
        if not self.url:
            if not self._managed:
                self.url = local_url()
            else:
                self.url = start_local_server() if self._start else running_local_server()
        return self.url

    def _token(self, base: str) -> str | None:
        """ORCH_API_TOKEN; else, for this machine's local server only, the token it keeps
        in $ORCH_HOME/api_token (read each time: the server makes it when it starts)."""
        if self.token:
            return self.token
        if base == local_url():
            return read_local_token(get_settings().home_dir())
        return None

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        base = self._base()
        httpx = _httpx()
        headers = {}
        if token := self._token(base):
            headers["Authorization"] = f"Bearer {token}"
        for attempt in (1, 2):
            try:
                response = http().request(method, f"{base}{path}", headers=headers, **kwargs)
                break
            except httpx.HTTPError as exc:
                # A read is tried once more after a broken connection (a reset under load):
                # `--wait` and `logs --follow` poll for hours and must not end on one. A
                # POST is not: the server may have acted on it.
                if (attempt == 1 and method == "GET" and isinstance(exc, httpx.TransportError)
                        and not isinstance(exc, httpx.TimeoutException)):
                    time.sleep(0.5)
                    continue
                raise ServerUnreachable(f"cannot reach the orch server at {base} ({exc})") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text}
            problems = body.get("problems") if isinstance(body, dict) else None
            detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
            if problems and response.status_code == 422:
                raise SpecError(problems)
            if response.status_code == 401 and not self._token(base):
                detail = f"{detail} (set ORCH_API_TOKEN to your token for {base})"
            raise _BY_STATUS.get(response.status_code, OrchError)(str(detail))
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self.request("POST", path, json=body or {})

    def get_as(self, kind: type[T], path: str, **params: Any) -> T:
        """GET, the answer validated as `kind` (an api model, or e.g. list[JobSummary])."""
        return _adapter(kind).validate_python(self.get(path, **params))

    def post_as(self, kind: type[T], path: str, body: dict[str, Any] | None = None) -> T:
        return _adapter(kind).validate_python(self.post(path, body))


def _adapter(kind: type[T]) -> TypeAdapter[T]:
    from pydantic import TypeAdapter

    return TypeAdapter(kind)


def dump(value: BaseModel | list[Any]) -> Any:
    """An api model (or list of them) as the JSON `-o json` prints: the API's own keys."""
    from pydantic import TypeAdapter

    return TypeAdapter(type(value)).dump_python(value, mode="json", by_alias=True)
