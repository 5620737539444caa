"""How a worker talks to the control plane: over its HTTP API, with the attempt's token.

A Ray Job carries no database credential. Its driver and workers know two things, from
their environment: the server's URL (`ORCH_SERVER_URL`) and the attempt's token
(`ORCH_ATTEMPT_TOKEN`), which can report on this attempt of this job and nothing else.

Reports must survive a control plane that restarts (or is briefly unreachable) while the
job trains. So:

- `ControlPlaneClient.call` retries with backoff (up to `ORCH_REPORT_TIMEOUT`, 600 s) while
  the server cannot be reached or answers 5xx; every route is safe to call twice;
- `Outbox` sends the run's reports (metrics, checkpoint registrations, events) from a
  background thread, in order, so reporting never blocks a training step. It is bounded:
  past `MAX_BUFFERED_ROWS` buffered metric values the oldest are dropped (and the number
  dropped is reported once the server answers again); registrations and events are never
  dropped.

Torch-free: the driver imports it before any worker exists.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from orchestrator.api import (
    WorkerCheckpoint,
    WorkerCheckpointResponse,
    WorkerFinished,
    WorkerJob,
    WorkerLogsResponse,
    WorkerStarted,
    WorkerStartedResponse,
)
from orchestrator.settings import get_settings

log = logging.getLogger("orch.worker")
M = TypeVar("M", bound=BaseModel)

# Metric values held while the control plane is unreachable (about 24 bytes of payload
# each): at a few values per step this is tens of thousands of steps of outage.
MAX_BUFFERED_ROWS = 200_000
METRICS_PER_REQUEST = 5_000
_BACKOFF_FIRST, _BACKOFF_MAX = 0.25, 5.0


class AttemptOver(Exception):
    """The control plane no longer takes reports for this attempt (it ended: cancelled,
    failed, or settled after a loss). Nothing more to do for it."""


class ReportRejected(Exception):
    """A report the control plane refuses as invalid (a 4xx): retrying cannot help."""


class ControlPlaneGone(Exception):
    """The control plane did not answer within the report timeout."""


def new_key() -> str:
    return uuid.uuid4().hex


class ControlPlaneClient:
    def __init__(self, url: str, token: str, *, timeout: float | None = None,
                 http: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout if timeout is not None else get_settings().report_timeout
        self.http = http or httpx.Client(timeout=30.0)
        self.http.headers["Authorization"] = f"Bearer {token}"

    @classmethod
    def from_environment(cls) -> ControlPlaneClient:
        settings = get_settings()
        if not settings.server_url or not settings.attempt_token:
            raise RuntimeError("ORCH_SERVER_URL and ORCH_ATTEMPT_TOKEN must be set: a worker "
                               "runs inside a Ray Job that orch submitted")
        return cls(settings.server_url, settings.attempt_token)

    def close(self) -> None:
        self.http.close()

    # -- one request, retried ------------------------------------------------------------
    def call(self, method: str, path: str, *, json: Any = None, content: bytes | None = None,
             params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """Send until answered: retries (with backoff) while the server is unreachable or
        answers 5xx/429, up to `timeout` seconds (default the report timeout)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = _BACKOFF_FIRST
        while True:
            try:
                response = self.http.request(method, f"{self.url}{path}", json=json,
                                             content=content, params=params)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code in (401, 403):
                    raise AttemptOver(_detail(response))
                if response.status_code < 400:
                    return response.json() if response.content else None
                if response.status_code < 500 and response.status_code != 429:
                    raise ReportRejected(f"{method} {path}: {response.status_code} "
                                         f"{_detail(response)}")
                problem = f"{response.status_code} {_detail(response)}"
            if time.monotonic() + delay > deadline:
                raise ControlPlaneGone(f"the orch server at {self.url} did not answer "
                                       f"{method} {path}: {problem}")
            log.warning("orch server unreachable (%s); retrying %s %s in %.1fs", problem,
                        method, path, delay)
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)

    def _typed(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self.call(method, path, **kwargs))

    # -- the routes ------------------------------------------------------------------------
    def job(self) -> WorkerJob:
        return self._typed(WorkerJob, "GET", "/worker/job")

    def started(self, report: WorkerStarted) -> WorkerStartedResponse:
        return self._typed(WorkerStartedResponse, "POST", "/worker/started",
                           json=report.model_dump(mode="json"))

    def event(self, reason: str, details: dict[str, Any] | None = None) -> None:
        self.call("POST", "/worker/events",
                  json={"reason": reason, "details": details or {}, "key": new_key()})

    def finished(self, report: WorkerFinished) -> WorkerStartedResponse:
        return self._typed(WorkerStartedResponse, "POST", "/worker/finished",
                           json=report.model_dump(mode="json"))

    def log_chunk(self, offset: int, data: bytes, timeout: float | None = None) -> int:
        answer = self._typed(WorkerLogsResponse, "POST", "/worker/logs", content=data,
                             params={"offset": offset}, timeout=timeout)
        return answer.size


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:200]


