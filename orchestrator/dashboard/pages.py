"""The dashboard's pages: Jobs (at `/`), one job, Compare and Cluster.

Each page is rendered with the data it first shows embedded (so it paints at once), then
its script keeps it live by polling the JSON views in `data.py` (no full reload).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from orchestrator.auth import User, plane_of
from orchestrator.dashboard import data, views
from orchestrator.dashboard.rendering import PageRoute, error_page, render, static_file
from orchestrator.dashboard.session import page_user
from orchestrator.errors import InvalidRequest

router = APIRouter(route_class=PageRoute, include_in_schema=False)
PageUser = Annotated[User, Depends(page_user)]


def _job_id(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) < 2**63:
        raise InvalidRequest(f"{text!r} is not a job id")
    return int(text)


@router.get("/")
def jobs_page(request: Request, user: PageUser, state: str | None = None,
              owner: str | None = Query(default=None, max_length=100),
              before: Annotated[int | None, Query(ge=1)] = None,
              after: Annotated[int | None, Query(ge=0)] = None) -> Response:
    listing = data.jobs_listing(plane_of(request), user, state=state, owner=owner,
                                before=before, after=after)
    return render(request, "jobs.html", user=user, page="jobs", listing=listing)


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str, request: Request, user: PageUser) -> Response:
    plane = plane_of(request)
    try:
        number = _job_id(job_id)
    except InvalidRequest:
        return error_page(request, 404, f"There is no job {job_id!r}.", user=user)
    job = plane.store.get_job(number)
    if job is None:
        return error_page(request, 404, f"Job {number} does not exist (or no longer does).",
                          user=user)
    detail = views.job_detail(plane, job, user)
    return render(request, "job.html", user=user, page="jobs", job=detail,
                  spec_text=views.spec_text(job))


@router.get("/ui/compare")
def compare_page(request: Request, user: PageUser, ids: str = "") -> Response:
    plane = plane_of(request)
    chosen = data.parse_ids(ids)
    missing = [i for i in chosen if plane.store.get_job(i) is None]
    if missing:
        return error_page(request, 404, f"No job {', '.join(map(str, missing))}.", user=user)
    recent = data.jobs_listing(plane, user, state=None, owner=None, before=None, after=None,
                               limit=100)["rows"]
    picker: list[dict[str, Any]] = [
        {k: r[k] for k in ("id", "name", "state", "owner", "objective", "headline",
                           "headline_value")} for r in recent]
    return render(request, "compare.html", user=user, page="compare", chosen=chosen,
                  picker=picker, max_jobs=data.MAX_COMPARE)


@router.get("/ui/cluster")
def cluster_page(request: Request, user: PageUser) -> Response:
    view = views.cluster_view(plane_of(request), user)
    return render(request, "cluster.html", user=user, page="cluster", cluster=view)


@router.get("/ui/static/{name:path}")
def static(name: str) -> Response:
    return static_file(name)
