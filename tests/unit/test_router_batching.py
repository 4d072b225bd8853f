"""AdaptiveBatcher: batches grow with the backlog, lone requests do not wait, errors reach every caller."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from router.batching import AdaptiveBatcher, BatchCost


class Recorder:
    """A batched function that doubles its inputs, records batch sizes, and can block the first batch."""

    def __init__(self, first_call_s: float = 0.0, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.first_call_s = first_call_s
        self.fail_on = fail_on
        self.threads: set[int] = set()

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.sizes.append(len(items))
        if len(self.sizes) == 1 and self.first_call_s:
            time.sleep(self.first_call_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


def test_requests_arriving_during_a_batch_form_the_next_batch():
    fn = Recorder(first_call_s=0.2)
    batcher = AdaptiveBatcher(fn, max_size=64)

    async def main():
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch is running now
        rest = await asyncio.gather(*(batcher.submit(i) for i in range(1, 11)))
        return [await first, *rest]

    assert asyncio.run(main()) == [2 * i for i in range(11)]
    assert fn.sizes == [1, 10]
    assert threading.get_ident() not in fn.threads  # ran off the event loop


def test_max_size_caps_batches_and_order_is_kept():
    fn = Recorder()
    batcher = AdaptiveBatcher(fn, max_size=8)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(30)))

    assert asyncio.run(main()) == [2 * i for i in range(30)]
    assert max(fn.sizes) == 8 and sum(fn.sizes) == 30


def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs():
    fn = Recorder(fail_on=3)
    batcher = AdaptiveBatcher(fn, max_size=64)

    async def main():
        failed = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
        later = await batcher.submit(7)
        return failed, later

    failed, later = asyncio.run(main())
    assert all(isinstance(r, ValueError) and "bad item 3" in str(r) for r in failed)
    assert later == 14


def test_wait_gathers_staggered_arrivals():
    fn = Recorder()
    batcher = AdaptiveBatcher(fn, max_size=64, wait_s=0.3)

    async def main():
        async def late(i: int) -> int:
            await asyncio.sleep(0.02 * i)
            return await batcher.submit(i)

        return await asyncio.gather(*(late(i) for i in range(5)))

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]
    assert fn.sizes == [5]


def test_max_size_must_be_positive():
    with pytest.raises(ValueError, match=r"max_size \(0\)"):
        AdaptiveBatcher(lambda items: items, max_size=0)


def test_items_whose_caller_gave_up_while_queued_are_not_run():
    """An overloaded router must not embed the backlog its callers already routed without it."""
    fn = Recorder(first_call_s=0.2)
    deadlines: dict[int, float] = {}
    batcher = AdaptiveBatcher(fn, max_size=64, expired=lambda i: time.time() > deadlines[i])

    async def main():
        deadlines[0] = time.time() + 10
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.05)  # the first batch runs for 0.2 s; the next ones queue behind it
        for i in range(1, 5):
            deadlines[i] = time.time() + (0.05 if i % 2 else 10)  # odd ones expire while they queue
        results = await asyncio.gather(*(batcher.submit(i) for i in range(1, 5)), return_exceptions=True)
        return await first, results

    first, results = asyncio.run(main())
    assert first == 0 and results[1] == 4 and results[3] == 8
    assert isinstance(results[0], TimeoutError) and isinstance(results[2], TimeoutError)
    assert fn.sizes == [1, 2]  # the expired ones never reached the batched function


class Timed:
    """A batched function that takes `item_s` per item."""

    def __init__(self, item_s: float) -> None:
        self.item_s = item_s

    def __call__(self, items: list[int]) -> list[int]:
        time.sleep(self.item_s * len(items))
        return items


def test_expected_wait_counts_the_running_batch_and_the_batches_queued_items_will_form():
    batcher = AdaptiveBatcher(Timed(0.02), max_size=4)

    async def main():
        assert batcher.expected_wait_s(0) == 0.0  # nothing timed yet
        await batcher.submit(0)  # the first batch warms up and is not timed
        assert batcher.expected_wait_s(0) == 0.0
        await batcher.submit(1)
        idle = batcher.expected_wait_s(0)  # one item's time: itself
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(10)]
        await asyncio.sleep(0.005)  # a batch of 4 runs (~80 ms); 6 queue behind it
        busy = batcher.expected_wait_s(0)
        await asyncio.gather(*tasks)
        return idle, busy

    idle, busy = asyncio.run(main())
    assert 0.015 < idle < 0.06
    # ~75 ms left of the running batch, then the 6 queued and the new one at ~20 ms each: ~0.215 s
    # (without the running batch it would be 0.14 s)
    assert 0.18 < busy < 0.3


def test_batch_cost_separates_fixed_and_per_item_time():
    cpu, gpu = BatchCost(), BatchCost()
    cpu.add(1, 0.010)
    assert cpu.seconds(8) == pytest.approx(0.080)  # one size seen: proportional (on the safe side)
    for n in (1, 4, 16, 64, 2, 32):
        cpu.add(n, 0.010 * n)  # an embedding on a CPU: linear in the batch
        gpu.add(n, 0.020 + 0.0001 * n)  # on a GPU: mostly the fixed cost of a pass
    assert cpu.seconds(64) == pytest.approx(0.64, rel=0.05)
    assert gpu.seconds(64) == pytest.approx(0.0264, rel=0.05)
    assert gpu.seconds(1) == pytest.approx(0.0201, rel=0.05)
    assert BatchCost().seconds(10) == 0.0 and not BatchCost().known


def test_items_gathering_for_the_next_batch_count_as_queued():
    batcher = AdaptiveBatcher(Timed(0.02), max_size=64, wait_s=0.2)

    async def main():
        await batcher.submit(0)  # warms up (waits out wait_s alone)
        await batcher.submit(1)  # timed
        alone = batcher.expected_wait_s(0)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
        await asyncio.sleep(0.05)  # the 5 are off the queue, gathering for the next batch
        gathering = batcher.expected_wait_s(0)
        await asyncio.gather(*tasks)
        return alone, gathering

    alone, gathering = asyncio.run(main())
    assert gathering == pytest.approx(6 * alone, rel=0.01)  # the 5 gathered and the new one, proportional


def test_a_primed_batcher_estimates_its_first_burst_and_times_its_first_batch():
    batcher = AdaptiveBatcher(Timed(0.02), max_size=64)
    batcher.prime([([0], 0.01), (list(range(8)), 0.08)])  # primed at half the real cost per item

    async def main():
        burst = [asyncio.create_task(batcher.submit(i)) for i in range(10)]
        await asyncio.sleep(0)  # queued, not started
        queued = batcher.expected_wait_s(0)
        await asyncio.gather(*burst)
        return queued

    queued = asyncio.run(main())
    assert queued == pytest.approx(11 * 0.01, rel=0.01)  # the 10 queued and the new one, from the primed fit
    # The burst's own batch (10 items, 0.2 s) was timed in, though it was the first one served.
    assert batcher.cost.seconds(10) > 0.11


def test_the_wait_estimate_counts_work_not_items():
    """Items that cost more (longer texts) weigh more: a queue of long ones is a longer wait than as many short
    ones, and the fit learns the cost per unit of work from batches of different work."""

    class ByLength:
        def __call__(self, items: list[str]) -> list[str]:
            time.sleep(0.0005 * sum(len(t) for t in items))
            return items

    batcher = AdaptiveBatcher(ByLength(), max_size=64, work=len)
    batcher.prime([(["x" * 10], 0.005), (["x" * 40] * 4, 0.08)])

    async def main():
        long_queue = [asyncio.create_task(batcher.submit("y" * 100)) for _ in range(4)]
        await asyncio.sleep(0)
        behind_long = batcher.expected_wait_s("z" * 10)
        await asyncio.gather(*long_queue)
        short_queue = [asyncio.create_task(batcher.submit("y" * 10)) for _ in range(4)]
        await asyncio.sleep(0)
        behind_short = batcher.expected_wait_s("z" * 10)
        await asyncio.gather(*short_queue)
        return behind_long, behind_short

    behind_long, behind_short = asyncio.run(main())
    assert behind_long == pytest.approx(0.0005 * 410, rel=0.3)  # ~0.2 s: 400 units queued and its own 10
    assert behind_short == pytest.approx(0.0005 * 50, rel=0.5)
    assert behind_long > 4 * behind_short


def test_the_fit_stays_proportional_until_the_work_differs_clearly():
    cost = BatchCost()
    cost.add(100, 0.010)
    cost.add(110, 0.012)  # about the same work: noise, not a fixed part
    assert cost.seconds(1000) == pytest.approx(1000 * 0.022 / 210, rel=0.01)
