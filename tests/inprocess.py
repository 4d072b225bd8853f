"""The ingress replica's parts without Ray, for tests that trace or drive one request in this process: built as
`Ingress.__init__` builds them (the router in this process, `router.placement: ingress`), scripted tiers behind
real wire servers on loopback. Also the texts the learning tests teach the router with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from serving.channel.channel import TierChannel
from serving.channel.replica import WireServer
from serving.config import AppConfig
from serving.engines.scripted import ScriptedEngine
from serving.ingress.app import Ingress
from serving.ingress.router_calls import router_calls
from serving.types import EngineLoad, ReplicaStatus

TOKEN = "0123456789abcdef0123456789abcdef"
PROBE = "Convert this list of product names into a JSON array of lowercase strings: Apple, Banana, Cherry"
TAUGHT = [  # near the probe; the shipped exemplars call such requests routine
    "Convert these product names to a JSON array of lowercase strings: Pear, Plum, Fig",
    "Turn this list of product names into a JSON array, lowercase: Kiwi, Lime, Date",
    "Convert the following product names into a JSON array of lowercase strings: Grape, Melon",
    "Make a JSON array of lowercase strings from these product names: Orange, Lemon, Mango",
    "Convert this list of fruit names into a lowercase JSON array of strings: Peach, Apricot",
    "Convert product names to a JSON array of lowercase strings: Guava, Papaya, Lychee",
]


def build_ingress(config: AppConfig) -> Any:
    """The class Ray Serve wraps, with the parts its `__init__` builds (no CPU pinning, no load polling)."""
    ingress = object.__new__(Ingress.__mro__[1])
    ingress.assemble(config, TierChannel(config.tier_names, config.capacity, token=TOKEN, node_ip="127.0.0.1"),
                     router_calls(config, None))
    return ingress


async def serve_tiers(ingress: Any, engine_cls: type[ScriptedEngine]) -> list[WireServer]:
    """A scripted engine per tier behind a real wire server on loopback, added to the ingress's channel."""
    servers = []
    for tier in ingress.config.tiers:
        engine = engine_cls(tier, Path("unused"), "cpu")
        engine.start()
        server = WireServer(engine, TOKEN, max_ongoing=64)
        address = await server.start("127.0.0.1")
        load = EngineLoad(tier=tier.name, running=0, waiting=0, kv_cache_usage=0.0, max_num_seqs=32,
                          timestamp=time.time())
        ingress.channel.add_replica(tier.name, ReplicaStatus(f"{tier.name}-1", address, load, server.local_path))
        servers.append(server)
    return servers
