"""`orch users ...`: accounts and tokens of a team server (`orch server --auth users`).

Each command runs against the server (`ORCH_SERVER_URL`) with an admin's token
(`ORCH_API_TOKEN`), except `orch users add ... --database`, which writes straight to the
database (`ORCH_DATABASE_URL`): how the first admin is made, on the server's host.

A token is printed once, when it is made; the server keeps only its hash.
"""

from __future__ import annotations

import functools
import getpass
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from orchestrator.client import Client
from orchestrator.errors import InvalidRequest, OrchError

# The api models, rich and the settings are imported by the commands that use them: `orch`
# imports this module for every command, `orch --help` included.
if TYPE_CHECKING:
    from orchestrator.api import IssuedToken, UserCreated

F = TypeVar("F", bound=Callable[..., Any])
INT32 = click.IntRange(-(2**31), 2**31 - 1)
DAYS = click.IntRange(1, 3650)


def _friendly(fn: F) -> F:
    """The CLI's own one-line errors (`orchestrator.cli.friendly_errors`), looked up when the
    command runs: `orchestrator.cli` imports this module, so this one cannot import it first."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from orchestrator.cli import friendly_errors

        return friendly_errors(fn)(*args, **kwargs)

    return run  # type: ignore[return-value]


def _output(fn: F) -> F:
    return click.option("--output", "-o", type=click.Choice(["table", "json"]),
                        default="table", show_default=True,
                        help="table for people, json for scripts (stable keys)")(fn)


def _emit(output: str, data: Any, lines: Callable[[], None]) -> None:
    if output == "json":
        from orchestrator.cli import print_json

        print_json(data)
    else:
        lines()


def _console() -> Any:
    from orchestrator.cli import out

    return out


def _team_client() -> Client:
    """The team server's client; a plain local setup has no users to manage."""
    from orchestrator.settings import get_settings

    if not get_settings().server_url:
        raise OrchError("orch users manages a team server: set ORCH_SERVER_URL (a server "
                        "started with --auth users) and ORCH_API_TOKEN (an admin's token); on "
                        "the server's host, add the first admin with `orch users add NAME "
                        "--admin --database`")
    return Client()


def _print_token(token: IssuedToken) -> None:
    expiry = f", expires {token.expires_at.isoformat()[:19]}Z" if token.expires_at else ""
    click.echo(f"token {token.name} for {token.user}{expiry}; shown only now (orch keeps "
               "only its hash):", err=True)
    click.echo(token.token)


@click.group()
def users() -> None:
    """Users and API tokens of a team server (admins only)."""


@users.command("add")
@click.argument("name")
@click.option("--admin", is_flag=True, help="may manage users and cancel/resume any job")
@click.option("--gpu-cap", type=click.IntRange(0, 2**31 - 1),
              help="most GPUs the user's jobs may hold at once (default: ORCH_USER_GPU_CAP)")
@click.option("--max-priority", type=INT32,
              help="highest priority the user may submit at (default: ORCH_MAX_PRIORITY)")
@click.option("--token-name", help="name of the first token (default token-1)")
@click.option("--expires-in", type=DAYS, metavar="DAYS", help="the first token expires then")
@click.option("--database", is_flag=True,
              help="write straight to ORCH_DATABASE_URL (on the server's host: the first admin)")
@_output
@_friendly
def add(name: str, admin: bool, gpu_cap: int | None, max_priority: int | None,
        token_name: str | None, expires_in: int | None, database: bool, output: str) -> None:
    """Add user NAME; prints their first token."""
    from orchestrator.api import UserCreated

    role = "admin" if admin else "user"
    if database:
        created = _add_in_database(name, role, gpu_cap, max_priority, token_name, expires_in)
    else:
        created = _team_client().post_as(UserCreated, "/users", {
            "name": name, "role": role, "gpu_cap": gpu_cap, "max_priority": max_priority,
            "token_name": token_name, "expires_in_days": expires_in})

    def lines() -> None:
        click.echo(f"added user {created.user.name} ({created.user.role})", err=True)
        _print_token(created.token)

    _emit(output, created, lines)


