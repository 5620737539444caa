"""JobWatch: the events of waiting requests are set by moves of their own job only, from
any thread, and a request that stops waiting leaves nothing behind."""

from __future__ import annotations

import asyncio
import threading

from orchestrator.watch import JobWatch


def test_a_change_wakes_the_waiters_of_that_job_only() -> None:
    watch = JobWatch()

    async def scenario() -> None:
        with watch.watching(1) as first, watch.watching(1) as second, watch.watching(2) as other:
            assert watch.waiting() == 3
            # From another thread, as the scheduler's and the server's worker threads do.
            mover = threading.Thread(target=watch.changed, args=([1, 3],))
            mover.start()
            await asyncio.wait_for(asyncio.gather(first.wait(), second.wait()), 5)
            mover.join()
            await asyncio.sleep(0.05)
            assert not other.is_set()
        assert watch.waiting() == 0

    asyncio.run(scenario())
    watch.changed([1, 2])  # nobody waits: nothing to do, and no closed loop is touched

