"""The router as the ingress calls it: in this process, or behind its own deployment's handle; and the ingress's
copy of its static overflow index."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from ray.serve.handle import DeploymentHandle

from router.learn import Feedback, LearnResult, RequestOutcome
from router.overflow import OverflowIndex
from router.types import Exemplar, RouteDecision, RouteInput, StoredExemplar
from router.versions import StoreVersion
from serving.config import AppConfig
from serving.metrics import Metrics

logger = logging.getLogger(__name__)


class RouterCalls(Protocol):
    """What the ingress needs from the router (`router.deployment.RouterDeployment` has exactly these)."""

    async def route(self, request: RouteInput) -> RouteDecision: ...

    async def overflow_index(self, have: str | None = None, embedder: str | None = None
                             ) -> tuple[str | None, OverflowIndex | None]: ...

    async def add_exemplars(self, exemplars: Sequence[Exemplar]) -> int: ...

    async def count(self) -> int: ...

    async def release_store(self, seconds: float) -> None: ...

    async def observe(self, outcome: RequestOutcome) -> LearnResult: ...

    async def feedback(self, feedback: Feedback) -> LearnResult: ...

    async def versions(self) -> list[StoreVersion]: ...

    async def active_version(self) -> int: ...

    async def rollback(self, version: int) -> StoreVersion: ...

    async def exemplars(self, *, source: str | None = None, limit: int = 100) -> list[StoredExemplar]: ...


class HandleRouter:
    """`RouterCalls` over the router deployment's Ray Serve handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def route(self, request: RouteInput) -> RouteDecision:
        return await self._handle.route.remote(request)

    async def overflow_index(self, have: str | None = None, embedder: str | None = None
                             ) -> tuple[str | None, OverflowIndex | None]:
        return await self._handle.overflow_index.remote(have, embedder)

    async def add_exemplars(self, exemplars: Sequence[Exemplar]) -> int:
        return await self._handle.add_exemplars.remote(list(exemplars))

    async def count(self) -> int:
        return await self._handle.count.remote()

    async def release_store(self, seconds: float) -> None:
        await self._handle.release_store.remote(seconds)

    async def observe(self, outcome: RequestOutcome) -> LearnResult:
        return await self._handle.observe.remote(outcome)

    async def feedback(self, feedback: Feedback) -> LearnResult:
        return await self._handle.feedback.remote(feedback)

    async def versions(self) -> list[StoreVersion]:
        return await self._handle.versions.remote()

    async def active_version(self) -> int:
        return await self._handle.active_version.remote()

    async def rollback(self, version: int) -> StoreVersion:
        return await self._handle.rollback.remote(version)

    async def exemplars(self, *, source: str | None = None, limit: int = 100) -> list[StoredExemplar]:
        return await self._handle.exemplars.remote(source=source, limit=limit)


def router_calls(config: AppConfig, handle: DeploymentHandle | None) -> RouterCalls | None:
    """The router per `router.placement`: its deployment's handle, or a router built in this process."""
    if config.router.default_router == "cheapest":
        return None
    if config.router.placement == "ingress":
        from router.deployment import RouterDeployment

        return RouterDeployment(config.router, config.tier_names, str(config.resolved_data_dir()),
                                retention_s=config.query_log.retention_s)
    return HandleRouter(handle) if handle is not None else None


OVERFLOW_POLL_S = 2.0
"""How often the ingress asks the router whether its static overflow's index changed (sent only then)."""


class OverflowCopy:
    """The ingress's copy of the router's static overflow index (`router.overflow`), with which it decides the
    static first pass (`router.static_first`) and the requests it answers busy itself (`RouterQueue`) by kNN
    instead of the heuristic. The first pass decides only with an index of the exemplars the router serves now:
    after a change (`changed`, or the router's key ending in `router.overflow.PREVIOUS`) the router decides
    until the new index arrives."""

    def __init__(self, router: RouterCalls, metrics: Metrics) -> None:
        self.index: OverflowIndex | None = None
        self._router = router
        self._metrics = metrics
        self._task: asyncio.Task | None = None
        self._changes = 0

    def changed(self) -> None:
        """The exemplars changed through this ingress (an import, a rollback): the copy is of the previous ones
        until the router's next index."""
        self._changes += 1
        if self.index is not None:
            self.index = replace(self.index, previous=True)

    def follow(self) -> None:
        """Keep the copy current from now on (idempotent; on the running loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                held, changes = self.index, self._changes  # an empty index is falsy (len 0): compare with None
                have = (None, None) if held is None else (held.key, held.embedder.name)
                key, index = await asyncio.wait_for(self._router.overflow_index(*have), OVERFLOW_POLL_S * 5)
                if index is not None and index.embedder is None:  # the exemplars changed, the embedder did not
                    index = replace(index, embedder=held.embedder)
                index = held if index is None else index
                if key is not None:  # previous: the router's is, or a change here came after the router answered
                    index = replace(index, previous=key != index.key or changes != self._changes)
                self.index = None if key is None else index
                self._metrics.router_overflow_exemplars.set(0 if self.index is None else len(self.index))
            except Exception as exc:  # noqa: BLE001 - the router is down or slow: the copy held serves meanwhile
                logger.warning("could not fetch the router's overflow index (%s: %s)", type(exc).__name__, exc)
            await asyncio.sleep(OVERFLOW_POLL_S)
