"""The web dashboard in a real browser: a real `orch server` process (no-op executor, so no
Ray), jobs with metrics written through the store, and the system's Chromium driven by
Playwright.

One server and one browser for the module; each test opens its own pages. A screenshot of
every page goes to the test's temporary directory (printed at the end; `--basetemp` keeps
it), for people to look at.

The server runs as a team server (`ORCH_AUTH=users`): alice and bob each sign in through
the login page with a token of their own, as people do; the server tells them apart from
the token alone.
"""

from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from orchestrator import joblogs
from orchestrator.downsample import downsample
from orchestrator.models import Attempt, CheckpointKind, Job, JobEvent
from orchestrator.states import JobState
from orchestrator.store import Store
from tests.support import REPO, wait_until

CHROMIUM = os.environ.get("ORCH_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-default-apps"]
# Team servers with accounts (`Store.create_user`, `orch users`) give each user a token.
# Where the store has no accounts yet, the server takes one shared token and the user's name
# from the X-Orch-User header, which the browser then sends with every request.
ACCOUNTS = hasattr(Store, "create_user")
SHARED_TOKEN = "orch_dashboard_test_token_0123456789abcdef"
USERS = ("alice", "bob")
BOUND = 1000  # points per series the server sends (orchestrator.dashboard.views.MAX_POINTS)
VIEWPORT = {"width": 1440, "height": 960}


# -- the jobs the server starts with ---------------------------------------------------
def _curve(steps: range, seed: int, *, total: int, scale: float = 700.0,
           grad_norm: bool = False) -> list[tuple[int, str, float]]:
    """A plausible training run of `total` steps: decaying noisy loss, warmup then a linear
    learning-rate decay (the same schedule for any slice of the run, as a resume sees it)."""
    rng = random.Random(seed)
    rows: list[tuple[int, str, float]] = []
    for step in steps:
        loss = 0.9 + 2.3 * math.exp(-step / scale) + rng.gauss(0, 0.05)
        lr = 3e-4 * min(1.0, step / 100) * (1 - step / total)
        rows += [(step, "train_loss", round(loss, 5)), (step, "learning_rate", lr)]
        if grad_norm:
            rows.append((step, "grad_norm",
                         round(abs(rng.gauss(1.2, 0.3)) + 2.0 * math.exp(-step / 300), 4)))
    return rows


def _evals(steps: range, objective: str, seed: int) -> list[tuple[int, str, float]]:
    rng = random.Random(seed)
    rows: list[tuple[int, str, float]] = []
    for step in steps:
        loss = 1.1 + 2.0 * math.exp(-step / 900) + rng.gauss(0, 0.02)
        rows.append((step, "eval_loss", round(loss, 5)))
        if objective == "clm":
            rows.append((step, "eval_perplexity", round(math.exp(loss), 4)))
        elif objective == "mlm":
            rows.append((step, "eval_accuracy", round(0.75 - 0.4 * math.exp(-step / 500), 4)))
        else:
            rouge = 0.42 - 0.3 * math.exp(-step / 600) + rng.gauss(0, 0.004)
            rows += [(step, "eval_rougeL", round(rouge, 4)), (step, "eval_rouge1", round(rouge + 0.07, 4)),
                     (step, "eval_bleu", round(rouge * 55, 3))]
        rows += [(step, "eval_runtime", 3.2), (step, "eval_samples_per_second", 80.0)]
    return rows


@dataclass
class Seeded:
    ids: dict[str, int]  # a role in the tests -> job id
    owners: dict[int, str]
    states: dict[int, str]


def _job(store: Store, name: str, objective: str, owner: str, *, gpus: int = 1,
         model: str = "./assets/models/gpt2-tiny", max_steps: int = 1000,
         **extra: Any) -> int:
    spec = {"name": name, "objective": objective, "model": model,
            "resources": {"gpus": gpus, "cpus": 4},
            "training": {"max_steps": max_steps, "learning_rate": 3e-4, "batch_size": 16}}
    spec_yaml = (f"name: {name}\nobjective: {objective}\nmodel: {model}\n"
                 f"resources:\n  gpus: {gpus}\n  cpus: 4\ntraining:\n  max_steps: {max_steps}\n"
                 "  learning_rate: 3.0e-4\n  batch_size: 16\n")
    job = store.create_job(name=name, objective=objective, owner=owner, spec=spec,
                           spec_yaml=spec_yaml, gpus=gpus, cpus=4, **extra)
    assert job.id is not None
    return int(job.id)


