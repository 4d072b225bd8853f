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
                 expired: Callable[[T], bool] | None = None, work: Callable[[T], float] | None = None) -> None:
        """`wait_s`: extra time a batch waits for company after its first request (0: start at once).
        `expired`: items its caller has stopped waiting for; they fail with TimeoutError instead of running.
        `work`: what an item costs relative to others (e.g. its text's length); 1 each when not given."""
        if max_size < 1:
            raise ValueError(f"max_size ({max_size}) must be at least 1.")
        self._fn = fn
        self._expired = expired
        self._work = work or (lambda item: 1.0)
        self.max_size = max_size
        self.wait_s = wait_s
        self._queue: asyncio.Queue[tuple[T, asyncio.Future, float]] | None = None
        self._worker: asyncio.Task | None = None
        self.cost = BatchCost()
        """Recent seconds per batch by its work (the first batch, which warms up, is not counted)."""
        self._warmed = False
        self._waiting = (0, 0.0)
        """Items submitted whose batch has not started (queued, or gathering while `wait_s` runs), and their work."""
        self._running: tuple[float, float] | None = None
        """Work of the batch that is running, and when it started (monotonic)."""

    def expected_wait_s(self, item: T) -> float:
        """How long `item`, submitted now, would likely take to finish: what is left of the running batch, then
        the batches (of up to `max_size`) that everything waiting before it and itself will form, at the recent
        cost per batch and per unit of work. 0 until a batch has been timed."""
        if not self.cost.known:
            return 0.0
        items, work = self._waiting
        left = 0.0
        if self._running is not None:
            running_work, started = self._running
            left = max(0.0, self.cost.seconds(running_work) - (time.monotonic() - started))
        batches = -(-(items + 1) // self.max_size)
        return left + self.cost.seconds(work + self._work(item), batches=batches)

    def item_s(self, item: T) -> float:
        """What `item` adds to the queue's expected wait in a full batch (0 until a batch has been timed)."""
        return self.cost.seconds(self._work(item) * self.max_size) / self.max_size

    def prime(self, timings: Sequence[tuple[Sequence[T], float]]) -> None:
        """Seed the cost fit with (items, seconds) of batches timed before serving (after a warm-up run), so the
        expected wait is known before the first burst, and the first served batch is timed too."""
        for items, seconds in timings:
            self.cost.add(sum(self._work(item) for item in items), seconds)
        self._warmed = self._warmed or bool(timings)

    async def submit(self, item: T) -> R:
        """The result for `item`; raises what `fn` raised for its batch."""
        if self._worker is None or self._worker.done():
            # Created lazily so the queue and the worker live on the loop that serves the requests.
            self._queue = asyncio.Queue()
            self._waiting = (0, 0.0)
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        work = self._work(item)  # once: the waiting total adds and removes the same figure
        items, waiting_work = self._waiting
        self._waiting = (items + 1, waiting_work + work)
        self._queue.put_nowait((item, future, work))
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
            items, work = self._waiting
            self._waiting = (items - len(batch), work - sum(w for _, _, w in batch))
            live = []
            for item, future, w in batch:
                if future.done():  # a cancelled caller
                    continue
                if self._expired is not None and self._expired(item):
                    future.set_exception(TimeoutError("the caller's deadline passed while it queued"))
                    continue
                live.append((item, future, w))
            if live:
                await self._call(live)

    async def _call(self, batch: list[tuple[T, asyncio.Future, float]]) -> None:
        started = time.monotonic()
        work = sum(w for _, _, w in batch)
        self._running = (work, started)
        try:
            results = await asyncio.to_thread(self._fn, [item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batched function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # every caller of the batch gets the error; the worker keeps going
            logger.exception("batched call failed for %d items", len(batch))
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._running = None
        if self._warmed:
            self.cost.add(work, time.monotonic() - started)
        self._warmed = True
        for (_, future, _), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


class BatchCost:
    """Seconds a batch takes, `fixed + per_unit * work`, fitted to recent batches (least squares with exponential
    forgetting); work is what the batcher's `work` gives its items (1 each by default). An embedding batch on a
    CPU costs about its texts' total length; on a GPU most of it is fixed. Until batches of clearly different
    work have been seen (a standard deviation of at least half the mean), the cost is taken as proportional to
    the work: on the safe side, since a burst then looks dearer than it is until its own batches are timed."""

    def __init__(self, decay: float = 0.9) -> None:
        self._decay = decay
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    @property
    def known(self) -> bool:
        return self._w > 0

    def add(self, work: float, seconds: float) -> None:
        d = self._decay
        self._w = d * self._w + 1
        self._n = d * self._n + work
        self._t = d * self._t + seconds
        self._nn = d * self._nn + work * work
        self._nt = d * self._nt + work * seconds

    def seconds(self, work: float, *, batches: int = 1) -> float:
        """Expected seconds for `batches` batches holding `work` in all (0 before any batch was timed)."""
        if not self.known:
            return 0.0
        mean_n, mean_t = self._n / self._w, self._t / self._w
        if mean_n <= 0:
            return 0.0
        variance = self._nn / self._w - mean_n * mean_n
        if variance < 0.25 * mean_n * mean_n:  # standard deviation under half the mean: proportional
            return mean_t / mean_n * work
        per_unit = max(0.0, (self._nt / self._w - mean_n * mean_t) / variance)
        fixed = max(0.0, mean_t - per_unit * mean_n)
        return batches * fixed + per_unit * work
