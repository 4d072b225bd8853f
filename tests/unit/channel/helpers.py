"""Shared by the channel tests: a tier config, the scripted engine behind a real wire server, a request."""

from __future__ import annotations

from pathlib import Path

from serving.channel.replica import WireServer
from serving.config import EngineConfig, TierConfig
from serving.engines.scripted import ScriptedEngine
from serving.types import ChatMessage, GenerationRequest, SamplingOptions

TOKEN = "0123456789abcdef0123456789abcdef"
TIER = TierConfig(name="small", model="unused", engine=EngineConfig(max_model_len=256, max_num_seqs=8))


class FastEngine(ScriptedEngine):
    tokens_per_s = 2000.0
    answer_tokens = 5


def chat_request(request_id: str = "chatcmpl-1", **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        sampling=SamplingOptions(**{"max_tokens": 5, "temperature": 0.0, **sampling}),
        messages=(ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi there")),
    )


async def serve(engine_cls: type[ScriptedEngine] = FastEngine, tier: TierConfig = TIER, *, max_ongoing: int = 64
                ) -> tuple[ScriptedEngine, WireServer, str]:
    """A started engine behind a wire server on loopback; (engine, server, "host:port")."""
    engine = engine_cls(tier, Path("unused"), "cpu")
    engine.start()
    server = WireServer(engine, TOKEN, max_ongoing=max_ongoing)
    return engine, server, await server.start("127.0.0.1")