def _run(store: Store, job_id: int, total: int) -> None:
    store.claim_jobs([job_id])
    store.transition(job_id, JobState.RUNNING, "worker started on node-1 (pid 4242)",
                     expected=[JobState.PENDING], details={"attempt": 1, "host": "node-1"})
    store.add_metrics(job_id, 1, [(0, "total_steps", float(total))])


def _checkpoint(store: Store, job_id: int, step: int, metrics: dict[str, float],
                kind: CheckpointKind = CheckpointKind.CHECKPOINT) -> None:
    size = 498_000_000 + step * 1000
    if kind == CheckpointKind.FINAL:
        store.add_checkpoint(job_id, attempt=1, step=step, size_bytes=size, metrics=metrics,
                             path=f"/data/orch/jobs/{job_id}/final", kind=kind)
        return
    store.register_checkpoint(job_id, attempt=1, step=step, size_bytes=size, metrics=metrics,
                              path=f"/data/orch/jobs/{job_id}/checkpoints/checkpoint-{step}",
                              keep_last=2, best_metric="eval_loss", best_mode="min")


def _log(home: Path, job_id: int, steps: range, seed: int) -> None:
    """What a worker's log looks like: the Trainer's progress lines."""
    rng = random.Random(seed)
    lines = [f"[orch] job {job_id} attempt 1 on node-1: 1 worker, cuda:0",
             "[orch] loading model and tokenizer", "[orch] training starts at step 0"]
    for step in steps:
        if step % 10 == 0:
            loss = 0.9 + 2.3 * math.exp(-step / 500) + rng.gauss(0, 0.05)
            lines.append(f"{{'loss': {loss:.4f}, 'grad_norm': {rng.uniform(0.8, 1.6):.3f}, "
                         f"'learning_rate': {3e-4 * (1 - step / 5200):.3e}, "
                         f"'epoch': {step / 1250:.2f}}}")
    joblogs.append_chunk(home, job_id, 1, 0, ("\n".join(lines) + "\n").encode())


def _backdate(store: Store, job_id: int, *, ago: float, queued: float, ran: float | None) -> None:
    """Spread the job's history over time as a real one is (seeding takes milliseconds):
    created `ago` seconds ago, queued for `queued`, then ran for `ran` (None: not started)."""
    now = datetime.now(timezone.utc)
    created = now - timedelta(seconds=ago)
    started = created + timedelta(seconds=queued) if ran is not None else None
    job = store.require_job(job_id)
    finished = (started + timedelta(seconds=ran)
                if started is not None and job.state.is_terminal else None)
    times = {None: created, JobState.QUEUED: created,
             JobState.PENDING: (started or created) - timedelta(seconds=2)}
    times.update({JobState.RUNNING: started, JobState.SUCCEEDED: finished,
                  JobState.FAILED: finished, JobState.CANCELLED: finished})
    with store.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(
            created_at=created, started_at=started, finished_at=finished))
        for event in store.events(job_id):
            at = times.get(event.to_state if event.from_state else None) or created
            conn.execute(update(JobEvent).where(JobEvent.id == event.id).values(at=at))
        conn.execute(update(Attempt).where(Attempt.job_id == job_id).values(
            started_at=started or created, ended_at=finished))


