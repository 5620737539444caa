"""The users API of a team server (`orch server --auth users`): accounts, their tokens, and
the audit trail of changes to them. Admins only, but `GET /whoami`.

A token is in an answer exactly once: when it is made (`POST /users`, `POST
/users/{name}/tokens`). Every change is recorded with the admin who made it (`GET /audit`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam

from orchestrator.api import (
    AuditView,
    IssuedToken,
    RevokeResponse,
    TokenCreate,
    TokenRevoke,
    UserCreate,
    UserCreated,
    UserView,
    WhoAmI,
)
from orchestrator.auth import (
    User,
    current_user,
    effective_gpu_cap,
    effective_max_priority,
    plane_of,
    require_admin,
)
from orchestrator.errors import Conflict, NotFound
from orchestrator.models import utcnow
from orchestrator.store import Issued

router = APIRouter(dependencies=[Depends(current_user)])
CurrentUser = Annotated[User, Depends(current_user)]
UserName = Annotated[str, PathParam(min_length=1, max_length=64, description="a user's name")]


@router.get("/whoami", response_model=WhoAmI)
def whoami(request: Request, user: CurrentUser) -> WhoAmI:
    settings = plane_of(request).settings
    return WhoAmI(name=user.name, role=user.role, auth=settings.auth,
                  gpu_cap=effective_gpu_cap(user, settings),
                  max_priority=effective_max_priority(user, settings))


def _admin(request: Request, user: User, action: str) -> None:
    if plane_of(request).settings.auth != "users":
        raise Conflict("this server runs with --auth local (one person, the OS user): user "
                       "accounts are for a team server (orch server --auth users)")
    require_admin(user, action)


def _expiry(days: int | None) -> datetime | None:
    return utcnow() + timedelta(days=days) if days else None


def _issued(issued: Issued) -> IssuedToken:
    return IssuedToken(user=issued.user, name=issued.name, token=issued.token,
                       created_at=issued.created_at, expires_at=issued.expires_at)


def _view(request: Request, name: str) -> UserView:
    for account, tokens in plane_of(request).store.list_users():
        if account.name == name:
            return UserView.of(account, tokens)
    raise NotFound(f"no user {name}")


@router.post("/users", status_code=201, response_model=UserCreated)
def create_user(body: UserCreate, request: Request, user: CurrentUser) -> UserCreated:
    _admin(request, user, "add users")
    _, issued = plane_of(request).store.create_user(
        body.name, actor=user.name, role=body.role, gpu_cap=body.gpu_cap,
        max_priority=body.max_priority, token_name=body.token_name,
        expires_at=_expiry(body.expires_in_days))
    return UserCreated(user=_view(request, body.name), token=_issued(issued))


@router.get("/users", response_model=list[UserView])
def list_users(request: Request, user: CurrentUser) -> list[UserView]:
    _admin(request, user, "list users")
    return [UserView.of(a, t) for a, t in plane_of(request).store.list_users()]


@router.post("/users/{name}/tokens", status_code=201, response_model=IssuedToken)
def issue_token(name: UserName, body: TokenCreate, request: Request,
                user: CurrentUser) -> IssuedToken:
    _admin(request, user, "issue tokens")
    issued = plane_of(request).store.issue_token(name, actor=user.name, token_name=body.name,
                                                 expires_at=_expiry(body.expires_in_days))
    return _issued(issued)


@router.post("/users/{name}/revoke", response_model=RevokeResponse)
def revoke(name: UserName, body: TokenRevoke, request: Request,
           user: CurrentUser) -> RevokeResponse:
    """Revoke the user's token named `token`, or (no name) every live token of theirs."""
    _admin(request, user, "revoke tokens")
    revoked = plane_of(request).store.revoke_tokens(name, actor=user.name, token_name=body.token)
    return RevokeResponse(user=name, revoked=revoked)


@router.post("/users/{name}/disable", response_model=UserView)
def disable(name: UserName, request: Request, user: CurrentUser) -> UserView:
    _admin(request, user, "disable users")
    plane_of(request).store.disable_user(name, actor=user.name)
    return _view(request, name)


@router.get("/audit", response_model=list[AuditView])
def audit(request: Request, user: CurrentUser,
          target: Annotated[str | None, Query(max_length=64)] = None,
          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[AuditView]:
    """Changes to users and tokens, newest first (`target`: of one user only)."""
    _admin(request, user, "read the audit trail")
    return [AuditView.of(e) for e in plane_of(request).store.audit_events(limit=limit,
                                                                         target=target)]
