"""The ingress's copy of the router's static index (`OverflowCopy`): when the first pass may use it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from router.config import KnnConfig
from router.knn import VectorMatrix
from router.overflow import PREVIOUS, OverflowIndex
from serving.ingress import router_calls
from serving.ingress.router_calls import OverflowCopy
from serving.metrics import Metrics

KEY = "store/collection|3|0|token"


class GatedRouter:
    """The router deployment's `overflow_index` as the ingress calls it; every call after the first waits for
    `gate`, and `key` is what the router reports (its index's key, or that with `PREVIOUS`)."""

    def __init__(self, index: OverflowIndex) -> None:
        self.index, self.key = index, index.key
        self.gate = asyncio.Event()
        self.started = self.answered = 0

    async def overflow_index(self, have=None, embedder=None):  # noqa: ANN001, ANN201
        self.started += 1
        if self.started > 1:
            await self.gate.wait()
        self.answered += 1
        return self.key, None if have == self.index.key else self.index


async def _until(condition, timeout_s: float = 2.0) -> None:  # noqa: ANN001
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


def test_a_change_while_a_poll_waits_for_the_router_keeps_the_copy_previous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_calls, "OVERFLOW_POLL_S", 0.05)
    index = OverflowIndex(KEY, SimpleNamespace(name="static"), VectorMatrix(4), {}, KnnConfig(), margin=0.1)

    async def scenario() -> None:
        router = GatedRouter(index)
        copy = OverflowCopy(router, Metrics())
        copy.follow()
        await _until(lambda: copy.index is not None)
        assert not copy.index.previous  # the router's current index
        await _until(lambda: router.started == 2)  # the next poll waits for the router's answer
        copy.changed()  # an import through this ingress meanwhile
        assert copy.index.previous
        router.gate.set()  # the router answers what it knew before the change: its index is current
        await _until(lambda: router.answered == 2)
        await asyncio.sleep(0)
        assert copy.index.previous  # the change came after the router answered: still the previous exemplars
        router.key = KEY + PREVIOUS  # the router has seen the change and builds the new index
        await _until(lambda: router.answered == 4)
        assert copy.index.previous and copy.index.key == KEY
        router.key = KEY  # (a new key in practice) the index of the exemplars served now
        await _until(lambda: router.answered == 6)
        assert not copy.index.previous
        copy._task.cancel()

    asyncio.run(scenario())
