"""One task never takes the runner down: whatever a handler returns, raises or holds, and
whatever its input, only that task's attempt fails (counted, its error recorded)."""

from __future__ import annotations

import asyncio
import threading

import anyio

from pgflow_py.runtime.threads import HandlerThreads


def test_sync_handlers_queued_together_each_get_a_thread() -> None:
    # A thread counts itself idle just before it takes a job already queued: a second job
    # queued at that moment must still get a thread of its own, not wait for the first to end.
    async def main() -> None:
        threads = HandlerThreads(4)
        try:
            for _ in range(20):
                await threads.run(lambda: None)
                while threads._idle == 0:  # until its thread waits for the next job
                    await asyncio.sleep(0.0005)
                both = threading.Barrier(2, timeout=5)
                # Each waits for the other: they pass only if they run at once.
                await asyncio.gather(threads.run(both.wait), threads.run(both.wait))
        finally:
            threads.close()

    anyio.run(main)
