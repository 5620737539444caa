"""Who is calling: every request's principal comes from a credential the server checks.

Two kinds of caller:
- a person (the CLI, scripts, the dashboard): `current_user`. Which tokens are people's
  depends on the server's mode (`ORCH_AUTH`, `orch server --auth`):
  - `local` (one person on one machine): only the token the server keeps in
    `$ORCH_HOME/api_token` (`orchestrator.local_token`); its holder is the OS user who runs
    the server, as admin;
  - `users` (a team server): a user's token (`orch users`), looked up by its hash; a
    disabled user, or a revoked or expired token, is refused. The identity is the token's
    owner, never anything the client says about itself.
- a worker reporting on its attempt: `current_worker`, authenticated by the attempt's token
  (made at admission, stored hashed, good for that attempt of that job only and dead once
  the attempt ends).

`AuthGate`, an ASGI middleware in front of every route, authenticates each request before
anything reads its body, and caps the body's size: an anonymous client cannot make the
server read (or parse, or store) anything. Only the paths opened with `open_to_all`
(`/health`) need no credential; a route added later is closed unless it is opened there.
"""

from __future__ import annotations

import getpass
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from orchestrator.errors import Forbidden, OrchError, Unauthorized
from orchestrator.models import Attempt, Job, utcnow
from orchestrator.tokens import USER_PREFIX, WORKER_PREFIX, same_token

if TYPE_CHECKING:
    from orchestrator.server import ControlPlane
    from orchestrator.settings import Settings


@dataclass(frozen=True)
class User:
    """A person acting through the API."""

    name: str
    role: Literal["admin", "user"] = "user"
    gpu_cap: int | None = None  # None: the server's default (ORCH_USER_GPU_CAP)
    max_priority: int | None = None  # None: the server's default (ORCH_MAX_PRIORITY)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# The browser's credential (the dashboard): the same token, in an HttpOnly, SameSite=Strict
# cookie. A request authenticated by it that changes something must also carry the CSRF
# header, whose value equals the CSRF cookie (double submit): a page on another site can make
# the browser send cookies, but cannot read them to set the header.
TOKEN_COOKIE = "orch_token"
CSRF_COOKIE = "orch_csrf"
CSRF_HEADER = "X-Orch-CSRF"

# Where AuthGate leaves the principal it authenticated (the request scope's state).
_USER_KEY, _WORKER_KEY = "orch_user", "orch_worker"
MAX_BODY = 1024 * 1024  # bytes; a job spec is a few KiB


@dataclass(frozen=True)
class Worker:
    """A worker process of one live attempt of one job."""

    job: Job
    attempt: Attempt

    @property
    def job_id(self) -> int:
        assert self.job.id is not None
        return self.job.id


def open_to_all(app: FastAPI, *paths: str) -> None:
    """Let requests for these paths through without a credential (`/health`; a dashboard's
    login page). A path ending in "/" (but "/" itself) opens everything under it. Every
    other path needs a
    credential, so a route added later is closed unless it is opened here."""
    app.state.open_paths = (*getattr(app.state, "open_paths", ()), *paths)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when there is none.
    Anything malformed (another scheme, spaces, non-ASCII) is a 401, never a 500."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if (scheme.lower() != "bearer" or not token or not token.isascii() or not token.isprintable()
            or " " in token):
        raise Unauthorized("malformed Authorization header; send `Authorization: Bearer <token>`")
    return token


def plane_of(request: HTTPConnection) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def local_user(request: HTTPConnection) -> User:
    """The holder of the local server's token: the OS user who runs the server."""
    return User(name=getattr(request.app.state, "local_user", None) or getpass.getuser(),
                role="admin")


def authenticate(request: HTTPConnection, token: str | None) -> User:
    """The user a token belongs to; Unauthorized when there is none or it is not valid
    (Forbidden for a worker's attempt token, which is no key to the people's API)."""
    mode = plane_of(request).settings.auth
    if not token:
        raise Unauthorized(
            "no API token; send `Authorization: Bearer <token>` (the CLI sends ORCH_API_TOKEN)"
            if mode == "users" else
            "no API token; the local server takes only the token in $ORCH_HOME/api_token, "
            "which the CLI of the same OS user sends by itself")
    if token.startswith(WORKER_PREFIX):
        if plane_of(request).store.live_attempt_for_token(token) is None:
            raise Unauthorized("this attempt token is unknown or its attempt has ended")
        raise Forbidden("an attempt token can only report on its own attempt (the /worker API)")
    if mode == "local":
        expected = getattr(request.app.state, "local_token", None)
        if expected and same_token(token, expected):
            return local_user(request)
        raise Unauthorized("wrong API token; the local server takes only the token in "
                           "$ORCH_HOME/api_token")
    return user_for_token(plane_of(request), token)


def user_for_token(plane: ControlPlane, token: str) -> User:
    """A team server's user, by one of their tokens. The lookup is by the token's sha256
    (the plain token never reaches the database; a guess that matches no hash learns
    nothing from the timing)."""
    found = plane.store.user_for_token(token) if token.startswith(USER_PREFIX) else None
    if found is None:
        raise Unauthorized("unknown API token; an admin issues tokens (orch users token NAME)")
    account, row = found
    if account.disabled_at is not None:
        raise Unauthorized(f"user {account.name} is disabled")
    if row.revoked_at is not None:
        raise Unauthorized(f"token {row.name} of {account.name} was revoked; ask an admin for "
                           "a new one")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise Unauthorized(f"token {row.name} of {account.name} expired at "
                           f"{row.expires_at.isoformat()[:19]}Z; ask an admin for a new one")
    return User(name=account.name, role=account.role.value, gpu_cap=account.gpu_cap,
                max_priority=account.max_priority)


