"""`orch users ...` and `orch whoami` through the real CLI and Client, against a team server
served in this process; `orch users add --database` against the database itself."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import orchestrator.client
from orchestrator import cli
from orchestrator.client import Client, local_url
from orchestrator.store import Store
from tests.support import team_api

Headers = dict[str, dict[str, str]]


def orch(*args: str) -> Result:
    return CliRunner().invoke(cli.cli, list(args), env={"COLUMNS": "200"})


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    """SQLite only: the store's own tests cover PostgreSQL; these are about the CLI."""
    monkeypatch.setenv("ORCH_HOME", str(tmp_path / "home"))
    with Store(f"sqlite:///{tmp_path}/orch.db") as store:
        yield store


@pytest.fixture
def team(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Headers]:
    """The CLI pointed at a team server, holding root's (an admin's) token."""
    monkeypatch.setenv("ORCH_AUTH", "users")
    with team_api(store) as (client, headers):
        monkeypatch.setenv("ORCH_SERVER_URL", "http://testserver")
        monkeypatch.setenv("ORCH_API_TOKEN", headers["root"]["Authorization"].split()[1])
        monkeypatch.setattr(orchestrator.client, "http", lambda: client)
        yield headers


def test_an_admin_adds_a_user_and_manages_their_tokens(team: Headers, store: Store) -> None:
    added = orch("users", "add", "dan", "--gpu-cap", "2", "-o", "json")
    assert added.exit_code == 0, added.output
    made = json.loads(added.stdout)
    assert made["user"]["name"] == "dan" and made["user"]["gpu_cap"] == 2
    assert made["token"]["token"].startswith("orch_u_") and made["token"]["name"] == "token-1"

    table = orch("users", "add", "eve", "--admin")
    assert table.exit_code == 0
    # The token alone on stdout (for scripts), what it is on stderr.
    [eve_token] = table.stdout.split()
    assert eve_token.startswith("orch_u_") and "shown only now" in table.stderr

    issued = orch("users", "token", "dan", "--name", "laptop", "--expires-in", "30")
    assert issued.exit_code == 0 and issued.stdout.strip().startswith("orch_u_")
    listed = {u["name"]: u for u in json.loads(orch("users", "list", "-o", "json").stdout)}
    assert [t["name"] for t in listed["dan"]["tokens"]] == ["token-1", "laptop"]
    assert made["token"]["token"] not in orch("users", "list").stdout

    assert orch("users", "revoke", "dan/laptop").stdout.strip() == (
        "revoked 1 token(s) of dan: laptop")
    assert json.loads(orch("users", "revoke", "dan", "-o", "json").stdout) == {
        "user": "dan", "revoked": ["token-1"]}
    assert orch("users", "disable", "dan").stdout.strip() == "disabled user dan"
    trail = json.loads(orch("users", "audit", "--user", "dan", "-o", "json").stdout)
    assert [(e["actor"], e["action"]) for e in trail] == [
        ("root", "user.disable"), ("root", "token.revoke"), ("root", "token.revoke"),
        ("root", "token.issue"), ("root", "user.create")]


def test_whoami_is_the_tokens_user(team: Headers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_API_TOKEN", team["alice"]["Authorization"].split()[1])
    me = json.loads(orch("whoami", "-o", "json").stdout)
    assert me == {"name": "alice", "role": "user", "auth": "users", "gpu_cap": 1,
                  "max_priority": 100}
    assert orch("whoami").stdout.startswith("alice (user) on http://testserver (auth users)")


def test_mistakes_are_one_line_and_exit_1(team: Headers) -> None:
    for args, words in ((("users", "revoke", "dan/"), "give NAME (all of the user's tokens)"),
                        (("users", "revoke", "/laptop"), "give NAME"),
                        (("users", "revoke", "nobody"), "no user nobody"),
                        (("users", "add", "Dan"), "name: 'Dan' is not a user name"),
                        (("users", "add", "alice"), "user alice already exists"),
                        (("users", "disable", "root"), "root is the last enabled admin")):
        result = orch(*args)
        assert result.exit_code == 1 and words in result.stderr, (args, result.output)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_a_user_is_not_an_admin(team: Headers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_API_TOKEN", team["bob"]["Authorization"].split()[1])
    result = orch("users", "add", "mallory", "--admin")
    assert result.exit_code == 1 and "only an admin may add users" in result.stderr


def test_without_a_team_server_users_says_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_SERVER_URL", raising=False)
    result = orch("users", "list")
    assert result.exit_code == 1 and "set ORCH_SERVER_URL" in result.stderr
    assert "--admin --database" in result.stderr


def test_the_first_admin_is_made_in_the_database(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/team.db"
    monkeypatch.setenv("ORCH_DATABASE_URL", url)
    monkeypatch.delenv("ORCH_SERVER_URL", raising=False)
    result = orch("users", "add", "alice", "--admin", "--database", "-o", "json")
    assert result.exit_code == 0, result.output
    token = json.loads(result.stdout)["token"]["token"]
    with Store(url) as store:
        found = store.user_for_token(token)
        assert found is not None and found[0].name == "alice" and found[0].role == "admin"
        [event] = store.audit_events()
        assert event.actor == f"{getpass.getuser()} (--database)"


def test_the_cli_sends_the_local_token_only_to_the_local_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ORCH_API_TOKEN", raising=False)
    monkeypatch.delenv("ORCH_SERVER_URL", raising=False)
    (tmp_path / "api_token").write_text("orch_l_secret")
    assert Client(url=local_url())._token(local_url()) == "orch_l_secret"
    assert Client(url="http://team:8770")._token("http://team:8770") is None
    monkeypatch.setenv("ORCH_API_TOKEN", "orch_u_mine")
    assert Client(url=local_url())._token(local_url()) == "orch_u_mine"
