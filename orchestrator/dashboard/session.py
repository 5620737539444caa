"""Signing in to the dashboard: the browser holds the user's API token in a cookie.

- `local` auth (one person, `orch dashboard`): a one-time login link carries the local token
  (`/login?token=...`), as Jupyter's does; the server sets the cookies and redirects to a
  URL without the token, so it stays out of the address bar and the history.
- `users` auth (a team server): a person pastes their token into the login form.

Either way the token goes into an HttpOnly, SameSite=Strict cookie that scripts cannot read,
plus a CSRF cookie that they can: a request that changes something echoes it in the
`X-Orch-CSRF` header (double submit; `orchestrator.auth.current_user` checks it). The login
form is protected the same way, with a CSRF value set before sign-in, so another site
cannot sign a browser in under its own token. Signing out clears both cookies.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from orchestrator.auth import (
    CSRF_COOKIE,
    CSRF_HEADER,
    TOKEN_COOKIE,
    User,
    authenticate,
    plane_of,
)
from orchestrator.dashboard.rendering import (
    SECURITY_HEADERS,
    LoginRequired,
    PageRoute,
    error_page,
    render,
)
from orchestrator.errors import Forbidden, Unauthorized
from orchestrator.tokens import same_token

router = APIRouter(route_class=PageRoute, include_in_schema=False)
SESSION_SECONDS = 14 * 24 * 3600
MAX_FORM_BYTES = 8192


def page_user(request: Request) -> User:
    """The signed-in user of a page request, from the session cookie; LoginRequired (a
    redirect to the login page) when there is none or it is no longer valid."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    token = request.cookies.get(TOKEN_COOKIE)
    if not token:
        raise LoginRequired(here)
    try:
        return authenticate(request, token)
    except (Unauthorized, Forbidden) as exc:
        raise LoginRequired(here, str(exc)) from None


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this server only (never another site)."""
    if (not value or not value.startswith("/") or value.startswith("//") or "\\" in value
            or any(ord(c) < 32 for c in value)):
        return "/"
    return value


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _set_csrf(response: Response, request: Request, value: str) -> None:
    response.set_cookie(CSRF_COOKIE, value, max_age=SESSION_SECONDS, path="/",
                        secure=_secure(request), httponly=False, samesite="strict")


def _signed_in(request: Request, token: str, next_url: str) -> RedirectResponse:
    response = RedirectResponse(safe_next(next_url), status_code=303,
                                headers={**SECURITY_HEADERS, "Referrer-Policy": "no-referrer"})
    response.set_cookie(TOKEN_COOKIE, token, max_age=SESSION_SECONDS, path="/",
                        secure=_secure(request), httponly=True, samesite="strict")
    _set_csrf(response, request, secrets.token_urlsafe(32))  # a new one for the session
    return response


def _login_form(request: Request, *, next_url: str, error: str | None = None,
                status_code: int = 200) -> HTMLResponse:
    csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = render(request, "login.html", status_code=status_code,
                      mode=plane_of(request).settings.auth, next_url=safe_next(next_url),
                      csrf=csrf, error=error)
    response.headers["Referrer-Policy"] = "no-referrer"
    _set_csrf(response, request, csrf)
    return response


def _check(request: Request, token: str) -> str | None:
    """None when the token signs someone in, else why not."""
    try:
        authenticate(request, token)
    except (Unauthorized, Forbidden) as exc:
        return str(exc)
    return None


@router.get("/login")
def login_page(request: Request, token: str | None = None, next: str = "/") -> Response:
    if token is None:
        return _login_form(request, next_url=next)
    if plane_of(request).settings.auth != "local":
        # A token in a URL ends up in histories and logs; on a team server people paste it.
        return _login_form(request, next_url=next, status_code=400,
                           error="This server signs in with the form below: paste your token.")
    problem = _check(request, token) if token else "the login link has no token"
    if problem:
        return _login_form(request, next_url=next, status_code=401,
                           error=f"That login link did not work ({problem}). Run "
                                 "`orch dashboard` for a fresh one.")
    return _signed_in(request, token, next)


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    fields = parse_qs(body.decode(errors="replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items() if v}


def _csrf_ok(request: Request, sent: str | None) -> bool:
    expected = request.cookies.get(CSRF_COOKIE)
    return bool(sent and expected and same_token(sent, expected))


@router.post("/login")
async def login_submit(request: Request) -> Response:
    form = await _form(request)
    next_url = form.get("next", "/")
    if not _csrf_ok(request, form.get("csrf")):
        return _login_form(request, next_url=next_url, status_code=403,
                           error="The form expired or came from another site; try again.")
    token = form.get("token", "").strip()
    problem = _check(request, token) if token else "paste your API token"
    if problem:
        return _login_form(request, next_url=next_url, status_code=401, error=problem)
    return _signed_in(request, token, next_url)


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await _form(request)
    if not _csrf_ok(request, request.headers.get(CSRF_HEADER) or form.get("csrf")):
        return error_page(request, 403, f"Signing out needs the {CSRF_HEADER} value of this "
                                        "session (cross-site request?).")
    response = RedirectResponse("/login", status_code=303, headers=SECURITY_HEADERS)
    for name in (TOKEN_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path="/", secure=_secure(request),
                               httponly=name == TOKEN_COOKIE, samesite="strict")
    return response
