"""The Ray Serve deployment hosting one tier's engine: the replica end of the tier channel.

Ray Serve owns the replica's life (placement, health checks, restarts, scaling); the tokens leave through
the replica's own data port (`serving.channel.wire`), whose address the ingress learns from `status()`.
Because requests bypass Ray handles, the replica reports its ongoing and queued requests to Serve's
autoscaler itself (`record_autoscaling_stats`, read by `serving.channel.autoscale.tier_policy`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import ray
from ray import serve

from serving.channel.reaper import EngineReaper
from serving.channel.wire import WireServer
from serving.config import TierConfig
from serving.engines.base import Engine
from serving.types import ReplicaStatus, TierInfo

logger = logging.getLogger(__name__)


class TierServer:
    """One replica of one tier: an engine (`engine_cls`) behind a wire server."""

    async def __init__(
        self, tier: TierConfig, model_path: str, device: str, wire_token: str, *, engine_cls: type[Engine],
        other_engine_cpus: Sequence[int] = (),
    ) -> None:
        self.reaper = EngineReaper()  # the engine's processes die with this replica, however it dies
        self.engine = engine_cls(tier, Path(model_path), device)
        self.engine.start()
        self.reaper.watch()
        started = time.perf_counter()
        await self.engine.warmup()  # a replacement replica must not answer its first requests seconds late
        logger.info("tier %s: engine warmed up in %.1f s", tier.name, time.perf_counter() - started)
        self.cpu_placement = None
        if device == "cpu" and tier.engine.cpu_threads_bind:  # after start: the worker has bound its cores
            from serving.cpu import (
                place_engine,  # CPU-only process placement; the GPU path never imports it
            )

            self.cpu_placement = place_engine(tier, other_engine_cpus)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.wire = WireServer(self.engine, wire_token, max_ongoing=tier.deployment.max_ongoing_requests)
        self.address = await self.wire.start(ray.util.get_node_ip_address())
        logger.info("tier %s: replica %s serves its data plane on %s", tier.name, self.replica_id, self.address)

    async def status(self) -> ReplicaStatus:
        """Where to reach this replica's data plane, and its live load (polled by the ingress)."""
        return ReplicaStatus(replica_id=self.replica_id, address=self.address, load=self.engine.load(),
                             local_path=self.wire.local_path)

    async def info(self) -> TierInfo:
        return self.engine.info()

    async def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine died."""
        await self.engine.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What Serve's autoscaler sees of this replica (requests come over the data port, not Ray handles):
        requests inside it, and how many of those wait in the engine's queue."""
        load = self.engine.load()
        return {"ongoing": float(self.wire.ongoing), "waiting": float(load.waiting)}

    def __del__(self) -> None:
        for part in ("cpu_placement", "wire"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        reaper = getattr(self, "reaper", None)
        if reaper is not None:
            reaper.close()
