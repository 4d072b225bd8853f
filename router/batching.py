"""Adaptive micro-batching of concurrent calls into one worker-thread call per batch.

A batch starts as soon as the previous one has finished, with every request that queued meanwhile (up to
`max_size`). An idle router therefore adds no wait to a lone request, and a busy one embeds big batches.
`@serve.batch` differs in two ways that matter here: a lone request always waits the full
`batch_wait_timeout_s`, and it closes batches on that timer even while the previous batch still runs, so under
steady load it queues many small batches instead of growing them. It also only runs inside a Serve replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class AdaptiveBatcher(Generic[T, R]):
    """Calls `fn(items) -> results` (same length, same order) in a worker thread, one batch at a time."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, max_size: int, wait_s: float = 0.0,
                 expired: Callable[[T], bool] | None = None) -> None:
        """`wait_s`: extra time a batch waits for company after its first request (0: start at once).
        `expired`: items its caller has stopped waiting for; they fail with TimeoutError instead of running."""
        if max_size < 1:
            raise ValueError(f"max_size ({max_size}) must be at least 1.")
        self._fn = fn
        self._expired = expired
        self.max_size = max_size
        self.wait_s = wait_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None
        self._item_s: float | None = None
        """Recent seconds per item of a batch (moving average; the first batch, which warms up, is not counted)."""
        self._batches = 0
        self._running: tuple[int, float] | None = None
        """Items in the batch that is running, and when it started (monotonic)."""

    def expected_wait_s(self) -> float:
        """How long an item submitted now would likely take to finish: what is left of the running batch, plus
        everything queued before it and itself, at the recent time per item. 0 until a batch has been timed."""
        if self._item_s is None:
            return 0.0
        queued = self._queue.qsize() if self._queue is not None else 0
        left = 0.0
        if self._running is not None:
            items, started = self._running
            left = max(0.0, items * self._item_s - (time.monotonic() - started))
        return left + (queued + 1) * self._item_s

    async def submit(self, item: T) -> R:
        """The result for `item`; raises what `fn` raised for its batch."""
        if self._worker is None or self._worker.done():
            # Created lazily so the queue and the worker live on the loop that serves the requests.
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _run(self) -> None:
        queue = self._queue
        while True:
            batch = [await queue.get()]
            if self.wait_s > 0:
                deadline = time.monotonic() + self.wait_s
                while len(batch) < self.max_size and (remaining := deadline - time.monotonic()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), remaining))
                    except TimeoutError:
                        break
            while len(batch) < self.max_size and not queue.empty():
                batch.append(queue.get_nowait())
            live = []
            for item, future in batch:
                if future.done():  # a cancelled caller
                    continue
                if self._expired is not None and self._expired(item):
                    future.set_exception(TimeoutError("the caller's deadline passed while it queued"))
                    continue
                live.append((item, future))
            if live:
                await self._call(live)

    async def _call(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        started = time.monotonic()
        self._running = (len(batch), started)
        try:
            results = await asyncio.to_thread(self._fn, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batched function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # every caller of the batch gets the error; the worker keeps going
            logger.exception("batched call failed for %d items", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._running = None
        self._time(len(batch), time.monotonic() - started)
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    def _time(self, items: int, seconds: float) -> None:
        self._batches += 1
        if self._batches == 1:
            return
        per_item = seconds / items
        self._item_s = per_item if self._item_s is None else 0.8 * self._item_s + 0.2 * per_item