def seed(store: Store, home: Path) -> Seeded:
    ids: dict[str, int] = {}
    # A finished run, 600 steps (under the chart bound: every point drawn).
    done = ids["succeeded"] = _job(store, "gpt2-clm-wikitext", "clm", "alice", max_steps=600)
    _run(store, done, 600)
    store.add_metrics(done, 1, _curve(range(1, 601), 1, total=600)
                      + _evals(range(100, 601, 100), "clm", 1))
    for step in (300, 600):
        _checkpoint(store, done, step, {"eval_loss": 2.0 - step / 1000})
    _checkpoint(store, done, 600, {"eval_loss": 1.4}, CheckpointKind.FINAL)
    store.transition(done, JobState.SUCCEEDED, "training finished",
                     attempt_ended=("succeeded", None))

    failed = ids["failed"] = _job(store, "bert-mlm-imdb", "mlm", "bob",
                                  model="./assets/models/bert-tiny", max_steps=400)
    _run(store, failed, 400)
    store.add_metrics(failed, 1, _curve(range(1, 151), 2, total=400)
                      + _evals(range(100, 151, 100), "mlm", 2))
    _checkpoint(store, failed, 100, {"eval_loss": 2.5, "eval_accuracy": 0.41})
    store.transition(failed, JobState.FAILED, "error in the job", error=(
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n(trace)"),
        attempt_ended=("failed", "out of memory"))

    cancelled = ids["cancelled"] = _job(store, "t5-summarize", "seq2seq", "carol",
                                        model="./assets/models/t5-tiny", max_steps=300)
    _run(store, cancelled, 300)
    store.add_metrics(cancelled, 1, _curve(range(1, 81), 3, total=300))
    store.transition(cancelled, JobState.CANCELLED, "cancelled by carol",
                     attempt_ended=("cancelled", "cancelled by carol"), details={"user": "carol"})

    # A chain: the parent ran to step 450 and was lost after its checkpoint at 300; the
    # child resumed from 300. The parent's points 301..450 are rolled back.
    parent = ids["parent"] = _job(store, "t5-xsum", "seq2seq", "alice",
                                  model="./assets/models/t5-tiny", max_steps=700)
    _run(store, parent, 700)
    store.add_metrics(parent, 1, _curve(range(1, 451), 4, total=700, scale=400)
                      + _evals(range(100, 451, 100), "seq2seq", 4))
    _checkpoint(store, parent, 300, {"eval_loss": 1.9, "eval_rougeL": 0.3})
    store.transition(parent, JobState.FAILED, "the Ray cluster was unreachable for 31s",
                     error="the Ray cluster was unreachable for 31s",
                     attempt_ended=("failed", "cluster lost"))
    child = ids["child"] = _job(
        store, "t5-xsum", "seq2seq", "alice", model="./assets/models/t5-tiny", max_steps=700,
        parent_job_id=parent, resume_from=f"/data/orch/jobs/{parent}/checkpoints/checkpoint-300",
        reason=f"submitted by alice: resume of job {parent} from step 300",
        details={"resumes": parent, "resume_step": 300})
    _run(store, child, 700)
    resumed = [r for r in _curve(range(1, 701), 4, total=700, scale=400) if r[0] > 300]
    store.add_metrics(child, 1, resumed + _evals(range(400, 701, 100), "seq2seq", 5))
    _checkpoint(store, child, 700, {"eval_loss": 1.3, "eval_rougeL": 0.41}, CheckpointKind.FINAL)
    store.transition(child, JobState.SUCCEEDED, "training finished",
                     attempt_ended=("succeeded", None))

    # A long live run: more points than the chart bound.
    long_run = ids["long"] = _job(store, "gpt2-clm-openwebtext", "clm", "alice", gpus=2,
                                  max_steps=2500)
    _run(store, long_run, 2500)
    store.add_metrics(long_run, 1, _curve(range(1, 1501), 6, total=2500, scale=500,
                                          grad_norm=True)
                      + _evals(range(75, 1501, 75), "clm", 6))
    for step in (1200, 1500):
        _checkpoint(store, long_run, step, {"eval_loss": 1.2 + 300 / step})

    others = ids["others"] = _job(store, "bert-mlm-wiki", "mlm", "bob", gpus=2,
                                  model="./assets/models/bert-tiny", max_steps=2000)
    _run(store, others, 2000)
    store.add_metrics(others, 1, _curve(range(1, 401), 7, total=2000)
                      + _evals(range(200, 401, 200), "mlm", 7))

    mine = ids["mine"] = _job(store, "gpt2-clm-sweep-3", "clm", "alice", max_steps=800)
    _run(store, mine, 800)
    store.add_metrics(mine, 1, _curve(range(1, 41), 8, total=800))
    # Tests run in any order: the live chart grows on a job no test cancels.
    live = ids["live"] = _job(store, "gpt2-clm-sweep-4", "clm", "alice", max_steps=800)
    _run(store, live, 800)
    store.add_metrics(live, 1, _curve(range(1, 41), 9, total=800))

    # Queued behind the 5 GPUs in use (8 in all): the head waits and holds up the next.
    ids["queued_head"] = _job(store, "qwen-0.5b-clm", "clm", "carol", gpus=6,
                              model="Qwen/Qwen2.5-0.5B", max_steps=3000, priority=5)
    ids["queued_next"] = _job(store, "t5-small-cnn", "seq2seq", "bob",
                              model="google-t5/t5-small", max_steps=2000)

    _log(home, long_run, range(1, 1501), 6)
    hour = 3600.0
    for role, ago, queued, ran in (
            ("succeeded", 30 * hour, 40, 2.1 * hour), ("failed", 26 * hour, 300, 0.4 * hour),
            ("cancelled", 22 * hour, 12, 0.2 * hour), ("parent", 20 * hour, 65, 1.5 * hour),
            ("child", 17 * hour, 20, 2.3 * hour), ("long", 5.5 * hour, 140, 5.4 * hour),
            ("others", 1.2 * hour, 30, 1.1 * hour), ("mine", 0.3 * hour, 15, 0.25 * hour),
            ("live", 0.25 * hour, 10, 0.2 * hour),
            ("queued_head", 0.5 * hour, 0, None), ("queued_next", 0.2 * hour, 0, None)):
        _backdate(store, ids[role], ago=ago, queued=queued, ran=ran)
    jobs = [store.require_job(i) for i in ids.values()]
    return Seeded(ids=ids, owners={int(j.id or 0): j.owner for j in jobs},
                  states={int(j.id or 0): j.state.value for j in jobs})


# -- the server and the browser ----------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Dashboard:
    url: str
    env: dict[str, str]
    store: Store
    seeded: Seeded
    shots: Path
    tokens: dict[str, str]

    def job(self, role: str) -> int:
        return self.seeded.ids[role]

    def context(self, browser: Any, user: str) -> Any:
        """A fresh browser context (no cookies yet) for `user`."""
        headers = {} if ACCOUNTS else {"X-Orch-User": user}
        return browser.new_context(viewport=VIEWPORT, extra_http_headers=headers)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    home = tmp_path_factory.mktemp("dashboard-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_"))}
    env.update(ORCH_HOME=str(home), ORCH_EXECUTOR="noop", ORCH_NOOP_GPUS="8",
               ORCH_NOOP_CPUS="64", ORCH_SERVER_PORT=str(port), ORCH_AUTH="users",
               ORCH_SCHEDULER_INTERVAL="0.3", PYTHONUNBUFFERED="1")
    store = Store(f"sqlite:///{home}/orch.db")
    if ACCOUNTS:
        tokens = {name: store.create_user(name, actor="test")[1].token  # type: ignore[attr-defined]
                  for name in USERS}
    else:
        env["ORCH_API_TOKEN"] = SHARED_TOKEN
        tokens = dict.fromkeys(USERS, SHARED_TOKEN)
    seeded = seed(store, home)  # before the server starts: its scheduler finds them as they are
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "server", "--host", "127.0.0.1",
         "--port", str(port)], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert server.poll() is None, (home / "server.log").read_text()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        wait_until(up, 60, "the orch server to answer")
        shots = tmp_path_factory.mktemp("screenshots")
        yield Dashboard(url=url, env=env, store=store, seeded=seeded, shots=shots,
                        tokens=tokens)
        print(f"\ndashboard screenshots: {shots}")
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()
        store.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; a skipped browser test in CI is a failure")
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def alice(dashboard: Dashboard, browser: Any) -> Iterator[Any]:
    """alice's browser, signed in once for the module's tests."""
    context = signed_in(browser, dashboard, "alice")
    yield context
    context.close()


