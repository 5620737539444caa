"""Who is calling: every request's principal comes from a credential the server checks.

Two kinds of caller:
- a person (the CLI, scripts): `current_user`;
- a worker reporting on its attempt: `current_worker`, authenticated by the attempt's token
  (made at admission, stored hashed, good for that attempt of that job only and dead once
  the attempt ends).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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


def current_user(request: Request, authorization: str | None = Header(default=None),
                 x_orch_user: str | None = Header(default=None)) -> User:
    """The person calling. With a server token configured, requests must carry it."""
    plane = plane_of(request)
    token = bearer_token(authorization)
    if token and token.startswith(WORKER_PREFIX):
        raise Forbidden("an attempt token can only report on its own attempt")
    expected = plane.settings.api_token
    if expected and not (token and same_token(token, expected)):
        raise Unauthorized("missing or wrong API token (set ORCH_API_TOKEN)")
    name = (x_orch_user or "anonymous").strip()
    if not name or len(name) > 100 or not name.isprintable():
        raise Unauthorized("X-Orch-User: a printable name of 1 to 100 characters")
    return User(name=name)


def current_worker(request: Request, authorization: str | None = Header(default=None)) -> Worker:
    """The worker calling: its attempt's token must belong to a live attempt."""
    token = bearer_token(authorization)
    if not token or not token.startswith(WORKER_PREFIX):
        raise Unauthorized("a worker report needs its attempt's token")
    found = plane_of(request).store.live_attempt_for_token(token)
    if found is None:
        raise Unauthorized("this attempt token is unknown or its attempt has ended")
    return Worker(job=found[0], attempt=found[1])
