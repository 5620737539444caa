"""HTML for the dashboard: templates, the static files shipped with the package, the headers
every page carries, and the route class that turns any failure into a friendly page.

Templates are Jinja2 with autoescaping on, so anything a user wrote (job names, owners,
specs, log lines, error messages) is text, never markup. Data a page's script needs is
embedded with `tojson`, which escapes `<`, `>`, `&` and `'`, so it cannot close the
script element it sits in; the scripts build the DOM with textContent, never innerHTML.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable, Coroutine
from importlib import metadata, resources
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, select_autoescape

from orchestrator.auth import User
from orchestrator.errors import Forbidden, NotFound, OrchError, Unauthorized

log = logging.getLogger("orch.dashboard")

STATIC_PREFIX = "/ui/static"
try:
    VERSION = metadata.version("orch")
except metadata.PackageNotFoundError:  # a checkout run without installing
    VERSION = "dev"

# Scripts and styles come from this server only; nothing may frame the dashboard.
# uPlot sizes its canvas through element.style, which a CSP cannot tell from an inline
# style attribute, so styles allow 'unsafe-inline' (no script does).
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; "
                                "style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_env = Environment(loader=PackageLoader("orchestrator.dashboard", "templates"),
                   autoescape=select_autoescape(default=True, default_for_string=True),
                   trim_blocks=True, lstrip_blocks=True)


def static_url(name: str) -> str:
    # The version in the URL lets browsers cache the files until orch is upgraded.
    return f"{STATIC_PREFIX}/{name}?v={quote(VERSION)}"


_env.globals["static"] = static_url


def render(request: Request, template: str, status_code: int = 200,
           user: User | None = None, **context: Any) -> HTMLResponse:
    html = _env.get_template(template).render(
        request=request, user=user, path=request.url.path, **context)
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


class LoginRequired(Exception):
    """The page needs a signed-in user: send the browser to the login page."""

    def __init__(self, next_url: str, message: str | None = None) -> None:
        super().__init__(message or "sign in to continue")
        self.next_url = next_url
        self.message = message


def login_redirect(next_url: str) -> RedirectResponse:
    target = "/login" if next_url in ("", "/") else f"/login?next={quote(next_url, safe='')}"
    return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)


_TITLES = {400: "Bad request", 401: "Sign in needed", 403: "Not allowed", 404: "Not found",
           409: "Not possible right now", 422: "Bad request", 500: "Something went wrong",
           503: "Cluster unreachable"}


def error_page(request: Request, status: int, message: str,
               user: User | None = None) -> HTMLResponse:
    return render(request, "error.html", status_code=status, user=user, status=status,
                  title=_TITLES.get(status, "Something went wrong"), message=message)


class PageRoute(APIRoute):
    """A dashboard page: whatever goes wrong ends as a page a person can read (or a trip
    to the login page), never a JSON body or a traceback."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired as exc:
                return login_redirect(exc.next_url)
            except RequestValidationError:
                return error_page(request, 404, "There is no such page.")
            except (NotFound, Forbidden, Unauthorized, OrchError) as exc:
                return error_page(request, exc.status_code, str(exc))
            except Exception:
                log.exception("dashboard page %s failed", request.url.path)
                return error_page(request, 500, "The orch server hit an error drawing this "
                                                "page; its log has the details.")

        return page


# -- static files ----------------------------------------------------------------------
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                 ".png": "image/png", ".txt": "text/plain", ".md": "text/plain"}


def static_file(name: str) -> Response:
    """A file shipped under the package's static/ directory (package data), or a 404. Only
    plain relative names: no absolute path, no `..`, no hidden file, nothing outside."""
    missing = Response("not found", status_code=404, media_type="text/plain")
    path = PurePosixPath(name)
    if (not name or path.is_absolute() or "\\" in name
            or any(p in ("..", ".") or p.startswith(".") for p in path.parts)):
        return missing
    root = resources.files("orchestrator.dashboard").joinpath("static")
    target = root.joinpath(*path.parts)
    if not target.is_file():
        return missing
    media = (_STATIC_TYPES.get(path.suffix) or mimetypes.guess_type(name)[0]
             or "application/octet-stream")
    return Response(target.read_bytes(), media_type=media,
                    headers={"Cache-Control": "public, max-age=86400",
                             "X-Content-Type-Options": "nosniff"})
