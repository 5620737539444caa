"""Wakes the status requests that wait for a job's state to change (`orch submit --wait`).

The store tells the watch about every move it commits in this process (`Store.transition`,
`Store.claim_jobs`); the watch sets the asyncio events of the requests waiting on those jobs,
from whichever thread made the move. So a waiting request hears of a change at once and does
nothing meanwhile: no rereads of the database while the job trains.

A move made by another process (a second server on the same database) is not announced
here; a waiting request still rereads the state every `FALLBACK_RECHECK_S` for those.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# How often a waiting request rereads the job's state anyway, for moves this process did
# not make. One small read per waiting client every few seconds.
FALLBACK_RECHECK_S = 2.0


class JobWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[int, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def changed(self, job_ids: Iterable[int]) -> None:
        """The state of these jobs changed (called from any thread, after the commit)."""
        with self._lock:
            woken = [waiter for job_id in job_ids for waiter in self._waiting.get(job_id, ())]
        for loop, event in woken:
            # The loop may be closing (the server stopping): nothing is waiting then.
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    @contextmanager
    def watching(self, job_id: int) -> Iterator[asyncio.Event]:
        """An event set whenever the job's state changes while the block runs. Enter it
        before reading the state, so that a change right after the read is not missed."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(waiter)
        try:
            yield waiter[1]
        finally:
            with self._lock:
                waiters = self._waiting.get(job_id, set())
                waiters.discard(waiter)
                if not waiters:
                    self._waiting.pop(job_id, None)

    def waiting(self) -> int:
        """How many requests wait (for tests)."""
        with self._lock:
            return sum(len(w) for w in self._waiting.values())