@dataclass
class _Op:
    kind: str  # "metrics" | "checkpoint" | "event"
    payload: Any
    key: str = field(default_factory=new_key)


class Outbox:
    """The run's reports, sent in order by one background thread.

    `put_*` never block (a training step never waits for the network). `drain(timeout)`
    waits until everything queued so far was answered, e.g. before the attempt reports
    its end. After `AttemptOver` (the attempt was cancelled or settled) everything is
    dropped and `over` is set: the training loop can stop early.
    """

    def __init__(self, client: ControlPlaneClient,
                 remove_files: Callable[[str], None] | None = None,
                 max_rows: int = MAX_BUFFERED_ROWS) -> None:
        self.client = client
        self.remove_files = remove_files
        self.max_rows = max_rows
        self.over = False
        self.error: BaseException | None = None
        self.dropped = 0
        self._queue: deque[_Op] = deque()
        self._rows = 0  # metric values queued
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="orch-outbox", daemon=True)
        self._thread.start()

    # -- producers ---------------------------------------------------------------------
    def put_metrics(self, rows: list[tuple[int, str, float]]) -> None:
        if not rows or self.over:
            return
        with self._cond:
            last = self._queue[-1] if self._queue else None
            if last is not None and last.kind == "metrics" and len(last.payload) < METRICS_PER_REQUEST:
                last.payload.extend(rows)
            else:
                self._queue.append(_Op("metrics", list(rows)))
            self._rows += len(rows)
            self._shed()
            self._cond.notify()

    def put_checkpoint(self, report: WorkerCheckpoint) -> None:
        self._put(_Op("checkpoint", report))

    def put_event(self, reason: str, details: dict[str, Any] | None = None) -> None:
        self._put(_Op("event", {"reason": reason, "details": details or {}}))

    def _put(self, op: _Op) -> None:
        if self.over:
            return
        with self._cond:
            self._queue.append(op)
            self._cond.notify()

    def _shed(self) -> None:
        """Over the bound: drop the oldest metric values (never registrations or events)."""
        while self._rows > self.max_rows:
            oldest = next((op for op in self._queue if op.kind == "metrics"), None)
            if oldest is None:
                return
            excess = min(self._rows - self.max_rows, len(oldest.payload))
            del oldest.payload[:excess]
            self._rows -= excess
            self.dropped += excess
            if not oldest.payload:
                self._queue.remove(oldest)

    # -- the sender ----------------------------------------------------------------------
    def drain(self, timeout: float) -> bool:
        """Wait until everything queued so far was sent; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy) and not self.over and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout: float = 30.0) -> None:
        self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                op = self._queue[0]
                self._busy = True
                if op.kind == "metrics":
                    self._queue.popleft()
                    self._rows -= len(op.payload)
            try:
                self._send(op)
            except AttemptOver as exc:
                log.warning("the control plane ended this attempt (%s); dropping its reports",
                            exc)
                with self._cond:
                    self.over = True
                    self._queue.clear()
                    self._rows = 0
            except ReportRejected as exc:
                log.error("a report was refused and is dropped: %s", exc)
            except BaseException as exc:  # ControlPlaneGone, or a bug: stop, say why
                log.error("reporting stopped: %s", exc)
                with self._cond:
                    self.error = exc
                    self._busy = False
                    self._cond.notify_all()
                return
            with self._cond:
                if op.kind != "metrics" and self._queue and self._queue[0] is op:
                    self._queue.popleft()
                self._busy = False
                self._cond.notify_all()

    def _send(self, op: _Op) -> None:
        if op.kind == "metrics":
            self.client.call("POST", "/worker/metrics", json={"rows": op.payload})
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                self.client.event(f"{dropped} metric values were dropped while the control "
                                  "plane was unreachable (the worker's buffer was full)",
                                  {"dropped_metrics": dropped})
        elif op.kind == "event":
            self.client.call("POST", "/worker/events", json={**op.payload, "key": op.key})
        elif op.kind == "checkpoint":
            answer = WorkerCheckpointResponse.model_validate(self.client.call(
                "POST", "/worker/checkpoints", json=op.payload.model_dump(mode="json")))
            if answer.delete_ids and self.remove_files is not None:
                for ref in answer.delete:
                    self.remove_files(ref.path)
                self.client.call("POST", "/worker/checkpoints/deleted",
                                 json={"ids": answer.delete_ids})
