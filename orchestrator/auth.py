"""Who is calling: every request's principal comes from a credential the server checks.

Two kinds of caller:
- a person (the CLI, scripts): `current_user`;
- a worker reporting on its attempt: `current_worker`, authenticated by the attempt's token
  (made at admission, stored hashed, good for that attempt of that job only and dead once
  the attempt ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fastapi import Header, Request

from orchestrator.errors import Forbidden, Unauthorized
from orchestrator.models import Attempt, Job
from orchestrator.tokens import WORKER_PREFIX, same_token

if TYPE_CHECKING:
    from orchestrator.server import ControlPlane


@dataclass(frozen=True)
class User:
    """A person acting through the API."""

    name: str
    role: Literal["admin", "user"] = "user"
    gpu_cap: int | None = None  # None: the server's default (ORCH_USER_GPU_CAP)
    max_priority: int | None = None  # None: the server's default

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


@dataclass(frozen=True)
class Worker:
    """A worker process of one live attempt of one job."""

    job: Job
    attempt: Attempt

    @property
    def job_id(self) -> int:
        assert self.job.id is not None
        return self.job.id


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when there is none.
    Anything malformed (another scheme, spaces, non-ASCII) is a 401, never a 500."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token or not token.isascii() or " " in token.strip():
        raise Unauthorized("malformed Authorization header; send `Authorization: Bearer <token>`")
    return token.strip()


def plane_of(request: Request) -> ControlPlane:
    return request.app.state.plane  # type: ignore[no-any-return]


def authenticate(request: Request, token: str | None) -> User:
    """The user a token belongs to; Unauthorized when there is none or it is not valid."""
    if token and token.startswith(WORKER_PREFIX):
        raise Forbidden("an attempt token can only report on its own attempt")
    expected = plane_of(request).settings.api_token
    if expected and not (token and same_token(token, expected)):
        raise Unauthorized("missing or wrong API token (set ORCH_API_TOKEN)")
    name = (request.headers.get("x-orch-user") or "anonymous").strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise Unauthorized("X-Orch-User: a printable name of 1 to 100 characters")
    return User(name=name)


def current_user(request: Request, authorization: str | None = Header(default=None)) -> User:
    """The person calling: a bearer token, or the dashboard's cookie (then a request that
    changes something must carry the CSRF header too)."""
    token = bearer_token(authorization)
    if token is None and (cookie := request.cookies.get(TOKEN_COOKIE)):
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            sent, expected = request.headers.get(CSRF_HEADER), request.cookies.get(CSRF_COOKIE)
            if not (sent and expected and same_token(sent, expected)):
                raise Forbidden(f"missing or wrong {CSRF_HEADER} header (cross-site request?)")
        token = cookie
    return authenticate(request, token)


def current_worker(request: Request, authorization: str | None = Header(default=None)) -> Worker:
    """The worker calling: its attempt's token must belong to a live attempt."""
    token = bearer_token(authorization)
    if not token or not token.startswith(WORKER_PREFIX):
        raise Unauthorized("a worker report needs its attempt's token")
    found = plane_of(request).store.live_attempt_for_token(token)
    if found is None:
        raise Unauthorized("this attempt token is unknown or its attempt has ended")
    return Worker(job=found[0], attempt=found[1])
