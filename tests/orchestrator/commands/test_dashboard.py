"""`orch dashboard`: the address to open, signed in on a local server, plain on a team's."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.commands import dashboard as command


@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A local setup whose server is already up (nothing is started)."""
    for name in ("ORCH_SERVER_URL", "ORCH_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCH_HOME", str(tmp_path))
    monkeypatch.setattr(command, "start_local_server", lambda: "http://127.0.0.1:8770")
    return tmp_path


def test_a_local_server_gets_a_link_that_signs_in(local: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    token = "orch_l_" + "A1b2-_" * 7 + "x"  # the local server's token file, as it writes it
    path = local / "api_token"
    path.write_text(token)
    path.chmod(0o600)
    opened: list[str] = []
    monkeypatch.setattr(command.webbrowser, "open", lambda url: opened.append(url) or True)
    result = CliRunner().invoke(command.dashboard, ["--open"])
    assert result.exit_code == 0, result.output
    link = f"http://127.0.0.1:8770/login?token={token}"
    assert result.stdout.splitlines()[0] == link and opened == [link]
    assert "signs you in" in result.stderr


def test_the_cli_token_is_used_when_given(local: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_API_TOKEN", "given+token/=")
    result = CliRunner().invoke(command.dashboard, [])
    # Quoted for a URL: a "+" would arrive as a space.
    assert result.stdout.strip() == "http://127.0.0.1:8770/login?token=given%2Btoken%2F%3D"


def test_no_token_anywhere_prints_the_plain_address(local: Path) -> None:
    result = CliRunner().invoke(command.dashboard, [])
    assert result.exit_code == 0 and result.stdout.strip() == "http://127.0.0.1:8770/"


def test_a_team_server_never_gets_a_token_in_the_url(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("ORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ORCH_SERVER_URL", "https://orch.example.com/")
    monkeypatch.setenv("ORCH_API_TOKEN", "secret")
    monkeypatch.setattr(command, "start_local_server", lambda: pytest.fail("started a server"))
    result = CliRunner().invoke(command.dashboard, [])
    assert result.exit_code == 0 and result.stdout.strip() == "https://orch.example.com/"
    assert "secret" not in result.output


def test_a_browser_that_cannot_open_is_one_line(local: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command.webbrowser, "open", lambda url: False)
    result = CliRunner().invoke(command.dashboard, ["--open"])
    assert result.exit_code == 0 and "could not open a browser" in result.stderr
