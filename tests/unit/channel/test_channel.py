"""`TierChannel`, the one way to call a tier, on real wire servers with the scripted engine (no Ray): the admission
slot comes back on every exit path, load spreads over replicas, and a silent link ends the call with a 503."""

from __future__ import annotations

import asyncio
import time

import pytest

from router.errors import InvalidRequest
from serving.capacity import CapacityConfig
from serving.channel import channel as channel_mod
from serving.channel import wire
from serving.channel.channel import TierChannel
from serving.channel.errors import Overloaded, ServiceUnavailable
from serving.channel.replica import WireServer
from serving.engines.scripted import ScriptedEngine
from serving.types import EngineLoad, ReplicaStatus
from tests.unit.channel.helpers import TOKEN, chat_request, serve


class Slow(ScriptedEngine):
    tokens_per_s = 40.0
    answer_tokens = 200


def _channel(max_inflight: int = 8) -> TierChannel:
    return TierChannel(["small"], CapacityConfig(defaults={"max_inflight": max_inflight}), token=TOKEN,
                       node_ip="127.0.0.1")


def _add(channel: TierChannel, replica_id: str, server: WireServer, address: str) -> None:
    idle = EngineLoad(tier="small", running=0, waiting=0, kv_cache_usage=0.0, max_num_seqs=8, timestamp=time.time())
    channel.add_replica("small", ReplicaStatus(replica_id, address, idle, server.local_path))


async def _idle(engine: ScriptedEngine) -> int:
    for _ in range(200):
        if engine.load().ongoing == 0:
            break
        await asyncio.sleep(0.01)
    return engine.load().ongoing


def test_a_call_streams_batches_then_its_end_and_frees_its_slot() -> None:
    async def main() -> tuple[str, int, str | None, int]:
        _, server, address = await serve()
        channel = _channel()
        _add(channel, "r1", server, address)
        try:
            call = await channel.open("small", chat_request(max_tokens=4))
            assert channel.inflight["small"] == 1
            text = ""
            async with call:
                async for batch in call:
                    text += "".join(c.text for c in batch)
            result, end = await channel.complete("small", chat_request(max_tokens=2))
            return text, channel.inflight["small"], call.end.finish_reason if call.end else None, end.completion_tokens
        finally:
            server.close()

    text, inflight, finish, whole_tokens = asyncio.run(main())
    assert text == "alpha beta gamma delta " and finish == "length" and inflight == 0 and whole_tokens == 2


def test_the_admission_slot_comes_back_on_every_exit_path() -> None:
    """Normal end, the caller closing early (client gone), the engine refusing, and the replica lost."""

    async def main() -> dict[str, tuple[int, int]]:
        engine, server, address = await serve(Slow)
        channel = _channel()
        _add(channel, "r1", server, address)
        seen: dict[str, tuple[int, int]] = {}
        # the caller leaves after the first batch: the engine request is aborted and the slot freed
        call = await channel.open("small", chat_request(max_tokens=None))
        await anext(aiter(call))
        await call.aclose()
        seen["closed early"] = (channel.inflight["small"], await _idle(engine))
        # the engine refuses the request: a 400, the slot freed
        with pytest.raises(InvalidRequest):
            async with await channel.open("small", chat_request(stop=("fail",))) as call:
                async for _ in call:
                    pass
        seen["refused"] = (channel.inflight["small"], await _idle(engine))
        # the replica goes away mid-stream: a retryable 503, the slot freed
        call = await channel.open("small", chat_request(max_tokens=None))
        await anext(aiter(call))
        server.close()
        for writer in list(server._last_write):
            writer.transport.abort()
        with pytest.raises(ServiceUnavailable) as err:
            async for _ in call:
                pass
        seen["replica lost"] = (channel.inflight["small"], 0 if err.value.code == "replica_lost" else -1)
        return seen

    seen = asyncio.run(main())
    assert seen == {"closed early": (0, 0), "refused": (0, 0), "replica lost": (0, 0)}


