"""The dashboard's JSON: what its pages load and poll for live updates (`/ui/api/...`).

Authenticated like the rest of the API (`current_user`: a bearer token, or the dashboard's
cookie), so a script can read the same views. Everything here only reads; cancel and
resume go through the API's own routes, which decide who may act.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam

from orchestrator.auth import User, current_user, plane_of
from orchestrator.dashboard import views
from orchestrator.errors import InvalidRequest
from orchestrator.joblogs import read_logs
from orchestrator.routes.jobs import parse_states

if TYPE_CHECKING:
    from orchestrator.server import ControlPlane

router = APIRouter(prefix="/ui/api", include_in_schema=False)
CurrentUser = Annotated[User, Depends(current_user)]
JobId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]
PAGE_SIZE = 50
LOG_TAIL = 64 * 1024  # characters of a log the page starts with
LOG_CHUNK = 256 * 1024  # characters one poll returns at most
MAX_COMPARE = 5
_OWNERS_TTL = 30.0
_owners_cache: dict[int, tuple[float, list[str]]] = {}


def owners(plane: ControlPlane) -> list[str]:
    """Job owners for the filter menu; a distinct scan, so kept for a few seconds."""
    key = id(plane)
    cached = _owners_cache.get(key)
    if cached and time.monotonic() - cached[0] < _OWNERS_TTL:
        return cached[1]
    found = plane.store.job_owners()
    _owners_cache[key] = (time.monotonic(), found)
    return found


def jobs_listing(plane: ControlPlane, user: User, *, state: str | None, owner: str | None,
                 before: int | None, after: int | None,
                 limit: int = PAGE_SIZE) -> dict[str, Any]:
    """A page of the jobs list (newest first) with the filters' counts and page links."""
    states = parse_states(state)
    owner = owner or None
    store = plane.store
    page = store.job_page(states=states, owner=owner, before_id=before, after_id=after,
                          limit=limit + 1)
    if after is not None:  # read upwards: the extra row is the newest one
        more_newer, page = len(page) > limit, page[-limit:]
        more_older = True
    else:
        more_older, page = len(page) > limit, page[:limit]
        more_newer = before is not None and bool(page) and bool(
            store.job_page(states=states, owner=owner, after_id=int(page[0].id or 0), limit=1))
    counts = store.job_counts(owner=owner)
    return {
        "rows": views.job_rows(plane, page, user),
        "counts": {s.value: n for s, n in counts.items()},
        "total": sum(counts.values()),
        "filters": {"state": [s.value for s in states] if states else [], "owner": owner},
        "owners": owners(plane),
        "newer": int(page[0].id or 0) if page and more_newer else None,
        "older": int(page[-1].id or 0) if page and more_older else None,
        "user": {"name": user.name, "is_admin": user.is_admin},
    }


def parse_ids(text: str | None) -> list[int]:
    """`3,7,12` -> [3, 7, 12]: 2 to 5 job ids for a comparison."""
    ids: list[int] = []
    for part in (text or "").replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) < 2**63:
            raise InvalidRequest(f"ids: {part!r} is not a job id; give ids like 3,7,12")
        if int(part) not in ids:
            ids.append(int(part))
    if len(ids) > MAX_COMPARE:
        raise InvalidRequest(f"ids: compare at most {MAX_COMPARE} jobs at once "
                             f"(got {len(ids)})")
    return ids


def log_tail(plane: ControlPlane, job_id: int, offset: int | None) -> dict[str, Any]:
    """The job's log from `offset` on (at most LOG_CHUNK characters); without an offset,
    its last LOG_TAIL characters."""
    job = plane.store.require_job(job_id)
    text = read_logs(plane.settings.home_dir(), job_id)
    if text is None:
        text = (plane.executor.logs(job.ray_submission_id) if job.ray_submission_id
                else None) or ""
    size = len(text)
    if offset is None or offset > size:
        start = max(0, size - LOG_TAIL)
        return {"text": text[start:], "offset": size, "truncated": start > 0,
                "state": job.state.value}
    chunk = text[offset:offset + LOG_CHUNK]
    return {"text": chunk, "offset": offset + len(chunk), "truncated": False,
            "state": job.state.value}


@router.get("/jobs")
def jobs(request: Request, user: CurrentUser, state: str | None = None,
         owner: str | None = Query(default=None, max_length=100),
         before: Annotated[int | None, Query(ge=1)] = None,
         after: Annotated[int | None, Query(ge=0)] = None,
         limit: Annotated[int, Query(ge=1, le=200)] = PAGE_SIZE) -> dict[str, Any]:
    return jobs_listing(plane_of(request), user, state=state, owner=owner, before=before,
                        after=after, limit=limit)


@router.get("/jobs/{job_id}")
def job(job_id: JobId, request: Request, user: CurrentUser) -> dict[str, Any]:
    plane = plane_of(request)
    return views.job_detail(plane, plane.store.require_job(job_id), user)


@router.get("/jobs/{job_id}/curves")
def curves(job_id: JobId, request: Request, user: CurrentUser, all: bool = False,
           after: Annotated[int | None, Query(ge=0)] = None,
           points: Annotated[int, Query(ge=10, le=5000)] = views.MAX_POINTS) -> dict[str, Any]:
    store = plane_of(request).store
    return views.job_curves(store, store.require_job(job_id), include_superseded=all,
                            after_step=after, max_points=points)


@router.get("/jobs/{job_id}/logs")
def logs(job_id: JobId, request: Request, user: CurrentUser,
         offset: Annotated[int | None, Query(ge=0)] = None) -> dict[str, Any]:
    return log_tail(plane_of(request), job_id, offset)


@router.get("/compare")
def compare(request: Request, user: CurrentUser, ids: str = "",
            points: Annotated[int, Query(ge=10, le=5000)] = views.MAX_POINTS) -> dict[str, Any]:
    store = plane_of(request).store
    chosen = [store.require_job(i) for i in parse_ids(ids)]
    return views.compare_curves(store, chosen, max_points=points)


@router.get("/cluster")
def cluster(request: Request, user: CurrentUser) -> dict[str, Any]:
    return views.cluster_view(plane_of(request), user)