def signed_in(browser: Any, dash: Dashboard, user: str) -> Any:
    """A browser context of `user`, signed in through the login form with their token."""
    context = dash.context(browser, user)
    page = context.new_page()
    page.goto(f"{dash.url}/")
    assert page.url.startswith(f"{dash.url}/login")
    page.fill("#token", dash.tokens[user])
    page.click("button[type=submit]")
    page.wait_for_url(f"{dash.url}/")
    page.close()
    return context


def shot(page: Any, dash: Dashboard, name: str) -> Path:
    path = dash.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def chart_points(page: Any, chart: str) -> dict[str, int]:
    """Series label -> points the chart draws (non-null values in uPlot's own data)."""
    return page.evaluate("""(id) => {
        const c = window.orchCharts[id];
        if (!c || !c.plot) return null;
        const out = {};
        c.plot.series.slice(1).forEach((s, i) => {
            out[s.label] = c.plot.data[i + 1].filter((v) => v !== null).length; });
        return out; }""", chart)


def live_count(store: Store, job_id: int, name: str) -> int:
    return len(store.metrics(job_id, name=name))


def drawn_count(store: Store, job_id: int, name: str) -> int:
    """How many points a chart should draw of a series: all of them up to the bound, else
    what the downsampler keeps of the store's values (the bound, or one or two fewer when
    LTTB picked the extremes itself)."""
    rows = store.metrics(job_id, name=name)
    kept = len(downsample([m.step for m in rows], [m.value for m in rows], BOUND)[0])
    assert kept == len(rows) or BOUND - 2 <= kept <= BOUND
    return kept


