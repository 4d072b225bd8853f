"""The Ray Serve deployment hosting one tier's engine.

Ray Serve owns the replica's life (placement, health checks, restarts, scaling); the tokens leave
through the replica's own data-plane port (`serving.channel.wire`), whose address the ingress learns from
`status()`.
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
from serving.cpu.affinity import pin_engine_processes
from serving.cpu.scheduler_side import SchedulerSide
from serving.engines.base import Engine
from serving.engines.vllm import VllmEngine
from serving.types import ReplicaStatus, TierInfo

logger = logging.getLogger(__name__)


class TierServer:
    """One replica of one tier: an engine (`engine_cls`, vLLM by default) behind a wire server."""

    async def __init__(
        self, tier: TierConfig, model_path: str, device: str, wire_token: str, *, engine_cls: type[Engine] = VllmEngine,
        other_engine_cpus: Sequence[int] = (),
    ) -> None:
        self.reaper = EngineReaper()  # the engine's processes die with this replica, however it dies
        self.engine = engine_cls(tier, Path(model_path), device)
        self.engine.start()
        self.reaper.watch()
        started = time.perf_counter()
        await self.engine.warmup()  # a replacement replica must not answer its first requests seconds late
        logger.info("tier %s: engine warmed up in %.1f s", tier.name, time.perf_counter() - started)
        self.scheduler_side: SchedulerSide | None = None
        if device == "cpu" and tier.engine.cpu_threads_bind:  # after start: the worker has bound its cores
            what = f"tier {tier.name} replica"
            placement = pin_engine_processes(tier.engine.cpu_threads_bind, what, other_engines=set(other_engine_cpus))
            if placement is not None:  # every core is some engine's: the load decides where the scheduler runs
                self.scheduler_side = SchedulerSide(placement, what).start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.wire = WireServer(self.engine, wire_token)
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

    def __del__(self) -> None:
        side = getattr(self, "scheduler_side", None)
        if side is not None:
            side.close()
        wire = getattr(self, "wire", None)
        if wire is not None:
            wire.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        reaper = getattr(self, "reaper", None)
        if reaper is not None:
            reaper.close()
