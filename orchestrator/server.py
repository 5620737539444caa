"""`orch server`: the control plane. Owns the store and the scheduling loop; serves the API.

The CLI talks to it over HTTP (routes in `orchestrator.routes`). Started locally on demand
by the CLI (detached, so it outlives the command), or run by a team as a service.

Errors: an `OrchError` becomes its status (4xx; 503 when Ray is unreachable) with a body
`{"detail": "...", "problems": [...]}`; a request that does not fit the API's models is a
422 in the same shape; anything else is a bug, logged with its traceback and answered with
a 500 that says only that.
"""

from __future__ import annotations

import getpass
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from orchestrator import cluster, dashboard
from orchestrator.auth import AuthGate, open_to_all
from orchestrator.cluster import Capacity
from orchestrator.errors import OrchError, ProblemsError, SettingsError
from orchestrator.executor import Executor, RayJobsExecutor
from orchestrator.local_token import ensure_local_token
from orchestrator.preflight import warm_up
from orchestrator.routes import jobs, models, users, worker
from orchestrator.sandbox import prepare_server
from orchestrator.scheduler import Scheduler
from orchestrator.settings import Settings, get_settings
from orchestrator.store import Store
from orchestrator.tokens import LOCAL_PREFIX, new_token
from orchestrator.watch import JobWatch

log = logging.getLogger("orch.server")


class ControlPlane:
    """The store, the executor and the scheduler, plus the loop thread that drives them."""

    def __init__(self, store: Store, executor: Executor, capacity: Capacity,
                 interval: float | None = None,
                 refresh_capacity: Callable[[], Capacity] | None = None,
                 settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.store = store
        # Status requests waiting for a job's state to change (`--wait`) hear of it here.
        self.watch = JobWatch()
        store.on_state_change(self.watch.changed)
        self.scheduler = Scheduler(store, executor, capacity,
                                   user_gpu_cap=self.settings.user_gpu_cap,
                                   cluster_loss_grace=self.settings.cluster_loss_grace,
                                   reconcile_interval=self.settings.reconcile_interval)
        self.executor = executor
        self.interval = interval if interval is not None else self.settings.scheduler_interval
        self.refresh_capacity = refresh_capacity
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Every move this server commits may free resources or queue a job (a job's end, a
        # retry): tick at once. The interval is only the fallback for what changes
        # elsewhere (capacity, caps set on the database directly).
        store.on_state_change(lambda _job_ids: self._wake.set())
        self._thread = threading.Thread(target=self._loop, name="orch-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        """Tick now rather than at the next interval (a job was submitted, say)."""
        self._wake.set()

    def _loop(self) -> None:
        last_refresh = time.monotonic()
        while not self._stop.is_set():
            try:
                self.scheduler.tick()
                if self.refresh_capacity and time.monotonic() - last_refresh > 10:
                    last_refresh = time.monotonic()
                    self.scheduler.capacity = self.refresh_capacity()
            except Exception:
                log.exception("scheduler tick failed")
            self._wake.wait(self._next_tick_in())
            self._wake.clear()

    def _next_tick_in(self) -> float:
        """The interval, or less when the next reconciliation with Ray falls due sooner."""
        due = self.scheduler.reconcile_due_in()
        return min(self.interval, due) if due > 0 else self.interval


def default_control_plane(settings: Settings | None = None,
                          server_url: str | None = None) -> ControlPlane:
    """The control plane `orch server` runs; `server_url` is where its workers reach it."""
    settings = settings or get_settings()
    store = Store(settings.database())
    if settings.executor == "noop":
        from orchestrator.noop import NoopExecutor, noop_capacity

        return ControlPlane(store, NoopExecutor(store, finish=settings.noop_finish),
                            noop_capacity(settings), settings=settings)
    tgt = cluster.target()
    if tgt.local:
        cluster.start_local()
    cluster.apply_auth_env()
    executor = RayJobsExecutor(tgt.jobs_url, server_url=server_url, settings=settings)
    return ControlPlane(store, executor, cluster.capacity(tgt.jobs_url),
                        refresh_capacity=lambda: cluster.capacity(tgt.jobs_url),
                        settings=settings)


def _error_body(exc: OrchError) -> dict[str, object]:
    body: dict[str, object] = {"detail": str(exc)}
    if isinstance(exc, ProblemsError):
        body["problems"] = exc.problems
    return body


def create_app(plane: ControlPlane | None = None, server_url: str | None = None, *,
               local_token: str | None = None) -> FastAPI:
    """The API. Authentication follows the plane's `settings.auth`; in `local` mode the one
    token accepted is `local_token` (`orch server` passes the one in `$ORCH_HOME/api_token`;
    without it a random one, readable as `app.state.local_token`, e.g. by tests)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.plane = plane or default_control_plane(server_url=server_url)
        if app.state.plane.settings.auth == "users" and app.state.plane.store.count_users() == 0:
            log.warning("no users yet: make the first admin on this host with "
                        "`orch users add NAME --admin --database`")
        app.state.plane.start()
        # The first submit should not pay for importing transformers.
        threading.Thread(target=warm_up, name="orch-warm-up", daemon=True).start()
        yield
        app.state.plane.stop()

    app = FastAPI(title="orch", lifespan=lifespan)
    app.state.local_token = local_token or new_token(LOCAL_PREFIX)
    app.state.local_user = getpass.getuser()
    # Every request is authenticated here, before its body is read; a worker's log chunk
    # has its own bound (the route checks it too).
    app.add_middleware(AuthGate, body_limits={"/worker/logs": worker.MAX_LOG_CHUNK})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    open_to_all(app, "/health")  # liveness probes carry no token

    app.include_router(jobs.router)
    app.include_router(models.router)  # a job's model: which checkpoint, predictions
    app.include_router(users.router)
    app.include_router(worker.router)
    dashboard.install(app)  # the web UI at /, its JSON under /ui/api

    @app.exception_handler(OrchError)
    def orch_error(request: Request, exc: OrchError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=exc.status_code, content=_error_body(exc))

    @app.exception_handler(RequestValidationError)
    def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for item in exc.errors():
            where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
            problems.append(f"{where}: {item.get('msg', 'invalid')}" if where
                            else str(item.get("msg", "invalid")))
        return JSONResponse(status_code=422,
                            content={"detail": "; ".join(problems), "problems": problems})

    @app.exception_handler(Exception)
    def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(status_code=500,
                            content={"detail": "internal error in the orch server; its log "
                                               "has the details"})

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_start(host: str, settings: Settings) -> None:
    """Refuse, in one line, to start a server others could drive without a user's token."""
    if settings.auth != "users" and not is_loopback(host):
        raise SettingsError([
            f"--host {host}: a server other machines can reach must know who is calling; "
            "run it with --auth users (every request needs a user's token, see `orch users`) "
            "or listen on --host 127.0.0.1"])


def serve(host: str, port: int) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings()
    check_start(host, settings)
    prepare_server(settings)  # umask 077, a private $ORCH_HOME, the roots checked
    local_token = ensure_local_token(settings.home_dir()) if settings.auth == "local" else None
    # Workers on this machine reach a loopback or all-interfaces server at 127.0.0.1.
    local = f"http://127.0.0.1:{port}" if host in ("127.0.0.1", "0.0.0.0", "localhost") else None
    server_url = settings.advertised_url or local or f"http://{host}:{port}"
    log.info("orch server on %s:%s, auth %s", host, port, settings.auth)
    uvicorn.run(create_app(server_url=server_url, local_token=local_token), host=host,
                port=port, log_level="warning")
