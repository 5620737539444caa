"""The web dashboard `orch server` serves at `/`: jobs, one job's live curves and logs,
comparisons, the cluster and its queue.

Everything it needs ships in this package (Jinja2 templates, scripts, styles and a vendored
chart library under static/), so it works on a machine with no internet. It signs people
in with their API token (`session.py`), reads through the store's view queries (`views.py`,
`data.py`) and changes nothing itself: its Cancel and Resume buttons call the API's own
routes, which decide who may act.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.auth import open_to_all
from orchestrator.dashboard import data, pages, session
from orchestrator.dashboard.rendering import error_page

# The paths a browser without a session must reach: the login page, and pages that send it
# there (each checks the session itself and shows nothing without one), plus the static
# files they load. A path ending in "/" covers what is under it; "/" itself is the Jobs page
# only. The JSON under /ui/api/ is not among them: it needs a credential like the API.
OPEN_PATHS = ("/", "/login", "/logout", "/ui/static/", "/ui/jobs/", "/ui/compare", "/ui/cluster")


def install(app: FastAPI) -> None:
    """Serve the dashboard from `app`: its pages, their JSON and static files, and a
    friendly page (not JSON) when a browser asks for a page that does not exist."""
    open_to_all(app, *OPEN_PATHS)
    app.include_router(session.router)
    app.include_router(pages.router)
    app.include_router(data.router)

    @app.exception_handler(StarletteHTTPException)
    async def not_found_page(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404 and "text/html" in request.headers.get("accept", ""):
            return error_page(request, 404, "There is no such page.")
        return await http_exception_handler(request, exc)


__all__ = ["OPEN_PATHS", "install"]