def user_from_request(request: HTTPConnection) -> User:
    """The person calling: a bearer token, or the dashboard's cookie (then a request that
    changes something must carry the CSRF header too; a WebSocket counts as a read, its
    SameSite=Strict cookie is not sent from other sites)."""
    token = bearer_token(request.headers.get("authorization"))
    if token is None and (cookie := request.cookies.get(TOKEN_COOKIE)):
        if getattr(request, "method", "GET") not in ("GET", "HEAD", "OPTIONS"):
            sent, expected = request.headers.get(CSRF_HEADER), request.cookies.get(CSRF_COOKIE)
            if not (sent and expected and same_token(sent, expected)):
                raise Forbidden(f"missing or wrong {CSRF_HEADER} header (cross-site request?)")
        token = cookie
    return authenticate(request, token)


def worker_from_request(request: Request) -> Worker:
    """The worker calling: its attempt's token must belong to a live attempt."""
    token = bearer_token(request.headers.get("authorization"))
    if not token or not token.startswith(WORKER_PREFIX):
        raise Unauthorized("a worker report needs its attempt's token")
    found = plane_of(request).store.live_attempt_for_token(token)
    if found is None:
        raise Unauthorized("this attempt token is unknown or its attempt has ended")
    return Worker(job=found[0], attempt=found[1])


def current_user(request: HTTPConnection,
                 authorization: str | None = Header(default=None)) -> User:
    """The person calling (a FastAPI dependency, for HTTP routes and WebSockets). AuthGate
    has already checked the request; this hands over what it found (or checks it here, for
    a path opened with `open_to_all`, or an app without the gate)."""
    found = request.scope.get("state", {}).get(_USER_KEY)
    return found if isinstance(found, User) else user_from_request(request)


def current_worker(request: Request, authorization: str | None = Header(default=None)) -> Worker:
    """The worker calling (a FastAPI dependency); see `current_user`."""
    found = request.scope.get("state", {}).get(_WORKER_KEY)
    return found if isinstance(found, Worker) else worker_from_request(request)


def effective_gpu_cap(user: User, settings: Settings) -> int | None:
    """The most GPUs the user's jobs may hold at once: their own cap, else the server's
    default (None: no cap)."""
    return user.gpu_cap if user.gpu_cap is not None else settings.user_gpu_cap


def effective_max_priority(user: User, settings: Settings) -> int:
    return user.max_priority if user.max_priority is not None else settings.max_priority


def require_admin(user: User, action: str) -> None:
    if not user.is_admin:
        raise Forbidden(f"only an admin may {action}; you are {user.name} (role {user.role})")


# -- the gate -----------------------------------------------------------------------------
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def is_worker_path(path: str) -> bool:
    return path == "/worker" or path.startswith("/worker/")


def _is_open(scope: Scope) -> bool:
    path: str = scope["path"]
    opened = getattr(getattr(scope.get("app"), "state", None), "open_paths", ())
    # "/" opens the root page only, never everything (every path starts with "/").
    return any(path == p or (p.endswith("/") and p != "/" and path.startswith(p))
               for p in opened)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body over {limit} bytes; send less")


class AuthGate:
    """ASGI middleware: authenticate first (nothing has read the body yet), then let the
    request through with its body capped at `max_body` bytes (per-path `body_limits`
    override it). A refusal is answered here, in the API's error shape."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *,
                 max_body: int = MAX_BODY, body_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.body_limits = body_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and not _is_open(scope):
            try:
                user = await run_in_threadpool(user_from_request, HTTPConnection(scope))
            except OrchError:
                # Closing before accepting refuses the handshake (the client sees a 403).
                await send({"type": "websocket.close", "code": 1008})
                return
            scope.setdefault("state", {})[_USER_KEY] = user
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)  # no receive: nothing here can read the body
        limit = self.body_limits.get(scope["path"], self.max_body)
        try:
            if not _is_open(scope):
                state = scope.setdefault("state", {})
                if is_worker_path(scope["path"]):
                    state[_WORKER_KEY] = await run_in_threadpool(worker_from_request, request)
                else:
                    state[_USER_KEY] = await run_in_threadpool(user_from_request, request)
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                raise BodyTooLarge(limit)
        except OrchError as exc:
            await _refuse(exc.status_code, str(exc), scope, receive, send)
            return
        except BodyTooLarge as exc:
            await _refuse(exc.status_code, str(exc.detail), scope, receive, send)
            return
        await self.app(scope, _capped(receive, limit), send)


async def _refuse(status: int, detail: str, scope: Scope, receive: Receive, send: Send) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response = JSONResponse(status_code=status, content={"detail": detail}, headers=headers)
    await response(scope, receive, send)


def _capped(receive: Receive, limit: int) -> Receive:
    """`receive`, refusing a body (sent without a Content-Length) once it passes `limit`."""
    seen = 0

    async def capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return capped