# -- the tests -------------------------------------------------------------------------
def test_sign_in_is_required_and_works(dashboard: Dashboard, browser: Any) -> None:
    # Without a cookie or token: pages go to the login page, JSON and the API say 401.
    bare = httpx.get(f"{dashboard.url}/", follow_redirects=False)
    assert bare.status_code == 303 and bare.headers["location"] == "/login"
    assert httpx.get(f"{dashboard.url}/ui/api/jobs").status_code == 401
    assert httpx.get(f"{dashboard.url}/jobs").status_code == 401
    assert httpx.post(f"{dashboard.url}/jobs/{dashboard.job('mine')}/cancel").status_code == 401

    context = dashboard.context(browser, "alice")
    page = context.new_page()
    target = f"/ui/jobs/{dashboard.job('long')}"
    page.goto(f"{dashboard.url}{target}")
    assert "/login?next=" in page.url
    shot(page, dashboard, "login")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    assert page.inner_text("[data-testid=login-error]")
    assert not [c for c in context.cookies() if c["name"] == "orch_token"]
    # A team server takes no token in a URL (it would end up in histories and logs).
    page.goto(f"{dashboard.url}/login?token={dashboard.tokens['alice']}")
    assert not [c for c in context.cookies() if c["name"] == "orch_token"]

    page.goto(f"{dashboard.url}{target}")
    page.fill("#token", dashboard.tokens["alice"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{dashboard.url}{target}")  # back where the login started
    cookies = {c["name"]: c for c in context.cookies()}
    assert cookies["orch_token"]["httpOnly"] and cookies["orch_token"]["sameSite"] == "Strict"
    assert not cookies["orch_csrf"]["httpOnly"] and cookies["orch_csrf"]["sameSite"] == "Strict"
    assert "orch_token" not in page.evaluate("document.cookie")  # scripts cannot read it
    assert page.inner_text("[data-testid=user-name]") == "alice"

    page.click("#logout-form button")
    page.wait_for_url(f"{dashboard.url}/login")
    page.goto(f"{dashboard.url}/")
    assert page.url.startswith(f"{dashboard.url}/login")
    context.close()


def test_jobs_page_lists_jobs_and_filters_them(dashboard: Dashboard, alice: Any) -> None:
    page = alice.new_page()
    page.goto(f"{dashboard.url}/")
    page.wait_for_selector("#jobs-body tr")
    rows = page.eval_on_selector_all("#jobs-body tr", "rs => rs.map(r => +r.dataset.jobId)")
    assert sorted(rows) == sorted(dashboard.seeded.ids.values())
    head = dashboard.job("queued_head")
    reason = page.inner_text(f"#jobs-body tr[data-job-id='{head}'] .why")
    held = sum(j.gpus for j in dashboard.store.list_jobs(states=[JobState.RUNNING]))
    assert reason == f"waiting for 6 GPUs: {8 - held} free"  # 8 GPUs in all
    assert "1 job ahead" in page.inner_text(
        f"#jobs-body tr[data-job-id='{dashboard.job('queued_next')}'] .why")
    long_row = page.inner_text(f"#jobs-body tr[data-job-id='{dashboard.job('long')}']")
    assert "1500 / 2500" in long_row and "eval_loss" in long_row
    shot(page, dashboard, "jobs")

    page.click("#state-filter [data-state=failed]")
    page.wait_for_function("() => [...document.querySelectorAll('#jobs-body tr')]"
                           ".every(r => r.dataset.state === 'failed')")
    failed = page.eval_on_selector_all("#jobs-body tr", "rs => rs.map(r => +r.dataset.jobId)")
    assert failed == sorted((i for i, s in dashboard.seeded.states.items() if s == "failed"),
                            reverse=True)
    assert "state=failed" in page.url

    page.click("#state-filter [data-state=all]")
    page.select_option("#owner-filter", "bob")
    page.wait_for_function("() => [...document.querySelectorAll('#jobs-body tr')]"
                           ".every(r => r.dataset.owner === 'bob')")
    bobs = page.eval_on_selector_all("#jobs-body tr", "rs => rs.map(r => +r.dataset.jobId)")
    assert sorted(bobs) == sorted(i for i, o in dashboard.seeded.owners.items() if o == "bob")
    page.close()


def test_job_page_charts_every_point_up_to_the_bound(dashboard: Dashboard, alice: Any) -> None:
    page = alice.new_page()
    long_run = dashboard.job("long")
    page.goto(f"{dashboard.url}/ui/jobs/{long_run}")
    page.wait_for_function("() => window.orchCharts && window.orchCharts.loss")
    # 1500 train_loss values in the store: downsampled to the bound. 20 evaluations: all.
    assert live_count(dashboard.store, long_run, "train_loss") == 1500
    assert chart_points(page, "loss") == {
        "train_loss": drawn_count(dashboard.store, long_run, "train_loss"),
        "eval_loss": live_count(dashboard.store, long_run, "eval_loss")}
    assert chart_points(page, "learning_rate") == {
        "learning_rate": drawn_count(dashboard.store, long_run, "learning_rate")}
    assert chart_points(page, "eval_perplexity") == {"eval_perplexity": 20}
    assert "eval_runtime" not in page.evaluate("Object.keys(window.orchCharts)")
    assert page.is_visible("[data-testid=cancel]")  # alice's own running job
    assert page.inner_text("#checkpoints-body").count("checkpoint-") == 2
    page.wait_for_function("() => document.getElementById('log').textContent.includes('loss')")
    shot(page, dashboard, "job")

    # A finished run under the bound: every stored point is drawn.
    done = dashboard.job("succeeded")
    page.goto(f"{dashboard.url}/ui/jobs/{done}")
    page.wait_for_function("() => window.orchCharts && window.orchCharts.loss")
    assert chart_points(page, "loss") == {
        "train_loss": live_count(dashboard.store, done, "train_loss"),
        "eval_loss": live_count(dashboard.store, done, "eval_loss")}
    assert not page.is_visible("[data-testid=cancel]")  # finished: nothing to cancel
    page.close()


def test_a_resumed_chain_is_one_curve(dashboard: Dashboard, alice: Any) -> None:
    page = alice.new_page()
    child, parent = dashboard.job("child"), dashboard.job("parent")
    page.goto(f"{dashboard.url}/ui/jobs/{child}")
    page.wait_for_function("() => window.orchCharts && window.orchCharts.loss")
    # The parent's steps up to its checkpoint (300), then the child's own (301..700).
    assert chart_points(page, "loss")["train_loss"] == 300 + live_count(
        dashboard.store, child, "train_loss")
    assert f"#{parent}" in page.inner_text("#chain-note")
    # On request, the parent's rolled-back steps 301..450 come back as superseded points.
    page.check("#show-superseded")
    page.wait_for_function("() => window.orchCharts.loss.plot.series.length === 5")
    points = chart_points(page, "loss")
    assert points["train_loss (superseded)"] == 150 and points["train_loss"] == 700
    shot(page, dashboard, "job-resumed")
    page.close()


def test_a_live_chart_grows_without_a_reload(dashboard: Dashboard, alice: Any) -> None:
    page = alice.new_page()
    live = dashboard.job("live")
    page.goto(f"{dashboard.url}/ui/jobs/{live}")
    page.wait_for_function("() => window.orchCharts && window.orchCharts.loss")
    assert chart_points(page, "loss") == {"train_loss": 40}
    page.evaluate("window.__same_page = true")
    dashboard.store.add_metrics(live, 1, _curve(range(41, 66), 9, total=800)
                                + [(60, "eval_loss", 2.1)])
    joblogs.append_chunk(Path(dashboard.env["ORCH_HOME"]), live, 1, 0,
                         b"{'loss': 2.4051, 'epoch': 0.05}\n")
    page.wait_for_function("() => window.orchCharts.loss.plot.data[0].length >= 65",
                           timeout=15_000)
    assert chart_points(page, "loss") == {"train_loss": 65, "eval_loss": 1}
    page.wait_for_function("() => document.getElementById('log').textContent"
                           ".includes(\"'loss': 2.4051\")", timeout=15_000)
    assert page.evaluate("window.__same_page") is True  # updated in place, not reloaded
    page.close()


def test_cancel_is_for_the_owner_and_forged_posts_are_refused(dashboard: Dashboard,
                                                              alice: Any) -> None:
    page = alice.new_page()
    theirs, mine = dashboard.job("others"), dashboard.job("mine")

    page.goto(f"{dashboard.url}/ui/jobs/{theirs}")
    page.wait_for_selector("#job-stats .stat")
    assert not page.is_visible("[data-testid=cancel]")  # bob's job: no button for alice

    def post(path: str, csrf: str | None) -> int:
        return int(page.evaluate("""async ([path, csrf]) => {
            const headers = csrf === null ? {} : {"X-Orch-CSRF": csrf};
            const r = await fetch(path, {method: "POST", headers, credentials: "same-origin"});
            return r.status; }""", [path, csrf]))

    csrf = page.evaluate("orch.cookie('orch_csrf')")
    assert post(f"/jobs/{mine}/cancel", None) == 403  # the cookie alone is not enough
    assert post(f"/jobs/{mine}/cancel", "forged") == 403
    if ACCOUNTS:  # the API's owner rule (issue 9) comes with accounts
        assert post(f"/jobs/{theirs}/cancel", csrf) == 403  # bob's job, whatever the page
    assert dashboard.store.require_job(mine).state == JobState.RUNNING
    assert dashboard.store.require_job(theirs).state == JobState.RUNNING

    page.goto(f"{dashboard.url}/ui/jobs/{mine}")
    page.click("[data-testid=cancel]")
    page.click("#confirm-yes")
    wait_until(lambda: dashboard.store.require_job(mine).state == JobState.CANCELLED, 10,
               "the job to be cancelled")
    page.wait_for_selector("#job-state [data-state=cancelled]")
    assert not page.is_visible("[data-testid=cancel]")
    events = dashboard.store.events(mine)
    assert events[-1].to_state == JobState.CANCELLED and (events[-1].details or {})["user"] == "alice"

    # Resume: offered on alice's failed job with a checkpoint, not on bob's (which has one
    # too). The click goes to the API (with the CSRF header), which finds the checkpoint's
    # files gone: 409, shown.
    page.goto(f"{dashboard.url}/ui/jobs/{dashboard.job('failed')}")
    page.wait_for_selector("#job-stats .stat")
    assert not page.is_visible("[data-testid=resume]")
    parent = dashboard.job("parent")
    before = dashboard.store.resumed_by(parent)  # the seeded child
    page.goto(f"{dashboard.url}/ui/jobs/{parent}")
    page.click("[data-testid=resume]")
    page.click("#confirm-yes")
    assert "no complete checkpoint" in page.inner_text(".toast.error")
    assert dashboard.store.resumed_by(parent) == before
    page.close()


def test_compare_cluster_and_error_pages(dashboard: Dashboard, alice: Any) -> None:
    page = alice.new_page()
    a, b = dashboard.job("succeeded"), dashboard.job("long")
    page.goto(f"{dashboard.url}/ui/compare?ids={a},{b}")
    page.wait_for_function("() => window.orchCharts && window.orchCharts.train_loss")
    points = chart_points(page, "train_loss")
    assert sorted(points.values()) == [600, drawn_count(dashboard.store, b, "train_loss")]
    shot(page, dashboard, "compare")

    page.goto(f"{dashboard.url}/ui/cluster")
    page.wait_for_selector("#queue-body tr")
    queue = page.eval_on_selector_all("#queue-body tr", "rs => rs.map(r => +r.dataset.jobId)")
    assert queue == [dashboard.job("queued_head"), dashboard.job("queued_next")]  # by priority
    assert "1 job ahead" in page.inner_text("#queue-body")
    usage = page.inner_text("#usage-body")
    assert "alice" in usage and "bob" in usage
    shot(page, dashboard, "cluster")

    page.goto(f"{dashboard.url}/ui/jobs/987654")
    assert page.inner_text("h1") == "Not found" and "Traceback" not in page.content()
    shot(page, dashboard, "not-found")
    page.goto(f"{dashboard.url}/no/such/page")
    assert page.inner_text("h1") == "Not found"
    page.close()
