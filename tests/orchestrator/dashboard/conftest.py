"""An in-process control plane serving the dashboard (the real app and store; Ray replaced
by the recording fake), with a browser-like client that keeps cookies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.cluster import Capacity
from orchestrator.server import ControlPlane, create_app
from orchestrator.store import Store
from tests.support import FakeExecutor

SHARED_TOKEN = "orch_dashboard_unit_test_token"


@dataclass
class Dash:
    client: TestClient  # a browser: keeps cookies, does not follow redirects
    store: Store
    plane: ControlPlane
    token: str  # the local server's token
    home: Path

    def sign_in(self) -> None:
        response = self.client.get(f"/login?token={self.token}")
        assert response.status_code == 303, response.text


@pytest.fixture
def dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Dash]:
    home = tmp_path / "home"
    monkeypatch.setenv("ORCH_HOME", str(home))
    monkeypatch.setenv("ORCH_AUTH", "local")
    # Servers without a token file of their own take the shared ORCH_API_TOKEN.
    monkeypatch.setenv("ORCH_API_TOKEN", SHARED_TOKEN)
    store = Store(f"sqlite:///{tmp_path}/orch.db")
    plane = ControlPlane(store, FakeExecutor(), Capacity(gpus=4, cpus=64, nodes=1),
                         interval=3600)
    # No scheduler loop: a test admits jobs when it means to (plane.scheduler.tick()).
    monkeypatch.setattr(plane, "start", lambda: None)
    monkeypatch.setattr(plane, "stop", lambda: None)
    app = create_app(plane)
    token: Any = getattr(app.state, "local_token", None) or SHARED_TOKEN
    try:
        with TestClient(app, follow_redirects=False) as client:
            yield Dash(client=client, store=store, plane=plane, token=token, home=home)
    finally:
        store.close()
