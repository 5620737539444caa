"""Following a job: `submit --wait`, `resume --wait` and `logs --follow`.

On a terminal, `--wait` draws a live bar, redrawn twice a second at most and polling the
server every few seconds (the first one redrew ten times a second and polled every second:
4.5% of a CPU to watch a job). When stdout or stderr is not a terminal (a file, a pipe, CI's
log) a live bar prints nothing until the end, so instead a plain line goes to stderr every
`ORCH_PROGRESS_INTERVAL` seconds (30): job, state, step/total, loss, elapsed, ETA.

Each poll names the state last seen and may wait (`GET /jobs/{id}?changed_from=&wait=`): the
server answers as soon as the state changes, so the end of a job is seen at once rather
than up to a poll interval later, and the number of requests stays one per interval.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator.api import JobDetail
from orchestrator.client import Client
from orchestrator.progress import duration, step_of
from orchestrator.settings import get_settings

POLL_SECONDS = 2.0  # how often the live bar asks the server


def on_terminal() -> bool:
    """Whether both output streams are a terminal (where a live bar can be seen)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def status_line(status: JobDetail) -> str:
    """One plain line of a job's progress: job 12 running step 120/300 loss 2.3104 ran
    4m12s ETA 6m40s (or, waiting, why)."""
    parts = [f"job {status.id}", status.state.value]
    step = step_of(status.progress.step, status.progress.total)
    if step:
        parts.append(f"step {step}")
    if "train_loss" in status.metrics:
        parts.append(f"loss {status.metrics['train_loss'].value:.4f}")
    if status.elapsed_seconds is not None:
        parts.append(f"ran {duration(status.elapsed_seconds)}")
    elif status.queued_seconds is not None and not status.state.is_terminal:
        parts.append(f"queued {duration(status.queued_seconds)}")
    if status.eta_seconds is not None:
        parts.append(f"ETA {duration(status.eta_seconds)}")
    if status.waiting_reason:
        parts.append(f"({status.waiting_reason})")
    return " ".join(parts)


class Ticker:
    """Prints `status_line` to stderr at most every `interval` seconds, and always when the
    state changes: the plain progress of a job followed off a terminal."""

    def __init__(self, client: Client, job_id: int, interval: float | None = None) -> None:
        from orchestrator.cli import plain

        self.client, self.job_id = client, job_id
        self.interval = interval if interval is not None else get_settings().progress_interval
        self.clean: Callable[[object], str] = plain
        self._last_at = -1e18
        self._last_state: str | None = None  # as last printed
        self._seen_state: str | None = None  # as last polled

    def tick(self, status: JobDetail | None = None, wait: float = 0) -> JobDetail:
        """Print the job's line if it is due; `wait`: let the server answer only once the
        state differs from the last one seen, or after that many seconds."""
        status = status or poll(self.client, self.job_id, self._seen_state, wait)
        self._seen_state = status.state.value
        now = time.monotonic()
        if now - self._last_at >= self.interval or status.state.value != self._last_state:
            click.echo(self.clean(status_line(status)), err=True)
            self._last_at, self._last_state = now, status.state.value
        return status


def poll(client: Client, job_id: int, seen_state: str | None, wait: float) -> JobDetail:
    """The job's status, the server waiting up to `wait` seconds for its state to differ
    from `seen_state`. Never returns sooner than `wait` with the state unchanged, so a
    server that does not wait (an older one) is still polled only once per `wait`."""
    if seen_state is None or wait <= 0:
        return client.get_as(JobDetail, f"/jobs/{job_id}")
    started = time.monotonic()
    status = client.get_as(JobDetail, f"/jobs/{job_id}", changed_from=seen_state, wait=wait)
    if status.state.value == seen_state:
        time.sleep(max(0.0, wait - (time.monotonic() - started)))
    return status


def follow(client: Client, job_id: int, err: Console) -> JobDetail:
    """Show the job's progress until it ends; return its final status."""
    from orchestrator.cli import _text

    if not on_terminal():
        ticker = Ticker(client, job_id)
        pause = min(POLL_SECONDS * 2, ticker.interval)
        while True:
            status = ticker.tick(wait=pause)
            if status.state.is_terminal:
                return status
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False, refresh_per_second=2) as progress:
        task = progress.add_task(f"job {job_id}", total=None, info="")
        seen: str | None = None
        while True:
            status = poll(client, job_id, seen, POLL_SECONDS)
            seen = status.state.value
            info = status.state.value
            if status.waiting_reason:
                info += f": {status.waiting_reason}"
            if "train_loss" in status.metrics:
                info += f"  loss {status.metrics['train_loss'].value:.4f}"
            if status.eta_seconds is not None:
                info += f"  ETA {duration(status.eta_seconds)}"
            progress.update(task, total=status.progress.total, completed=status.progress.step or 0,
                            info=_text(info))
            if status.state.is_terminal:
                return status
