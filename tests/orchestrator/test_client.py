"""The CLI's HTTP client: a read survives one broken connection, a write is never re-sent."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from orchestrator import client
from orchestrator.errors import ServerUnreachable

URL = "http://orch.test"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The process's HTTP client replaced by one whose first request of each method breaks
    its connection (as a reset under load does) and whose later ones answer."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if seen.count(request.method) == 1:
            raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
        return httpx.Response(200, json={"ok": request.method})

    monkeypatch.setattr(client, "_HTTP", httpx.Client(transport=httpx.MockTransport(handler)))
    monkeypatch.setattr(client.time, "sleep", lambda seconds: None)
    yield seen


def test_a_read_is_tried_again_after_a_broken_connection(calls: list[str]) -> None:
    assert client.Client(URL, "t").get("/jobs") == {"ok": "GET"}
    assert calls == ["GET", "GET"]


def test_a_write_is_not_sent_twice(calls: list[str]) -> None:
    with pytest.raises(ServerUnreachable, match="cannot reach the orch server at http://orch.test"):
        client.Client(URL, "t").post("/jobs", {"spec_yaml": "x"})
    assert calls == ["POST"]


def failing(monkeypatch: pytest.MonkeyPatch, error: type[httpx.TransportError]) -> list[str]:
    """The process's HTTP client replaced by one whose every request fails with `error`;
    the requests it saw."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        raise error("no answer", request=request)

    monkeypatch.setattr(client, "_HTTP", httpx.Client(transport=httpx.MockTransport(handler)))
    monkeypatch.setattr(client.time, "sleep", lambda seconds: None)
    return seen


def test_a_read_that_keeps_failing_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = failing(monkeypatch, httpx.ConnectError)
    with pytest.raises(ServerUnreachable, match="cannot reach the orch server.*no answer"):
        client.Client(URL, "t").get("/jobs")
    assert seen == ["GET", "GET"]


def test_a_timeout_is_not_waited_out_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = failing(monkeypatch, httpx.ReadTimeout)
    with pytest.raises(ServerUnreachable):
        client.Client(URL, "t").get("/jobs")
    assert seen == ["GET"]


def test_idle_connections_are_dropped_before_the_server_drops_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "_HTTP", None)
    pool = client.http()._transport._pool  # type: ignore[attr-defined]
    assert pool._keepalive_expiry < 5  # uvicorn's keep-alive timeout