def _add_in_database(name: str, role: str, gpu_cap: int | None, max_priority: int | None,
                     token_name: str | None, expires_in: int | None) -> UserCreated:
    from datetime import timedelta

    from orchestrator.api import IssuedToken, UserCreated, UserView
    from orchestrator.models import utcnow
    from orchestrator.settings import get_settings
    from orchestrator.store import Store

    expires_at = utcnow() + timedelta(days=expires_in) if expires_in else None
    with Store(get_settings().database()) as store:
        _, issued = store.create_user(name, actor=f"{getpass.getuser()} (--database)", role=role,
                                      gpu_cap=gpu_cap, max_priority=max_priority,
                                      token_name=token_name, expires_at=expires_at)
        account, tokens = next((a, t) for a, t in store.list_users() if a.name == name)
    return UserCreated(user=UserView.of(account, tokens), token=IssuedToken(
        user=issued.user, name=issued.name, token=issued.token, created_at=issued.created_at,
        expires_at=issued.expires_at))


@users.command("list")
@_output
@_friendly
def list_users(output: str) -> None:
    """Every user, their limits and their tokens (names only)."""
    from orchestrator.api import UserView

    found = _team_client().get_as(list[UserView], "/users")

    def lines() -> None:
        from rich.markup import escape
        from rich.table import Table

        table = Table("name", "role", "GPU cap", "max priority", "created", "disabled",
                      "live tokens")
        for u in found:
            live = [t for t in u.tokens if t.revoked_at is None]
            table.add_row(escape(u.name), u.role, _or_default(u.gpu_cap),
                          _or_default(u.max_priority), u.created_at.isoformat()[:19],
                          u.disabled_at.isoformat()[:19] if u.disabled_at else "",
                          escape(", ".join(_token_label(t) for t in live)))
        _console().print(table)

    _emit(output, found, lines)


def _or_default(value: int | None) -> str:
    return "default" if value is None else str(value)


def _token_label(token: Any) -> str:
    return token.name + (f" (expires {token.expires_at.isoformat()[:10]})"
                         if token.expires_at else "")


@users.command("token")
@click.argument("name")
@click.option("--name", "token_name", help="the token's name (default token-<n>)")
@click.option("--expires-in", type=DAYS, metavar="DAYS", help="the token expires then")
@_output
@_friendly
def token(name: str, token_name: str | None, expires_in: int | None, output: str) -> None:
    """Issue another token for user NAME; prints it."""
    from orchestrator.api import IssuedToken

    issued = _team_client().post_as(IssuedToken, f"/users/{_path(name)}/tokens",
                                    {"name": token_name, "expires_in_days": expires_in})
    _emit(output, issued, lambda: _print_token(issued))


@users.command("revoke")
@click.argument("target", metavar="NAME|NAME/TOKEN")
@_output
@_friendly
def revoke(target: str, output: str) -> None:
    """Revoke every live token of user NAME, or (NAME/TOKEN) only the token named TOKEN,
    e.g. `orch users revoke alice/laptop`."""
    from orchestrator.api import RevokeResponse

    name, slash, token_name = target.partition("/")
    if not name or (slash and (not token_name or "/" in token_name)):
        raise InvalidRequest(f"{target!r}: give NAME (all of the user's tokens) or NAME/TOKEN "
                             "(one token, by the name `orch users list` shows)")
    done = _team_client().post_as(RevokeResponse, f"/users/{_path(name)}/revoke",
                                  {"token": token_name or None})
    _emit(output, done, lambda: click.echo(
        f"revoked {len(done.revoked)} token(s) of {done.user}: {', '.join(done.revoked)}"
        if done.revoked else f"{done.user} had no live tokens"))


@users.command("disable")
@click.argument("name")
@_output
@_friendly
def disable(name: str, output: str) -> None:
    """Disable user NAME: their tokens stop working (and are revoked); their jobs stay."""
    from orchestrator.api import UserView

    view = _team_client().post_as(UserView, f"/users/{_path(name)}/disable")
    _emit(output, view, lambda: click.echo(f"disabled user {view.name}"))


@users.command("audit")
@click.option("--user", "target", help="only changes to this user")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@_output
@_friendly
def audit(target: str | None, limit: int, output: str) -> None:
    """Who changed which user or token, newest first."""
    from orchestrator.api import AuditView

    events = _team_client().get_as(list[AuditView], "/audit", target=target, limit=limit)

    def lines() -> None:
        from rich.markup import escape
        from rich.table import Table

        table = Table("at", "by", "action", "user", "details")
        for e in events:
            details = ", ".join(f"{k}={v}" for k, v in sorted(e.details.items()) if v)
            table.add_row(e.at.isoformat()[:19], escape(e.actor), e.action, escape(e.target),
                          escape(details))
        _console().print(table)

    _emit(output, events, lines)


def _path(name: str) -> str:
    """A user name as a URL path segment (the server checks the name itself)."""
    from urllib.parse import quote

    return quote(name, safe="")
