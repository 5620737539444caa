"""Authentication: the gate in front of every route (before any body is read), the two
modes, the local server's token file, and the refusal to listen on a public address
without user accounts."""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi import Depends, WebSocket
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from orchestrator import cli
from orchestrator.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    MAX_BODY,
    TOKEN_COOKIE,
    User,
    current_user,
)
from orchestrator.cluster import Capacity
from orchestrator.dashboard import OPEN_PATHS
from orchestrator.errors import SettingsError
from orchestrator.local_token import LocalTokenRefused, ensure_local_token, read_local_token
from orchestrator.server import ControlPlane, check_start, create_app
from orchestrator.settings import get_settings
from orchestrator.store import Store
from tests.support import FakeExecutor, as_local_user, served, team_api

Headers = dict[str, dict[str, str]]


@pytest.fixture
def team(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Headers]]:
    monkeypatch.setenv("ORCH_AUTH", "users")
    with team_api(store) as (client, headers):
        yield client, headers


def every_route(app) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(method, path) of every route the app serves (included routers' too), path
    parameters filled in."""
    found = []
    for route in iter_route_contexts(app.routes):
        path = (route.path or "").replace("{job_id}", "1").replace("{name}", "alice")
        found += [(method, path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return found


def test_every_route_but_health_needs_a_valid_token(team: tuple[TestClient, Headers]) -> None:
    client, headers = team
    routes = every_route(client.app)
    assert ("GET", "/docs") in routes and ("POST", "/users") in routes  # nothing left out
    # The dashboard's open pages authenticate themselves (they redirect to the login page and
    # show nothing without a session: tests/orchestrator/dashboard/test_session.py).
    dashboard = [p for p in OPEN_PATHS if p != "/"]
    routes = [(m, p) for m, p in routes
              if not (p == "/" or p in OPEN_PATHS or any(p.startswith(d) for d in dashboard
                                                          if d.endswith("/")))]
    assert ("GET", "/ui/api/jobs") in routes  # the dashboard's JSON is closed like the API
    for method, path in routes:
        for sent in ({}, {"Authorization": "Bearer orch_u_wrong"},
                     {"Authorization": "Bearer orch_w_wrong"}, {"X-Orch-User": "root"}):
            expected = 200 if path == "/health" else 401
            answer = client.request(method, path, headers=sent, json={})
            assert answer.status_code == expected, (method, path, sent, answer.text)
    # The API's description is for users too; with a token it is served.
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path, headers=headers["bob"]).status_code == 200


def test_a_malformed_authorization_header_is_401_never_500(
        team: tuple[TestClient, Headers]) -> None:
    client, _ = team
    for value in ("Bearer \u00e9t\u00e9".encode("latin-1"), b"Bearer", b"Bearer a b",
                  b"Basic YTpi", b"Bearer \x01", b"token orch_u_x",
                  "Bearer orch_u_\u00ff".encode("latin-1")):
        for path in ("/jobs", "/worker/job"):
            answer = client.get(path, headers={"Authorization": value})  # type: ignore[dict-item]
            assert answer.status_code == 401, (path, value, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"


def _call(app, path: str, headers: dict[str, str]) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """POST straight into the ASGI app with a body that never ends; (status, how many times
    the app asked for body bytes)."""
    asked, status = 0, 0

    async def receive() -> dict:
        nonlocal asked
        asked += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("testserver", 80),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    return status, asked


def test_authentication_comes_before_the_body_is_read(team: tuple[TestClient, Headers]) -> None:
    client, headers = team
    json = {"Content-Type": "application/json"}
    # No token, or a bad one: refused without a single byte of the body read.
    assert _call(client.app, "/jobs", json) == (401, 0)
    assert _call(client.app, "/jobs", {**json, "Authorization": "Bearer orch_u_x"}) == (401, 0)
    assert _call(client.app, "/worker/metrics", json) == (401, 0)
    # A valid token and a body without a declared length: read until it passes the cap.
    status, asked = _call(client.app, "/jobs", {**json, **headers["bob"]})
    assert status == 413 and asked == MAX_BODY // 65536 + 1
    # A declared length over the cap: refused before reading.
    assert _call(client.app, "/jobs", {**json, **headers["bob"],
                                       "Content-Length": str(MAX_BODY + 1)}) == (413, 0)


def test_over_real_http_a_huge_body_without_a_token_is_refused_at_once(
        team: tuple[TestClient, Headers], store: Store) -> None:
    _, headers = team
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=1, cpus=4, nodes=1), interval=3600)
    app = create_app(plane)
    with TestClient(app), served(app) as url:  # the TestClient runs the app's lifespan
        port = int(url.rsplit(":", 1)[1])
        for auth in ("", f"Authorization: {headers['bob']['Authorization']}\r\n"):
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                # 100 MB promised, 1 KB sent: an answer now means nobody waited for the rest.
                conn.sendall(f"POST /jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: "
                             f"application/json\r\nContent-Length: {100 * 2**20}\r\n\r\n"
                             .encode() + b"{" * 1024)
                answer = conn.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 401" if not auth else "HTTP/1.1 413"), answer
            assert time.monotonic() - started < 5


def test_the_dashboard_cookie_and_its_csrf_check(team: tuple[TestClient, Headers]) -> None:
    client, headers = team
    token = headers["bob"]["Authorization"].split()[1]
    client.cookies.set(TOKEN_COOKIE, token)
    client.cookies.set(CSRF_COOKIE, "c" * 32)
    try:
        assert client.get("/whoami").json()["name"] == "bob"
        # A change needs the CSRF header that equals the CSRF cookie.
        assert client.post("/jobs/1/cancel").status_code == 403
        assert client.post("/jobs/1/cancel", headers={CSRF_HEADER: "d" * 32}).status_code == 403
        assert client.post("/jobs/1/cancel", headers={CSRF_HEADER: "c" * 32}).status_code == 404
    finally:
        client.cookies.clear()


def test_a_websocket_needs_a_token_too(team: tuple[TestClient, Headers]) -> None:
    client, headers = team

    async def probe(websocket: WebSocket, user: User = Depends(current_user)) -> None:
        await websocket.accept()
        await websocket.send_text(user.name)
        await websocket.close()

    client.app.add_api_websocket_route("/probe", probe)  # type: ignore[attr-defined]
    with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/probe"):
        pass
    assert refused.value.code == 1008
    with client.websocket_connect("/probe", headers=headers["bob"]) as socket_:
        assert socket_.receive_text() == "bob"


def test_local_mode_takes_only_the_local_token(store: Store) -> None:
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=1, cpus=4, nodes=1), interval=3600)
    assert plane.settings.auth == "local"
    _, alice = store.create_user("alice", actor="op", role="admin")
    with TestClient(create_app(plane, local_token=None)) as client:
        assert client.get("/jobs").status_code == 401
        assert client.get("/jobs", headers={"Authorization": f"Bearer {alice.token}"}
                          ).status_code == 401  # a team token is no key to a local server
        me = as_local_user(client).get("/whoami").json()
        assert (me["name"], me["role"], me["auth"]) == (getpass.getuser(), "admin", "local")
        assert me["max_priority"] == 100 and me["gpu_cap"] is None
        answer = client.post("/users", json={"name": "bob"})
        assert answer.status_code == 409 and "--auth users" in answer.json()["detail"]


# -- the local token file ------------------------------------------------------------------
def test_the_local_token_file_is_made_0600_and_reused(tmp_path: Path) -> None:
    os.umask(0o022)
    token = ensure_local_token(tmp_path)
    path = tmp_path / "api_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token
    assert token.startswith("orch_l_")
    assert ensure_local_token(tmp_path) == token == read_local_token(tmp_path)


@pytest.mark.parametrize("planted", ["wide", "link", "foreign", "garbage", "dir"])
def test_an_untrustworthy_token_file_stops_the_server(tmp_path: Path, planted: str) -> None:
    path = tmp_path / "api_token"
    good = "orch_l_" + "a" * 43
    if planted == "link":
        (tmp_path / "elsewhere").write_text(good)
        path.symlink_to(tmp_path / "elsewhere")
    elif planted == "dir":
        path.mkdir()
    else:
        path.write_text("not a token" if planted == "garbage" else good)
        path.chmod(0o644 if planted == "wide" else 0o600)
    if planted == "foreign":
        if os.getuid() != 0:
            pytest.skip("making a file of another user needs root")
        os.chown(path, 4242, 4242)
    words = {"wide": "mode 0644, not 0600", "link": "not a regular file",
             "foreign": "belongs to uid 4242", "garbage": "does not hold a token orch made",
             "dir": "not a regular file"}[planted]
    with pytest.raises(LocalTokenRefused, match=words) as caught:
        ensure_local_token(tmp_path)
    assert "\n" not in str(caught.value) and f"remove {path}" in str(caught.value)


# -- where a server may listen ---------------------------------------------------------------
@pytest.mark.parametrize(("host", "auth", "ok"), [
    ("127.0.0.1", "local", True), ("localhost", "local", True), ("::1", "local", True),
    ("127.0.0.2", "local", True), ("0.0.0.0", "local", False), ("10.1.2.3", "local", False),
    ("orch.internal", "local", False), ("0.0.0.0", "users", True), ("::", "users", True)])
def test_a_reachable_server_needs_user_accounts(host: str, auth: str, ok: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_AUTH", auth)
    if ok:
        check_start(host, get_settings())
        return
    with pytest.raises(SettingsError, match=f"--host {host}: .* --auth users"):
        check_start(host, get_settings())


def test_orch_server_refuses_a_public_host_in_one_line(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ORCH_AUTH", raising=False)
    result = CliRunner().invoke(cli.cli, ["server", "--host", "0.0.0.0", "--auth", "local"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "--auth users" in result.output
    assert not (tmp_path / "api_token").exists()  # refused before anything was made