def test_past_its_limit_a_tier_answers_overloaded_with_retry_after() -> None:
    async def main() -> Overloaded:
        _, server, address = await serve(Slow)
        channel = _channel(max_inflight=1)
        _add(channel, "r1", server, address)
        first = await channel.open("small", chat_request(max_tokens=None))
        try:
            with pytest.raises(Overloaded) as err:
                await channel.open("small", chat_request())
            assert channel.inflight["small"] == 1 and not channel.has_room("small")
            return err.value
        finally:
            await first.aclose()
            server.close()

    err = asyncio.run(main())
    assert err.status_code == 503 and err.code == "overloaded" and int(err.headers["Retry-After"]) >= 1


def test_calls_spread_over_replicas_least_loaded_first() -> None:
    async def main() -> list[int]:
        servers = [await serve(Slow) for _ in range(2)]
        channel = _channel()
        for i, (_, server, address) in enumerate(servers):
            _add(channel, f"r{i}", server, address)
        calls = [await channel.open("small", chat_request(f"c{i}", max_tokens=None)) for i in range(6)]
        try:
            for _ in range(200):  # until every request has reached its engine
                if sum(engine.load().ongoing for engine, _, _ in servers) == 6:
                    break
                await asyncio.sleep(0.01)
            return [engine.load().ongoing for engine, _, _ in servers]
        finally:
            for call in calls:
                await call.aclose()
            for _, server, _ in servers:
                server.close()

    assert sorted(asyncio.run(main())) == [3, 3]


def test_a_replica_gone_before_the_call_is_skipped_for_another() -> None:
    async def main() -> str:
        _, dead, dead_address = await serve()
        _, live, live_address = await serve()
        dead.close()
        await asyncio.sleep(0.05)
        channel = _channel()
        _add(channel, "dead", dead, dead_address)
        _add(channel, "live", live, live_address)
        try:
            for _ in range(3):  # whichever it tries first, each call lands on the live one
                _, end = await channel.complete("small", chat_request(max_tokens=1))
            return ",".join(sorted(s.replica_id for s in channel.replicas("small")))
        finally:
            live.close()

    assert asyncio.run(main()) == "live"


def test_a_silent_link_ends_the_call_with_a_503_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica whose link goes quiet (no tokens, no PINGs: a cut cable, a frozen host) is given up after
    STALE_AFTER_S; the call ends with `replica_lost` and its slot is freed."""
    monkeypatch.setattr(channel_mod, "STALE_AFTER_S", 0.6)

    async def main() -> tuple[str | None, float, int]:
        async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 16)
            await asyncio.sleep(30)  # accepts the request, then says nothing ever again

        server = await asyncio.start_server(frozen, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        channel = _channel()
        idle = EngineLoad(tier="small", running=0, waiting=0, kv_cache_usage=0.0, max_num_seqs=8,
                          timestamp=time.time())
        channel.add_replica("small", ReplicaStatus("frozen", address, idle))
        channel.start(poll_interval_s=60)
        started = time.monotonic()
        try:
            call = await channel.open("small", chat_request())
            with pytest.raises(ServiceUnavailable) as err:
                async for _ in call:
                    pass
            return err.value.code, time.monotonic() - started, channel.inflight["small"]
        finally:
            channel.close()
            server.close()

    code, waited, inflight = asyncio.run(main())
    assert code == "replica_lost" and waited < 5 and inflight == 0


def test_heartbeats_keep_a_slow_first_token_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same watch does not give up a replica that is only slow: its PINGs keep the call open."""
    monkeypatch.setattr(channel_mod, "STALE_AFTER_S", 0.6)
    monkeypatch.setattr(wire, "HEARTBEAT_S", 0.2)

    class SlowStart(ScriptedEngine):
        tokens_per_s = 0.8  # the first token after 1.25 s, twice the stale limit
        answer_tokens = 1

    async def main() -> str:
        _, server, address = await serve(SlowStart)
        channel = _channel()
        _add(channel, "r1", server, address)
        channel.start(poll_interval_s=60)
        try:
            result, _ = await channel.complete("small", chat_request())
            return result.text
        finally:
            channel.close()
            server.close()

    assert asyncio.run(main()) == "alpha "


def test_no_known_replica_is_a_503_with_retry_after() -> None:
    async def main() -> ServiceUnavailable:
        channel = _channel()
        with pytest.raises(ServiceUnavailable) as err:
            await channel.open("small", chat_request())
        assert channel.inflight["small"] == 0
        return err.value

    err = asyncio.run(main())
    assert err.code == "no_replica" and err.headers["Retry-After"] == "2"
