"""The router as the ingress calls it: in this process, or behind its own deployment's handle."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ray.serve.handle import DeploymentHandle

from router.learn import Feedback, LearnResult, RequestOutcome
from router.overflow import OverflowIndex
from router.types import Exemplar, RouteDecision, RouteInput, StoredExemplar
from router.versions import StoreVersion
from serving.config import AppConfig


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
