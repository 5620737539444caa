"""The dashboard's pages and their JSON: what they show, that user-written text stays text,
and that every failure is a page a person can read."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from orchestrator.dashboard import views
from orchestrator.dashboard.rendering import static_file
from orchestrator.models import CheckpointKind
from orchestrator.states import JobState
from tests.support import new_job

Dash = Any  # the `dash` fixture (conftest.py): client, store, plane, token

EVIL = "</script><img src=x onerror=alert(1)>"


def embedded(html: str, element_id: str) -> Any:
    """The JSON a page embeds for its script."""
    found = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>',
                      html, re.S)
    assert found, element_id
    return json.loads(found.group(1))


def test_user_written_text_is_never_markup(dash: Dash) -> None:
    job_id = new_job(dash.store, name=EVIL, owner=f"mallory{EVIL}", objective="clm",
                     spec={"model": EVIL}, spec_yaml=f"name: {EVIL}\n")
    dash.store.add_metrics(job_id, 1, [(1, EVIL[:90], 1.0)])
    dash.sign_in()
    for path in ("/", f"/ui/jobs/{job_id}", "/ui/cluster", f"/ui/compare?ids={job_id}"):
        html = dash.client.get(path).text
        assert "<img src=x" not in html, path
        # The one place it appears raw would be inside a script; there it is \u003c-escaped.
        assert html.count("</script>") == html.count("<script"), path
    page = dash.client.get(f"/ui/jobs/{job_id}").text
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page  # the spec, as text
    assert embedded(page, "job-data")["name"] == EVIL  # the script gets the exact string


def test_jobs_page_embeds_its_first_rows_and_the_json_pages(dash: Dash) -> None:
    ids = [new_job(dash.store, owner="ann" if i < 3 else "bob") for i in range(60)]
    dash.store.add_metrics(ids[-1], 1, [(5, "train_loss", 2.5), (0, "total_steps", 50.0),
                                       (5, "eval_loss", 2.7)])
    dash.sign_in()
    listing = embedded(dash.client.get("/").text, "jobs-data")
    assert [r["id"] for r in listing["rows"]] == ids[:-51:-1]  # 50 newest first
    first = listing["rows"][0]
    assert (first["step"], first["total_steps"], first["train_loss"]) == (5, 50, 2.5)
    assert (first["headline"], first["headline_value"]) == ("eval_loss", 2.7)
    assert listing["newer"] is None and listing["older"] == ids[10]
    older = dash.client.get(f"/ui/api/jobs?before={listing['older']}").json()
    assert [r["id"] for r in older["rows"]] == ids[9::-1] and older["older"] is None
    assert older["newer"] == ids[9]
    newer = dash.client.get(f"/ui/api/jobs?after={older['newer']}").json()
    assert [r["id"] for r in newer["rows"]] == ids[:-51:-1]
    anns = dash.client.get("/ui/api/jobs?owner=ann").json()
    assert [r["id"] for r in anns["rows"]] == ids[2::-1] and anns["counts"] == {"queued": 3}
    assert dash.client.get("/ui/api/jobs?state=bogus").status_code == 422
    assert dash.client.get("/?state=bogus").status_code == 422  # a page, not a traceback


def test_job_page_shows_history_checkpoints_and_the_log_tail(dash: Dash) -> None:
    job_id = new_job(dash.store, objective="seq2seq")
    dash.plane.scheduler.tick()  # admitted: pending, attempt 1
    dash.store.transition(job_id, JobState.RUNNING, "worker started", details={"attempt": 1})
    dash.store.register_checkpoint(job_id, attempt=1, step=10, path="/jobs/1/checkpoint-10",
                                   size_bytes=1234, metrics={"eval_rougeL": 0.3,
                                                             "eval_runtime": 2.0},
                                   keep_last=2, best_metric="eval_rougeL", best_mode="max")
    log = dash.home / "jobs" / str(job_id) / "logs"
    log.mkdir(parents=True)
    (log / "attempt-1.log").write_text("x" * 70_000 + "\nlast line\n")
    dash.sign_in()
    detail = embedded(dash.client.get(f"/ui/jobs/{job_id}").text, "job-data")
    assert [e["to"] for e in detail["events"]] == ["queued", "pending", "running"]
    assert detail["events"][0]["user"] == "alice"
    assert detail["attempt_history"][0]["outcome"] == "running"
    ckpt = detail["checkpoints"][0]
    assert ckpt["is_best"] and ckpt["is_latest"] and ckpt["metrics"] == {"eval_rougeL": 0.3}
    assert detail["headline"] == "eval_rougeL"
    tail = dash.client.get(f"/ui/api/jobs/{job_id}/logs").json()
    assert tail["truncated"] and tail["text"].endswith("last line\n")
    assert len(tail["text"]) <= 64 * 1024
    with (log / "attempt-1.log").open("a") as fh:
        fh.write("more\n")
    more = dash.client.get(f"/ui/api/jobs/{job_id}/logs?offset={tail['offset']}").json()
    assert more["text"] == "more\n" and more["offset"] == tail["offset"] + 5


def test_failures_are_friendly_pages(dash: Dash, monkeypatch: pytest.MonkeyPatch) -> None:
    dash.sign_in()
    html = {"accept": "text/html"}
    for path in ("/ui/jobs/424242", "/ui/jobs/abc", "/ui/jobs/-1", "/ui/compare?ids=1,2,x",
                 "/no/such/page", "/ui/compare?ids=1,2,3,4,5,6"):
        response = dash.client.get(path, headers=html)
        assert 400 <= response.status_code < 500, path
        assert response.headers["content-type"].startswith("text/html"), path
        assert "error-page" in response.text and "Traceback" not in response.text, path
    # API clients still get the API's JSON for an unknown path.
    assert dash.client.get("/no/such/page").json() == {"detail": "Not Found"}

    job_id = new_job(dash.store)

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(views, "job_detail", broken)
    response = dash.client.get(f"/ui/jobs/{job_id}")
    assert response.status_code == 500 and "error-page" in response.text
    assert "a bug" not in response.text and "Traceback" not in response.text


def test_static_files_ship_with_the_package(dash: Dash) -> None:
    script = dash.client.get("/ui/static/vendor/uplot/uPlot.iife.min.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "uPlot" in script.text
    assert dash.client.get("/ui/static/vendor/uplot/LICENSE").status_code == 200
    assert dash.client.get("/ui/static/app.css").headers["content-type"].startswith("text/css")
    for path in ("/ui/static/%2e%2e/views.py", "/ui/static/%2e%2e/%2e%2e/auth.py",
                 "/ui/static//etc/passwd", "/ui/static/%2Fetc%2Fpasswd", "/ui/static/nope.js",
                 "/ui/static/.hidden", "/ui/static/", "/ui/static/vendor\\..\\..\\views.py"):
        assert dash.client.get(path).status_code == 404, path
    for name in ("../views.py", "../../auth.py", "/etc/passwd", "//etc/passwd",
                 "vendor/../../pages.py", "", ".", "vendor/uplot/../../../views.py"):
        assert static_file(name).status_code == 404, name


def test_curves_join_a_resume_chain_and_stay_bounded(dash: Dash) -> None:
    parent = new_job(dash.store, objective="clm")
    dash.store.add_metrics(parent, 1, [(s, "train_loss", 10.0 - s / 100) for s in range(1, 501)]
                           + [(250, "eval_loss", 5.0), (500, "eval_loss", 4.0),
                              (250, "eval_runtime", 1.0)])
    child = new_job(dash.store, objective="clm", parent_job_id=parent,
                    resume_from=f"/jobs/{parent}/checkpoints/checkpoint-400",
                    details={"resume_step": 400})
    dash.store.add_metrics(child, 1, [(s, "train_loss", 1.0) for s in range(401, 3001)])
    child_job = dash.store.require_job(child)
    curves = views.job_curves(dash.store, child_job, max_points=1000)
    assert [p["id"] for p in curves["panels"]] == ["loss"]  # eval_runtime is not a curve
    assert curves["counts"] == {"train_loss": 400 + 2600, "eval_loss": 1}
    steps = curves["series"]["train_loss"]["steps"]
    assert 998 <= len(steps) <= 1000 and steps[0] == 1 and steps[-1] == 3000
    assert steps == sorted(steps)
    assert [s["job_id"] for s in curves["chain"]] == [parent, child]
    assert curves["superseded"] == {}
    full = views.job_curves(dash.store, child_job, include_superseded=True, max_points=5000)
    assert full["superseded"]["train_loss"]["steps"] == list(range(401, 501))
    assert full["superseded"]["eval_loss"]["steps"] == [500]
    # A live update: only the job's own points after the last one drawn.
    dash.store.add_metrics(child, 1, [(3001, "train_loss", 0.9)])
    update = views.job_curves(dash.store, child_job, after_step=3000)
    assert update["series"] == {"train_loss": {"steps": [3001], "values": [0.9]}}
    assert update["counts"]["train_loss"] == 1 and update["last_step"] == 3001
    dash.sign_in()
    api = dash.client.get(f"/ui/api/jobs/{child}/curves?points=10").json()
    assert len(api["series"]["train_loss"]["steps"]) <= 10


def test_compare_and_cluster_views(dash: Dash) -> None:
    jobs = [new_job(dash.store, objective=o, gpus=g) for o, g in
            (("clm", 1), ("mlm", 1), ("seq2seq", 8))]
    for job_id in jobs[:2]:
        dash.store.add_metrics(job_id, 1, [(s, "train_loss", 1.0 / s) for s in range(1, 11)])
    dash.store.add_metrics(jobs[1], 1, [(10, "eval_accuracy", 0.5)])
    dash.plane.scheduler.tick()  # the first two fit (4 GPUs); the 8-GPU job waits
    dash.sign_in()
    compared = dash.client.get(f"/ui/api/compare?ids={jobs[0]},{jobs[1]}").json()
    assert compared["metrics"] == ["train_loss", "eval_accuracy"]
    assert set(compared["series"]) == {str(jobs[0]), str(jobs[1])}
    assert dash.client.get("/ui/api/compare?ids=1,x").status_code == 422
    cluster = dash.client.get("/ui/api/cluster").json()
    assert cluster["capacity"] == {"gpus": 4, "cpus": 64, "nodes": 1}
    assert cluster["in_use"]["gpus"] == 2
    assert [(q["id"], q["reason"]) for q in cluster["queue"]] == [
        (jobs[2], "waiting for 8 GPUs: 2 free")]
    assert cluster["usage"] == [{"owner": "alice", "gpus": 2, "cpus": 8, "is_you": False}]


def test_the_main_metric_follows_the_objective() -> None:
    assert [views.headline(o) for o in ("clm", "mlm", "seq2seq")] == [
        "eval_loss", "eval_accuracy", "eval_rougeL"]
    assert views.chart_names(["train_loss", "eval_runtime", "eval_bleu", "epoch",
                              "learning_rate", "total_steps"]) == [
        "train_loss", "eval_bleu", "learning_rate"]
    assert CheckpointKind.FINAL.value == "final"
