"""Signing in to the dashboard: the login link and form, the cookies, CSRF, signing out."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.dashboard.session import safe_next
from tests.support import new_job

Dash = Any  # the `dash` fixture (conftest.py): client, store, plane, token


def cookie_header(response, name: str) -> str:  # type: ignore[no-untyped-def]
    return next(c for c in response.headers.get_list("set-cookie") if c.startswith(f"{name}="))


def test_without_a_session_pages_go_to_login_and_json_is_refused(dash: Dash) -> None:
    job_id = new_job(dash.store)
    page = dash.client.get(f"/ui/jobs/{job_id}?x=1")
    assert page.status_code == 303
    assert page.headers["location"] == f"/login?next=%2Fui%2Fjobs%2F{job_id}%3Fx%3D1"
    assert dash.client.get("/").headers["location"] == "/login"
    for path in ("/ui/api/jobs", f"/ui/api/jobs/{job_id}", "/ui/api/cluster"):
        assert dash.client.get(path).status_code == 401, path
    login = dash.client.get("/login")
    assert login.status_code == 200 and 'name="token"' in login.text
    assert login.headers["content-security-policy"].startswith("default-src 'self'")


def test_pages_a_browser_reaches_without_a_session_show_nothing(dash: Dash) -> None:
    from fastapi.routing import iter_route_contexts

    from orchestrator.dashboard import OPEN_PATHS

    job_id = new_job(dash.store, name="secret-run")
    routes = [(m, r.path) for r in iter_route_contexts(dash.client.app.routes)
              for m in (r.methods or ()) if m != "HEAD"]
    pages = [(m, p) for m, p in routes if p == "/" or p.startswith(("/login", "/logout", "/ui/"))
             and not p.startswith("/ui/api/")]
    assert len(pages) == 8  # every page, the login form, sign-out and the static files
    for method, path in pages:
        opened = any(path == o or (o.endswith("/") and o != "/" and path.startswith(o))
                     for o in OPEN_PATHS)
        assert opened, path
        url = path.replace("{job_id}", str(job_id)).replace("{name:path}", "app.css")
        answer = dash.client.request(method, url)
        assert answer.status_code in (200, 303, 403), (method, path, answer.status_code)
        assert "secret-run" not in answer.text, path
        if answer.status_code == 200:  # the login form, or a static file
            assert path in ("/login", "/ui/static/{name:path}"), path


def test_the_local_login_link_sets_the_cookies_and_drops_the_token(dash: Dash) -> None:
    response = dash.client.get(f"/login?token={dash.token}&next=/ui/cluster")
    assert response.status_code == 303 and response.headers["location"] == "/ui/cluster"
    assert response.headers["referrer-policy"] == "no-referrer"
    session = cookie_header(response, "orch_token")
    assert "HttpOnly" in session and "SameSite=strict" in session and "Path=/" in session
    csrf = cookie_header(response, "orch_csrf")
    assert "HttpOnly" not in csrf and "SameSite=strict" in csrf
    assert dash.client.get("/ui/cluster").status_code == 200
    assert dash.client.get("/ui/api/jobs").status_code == 200


def test_a_bad_link_or_token_signs_nobody_in(dash: Dash) -> None:
    bad = dash.client.get("/login?token=wrong")
    assert bad.status_code == 401 and "orch dashboard" in bad.text
    assert "orch_token" not in dash.client.cookies
    form = dash.client.get("/login")
    csrf = dash.client.cookies["orch_csrf"]
    assert f'value="{csrf}"' in form.text
    wrong = dash.client.post("/login", data={"token": "wrong", "csrf": csrf, "next": "/"})
    assert wrong.status_code == 401 and "orch_token" not in dash.client.cookies
    # Another site cannot post the form: it cannot read the CSRF value.
    forged = dash.client.post("/login", data={"token": dash.token, "csrf": "guess"})
    assert forged.status_code == 403 and "orch_token" not in dash.client.cookies
    good = dash.client.post("/login", data={"token": dash.token, "csrf": csrf,
                                            "next": "https://evil.example/"})
    assert good.status_code == 303 and good.headers["location"] == "/"
    assert dash.client.cookies["orch_csrf"] != csrf  # a new value for the session


def test_a_team_server_takes_tokens_only_in_the_form(dash: Dash,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dash.plane, "settings", dash.plane.settings.model_copy(
        update={"auth": "users"}))
    response = dash.client.get(f"/login?token={dash.token}")
    assert response.status_code == 400 and "paste your token" in response.text
    assert "orch_token" not in dash.client.cookies


def test_signing_out_needs_the_csrf_value_and_clears_the_cookies(dash: Dash) -> None:
    dash.sign_in()
    assert dash.client.post("/logout").status_code == 403
    assert dash.client.get("/").status_code == 200  # still signed in
    out = dash.client.post("/logout", data={"csrf": dash.client.cookies["orch_csrf"]})
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert 'orch_token=""' in cookie_header(out, "orch_token")
    assert dash.client.get("/").status_code == 303


def test_changes_through_the_cookie_need_the_csrf_header(dash: Dash) -> None:
    dash.sign_in()
    job_id = new_job(dash.store)
    assert dash.client.post(f"/jobs/{job_id}/cancel").status_code == 403
    assert dash.client.post(f"/jobs/{job_id}/cancel",
                            headers={"X-Orch-CSRF": "forged"}).status_code == 403
    assert dash.store.require_job(job_id).state == "queued"
    done = dash.client.post(f"/jobs/{job_id}/cancel",
                            headers={"X-Orch-CSRF": dash.client.cookies["orch_csrf"]})
    assert done.status_code == 200 and dash.store.require_job(job_id).state == "cancelled"


@pytest.mark.parametrize(("given", "kept"), [
    ("/ui/jobs/3?x=1", "/ui/jobs/3?x=1"), ("/", "/"), (None, "/"), ("", "/"),
    ("//evil.example/", "/"), ("https://evil.example/", "/"), ("/\\evil.example", "/"),
    ("/ok\r\nSet-Cookie: x=1", "/"), ("ui/jobs", "/"),
])
def test_after_login_only_paths_on_this_server(given: str | None, kept: str) -> None:
    assert safe_next(given) == kept
