"""The data plane between ingress and tier replicas, over a real loopback socket, with the scripted engine.

No Ray here: `WireServer` serves an `Engine`, `open_stream` is what the ingress's TierClient calls.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionChunk

from router.errors import ClientError, InvalidRequest
from serving.channel.errors import ServiceUnavailable, error_from_frame
from serving.channel.wire import (
    CHUNK,
    END,
    RESULT,
    SSE,
    SseOptions,
    WireRequest,
    WireServer,
    chunk_from,
    decode_request,
    encode_request,
    error_frame,
    open_stream,
    result_from,
)
from serving.config import EngineConfig, TierConfig
from serving.engines.scripted import ScriptedEngine
from serving.types import (
    ChatMessage,
    EngineLoad,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)

TIER = TierConfig(name="small", model="unused", engine=EngineConfig(max_model_len=256, max_num_seqs=8))
META = {"tier": "small", "router": "explicit"}


class FastEngine(ScriptedEngine):
    tokens_per_s = 2000.0
    answer_tokens = 5


def chat_request(request_id: str = "chatcmpl-1", **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        sampling=SamplingOptions(**{"max_tokens": 5, "temperature": 0.0, **sampling}),
        messages=(ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi there")),
    )


def test_request_round_trips_through_json() -> None:
    request = chat_request(stop=("a", "b"), logprobs=True, top_logprobs=3, seed=7)
    wire = WireRequest(request, "sse", SseOptions(kind="chat", model="m", logprobs=True, include_usage=True,
                                                   meta=META))
    frame = encode_request("tok", wire)
    token, back = decode_request(frame[5:])
    assert token == "tok" and back == wire


def test_errors_keep_their_class_status_param_and_headers() -> None:
    for exc in (InvalidRequest("stop: bad", param="stop"),
                ServiceUnavailable.make("full", retry_after_s=3, status_code=503)):
        frame = error_frame(exc)
        back = error_from_frame(json.loads(frame[5:]))
        assert type(back) is type(exc)
        assert back.status_code == exc.status_code and back.error_type == exc.error_type
        assert (back.message, back.param, back.headers) == (exc.message, exc.param, exc.headers)
    assert error_from_frame({"message": "x"}).status_code == 500


async def _serve(engine_cls: type[ScriptedEngine] = FastEngine) -> tuple[ScriptedEngine, WireServer, str]:
    engine = engine_cls(TIER, Path("unused"), "cpu")
    engine.start()
    server = WireServer(engine, "secret")
    return engine, server, await server.start("127.0.0.1")


async def _frames(address: str, wire: WireRequest, token: str = "secret") -> list[tuple[bytes, bytes]]:
    stream = await open_stream(address, token, wire, tier="small")
    got: list[tuple[bytes, bytes]] = []
    try:
        async for batch in stream.batches():
            got += batch
            if got[-1][0] in (END, RESULT) or (got[-1][0] == CHUNK and json.loads(got[-1][1])["finish_reason"]):
                return got
    finally:
        stream.close()
    return got


def test_sse_mode_sends_openai_chunks_with_the_decision_on_first_and_last() -> None:
    async def main() -> list[tuple[bytes, bytes]]:
        _, server, address = await _serve()
        opts = SseOptions(kind="chat", model="small", logprobs=False, include_usage=True, meta=META)
        try:
            return await _frames(address, WireRequest(chat_request(), "sse", opts))
        finally:
            server.close()

    frames = asyncio.run(main())
    assert frames[-1][0] == END
    summary = json.loads(frames[-1][1])
    assert (summary["completion_tokens"], summary["finish_reason"]) == (5, "length") and summary["prompt_tokens"] > 0
    assert summary["load"]["ongoing"] == 0 and summary["load"]["tier"] == "small"  # the load as the request left
    body = b"".join(p for k, p in frames if k == SSE).decode()
    events = [e.removeprefix("data: ") for e in body.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    text_chunks = [c for c in chunks if c.choices]
    assert [c.choices[0].delta.content for c in text_chunks] == ["alpha ", "beta ", "gamma ", "delta ", "epsilon "]
    assert text_chunks[0].choices[0].delta.role == "assistant"
    assert text_chunks[-1].choices[0].finish_reason == "length"
    with_meta = [i for i, c in enumerate(chunks) if c.model_extra.get("tierserve")]
    assert with_meta == [0, len(text_chunks) - 1, len(chunks) - 1]  # first, last text chunk, usage chunk
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


def test_result_and_chunk_modes_return_typed_values_with_logprobs() -> None:
    async def main() -> tuple[list, list]:
        _, server, address = await _serve()
        request = chat_request(logprobs=True, top_logprobs=2)
        try:
            result = await _frames(address, WireRequest(request, "result"))
            chunks = await _frames(address, WireRequest(request, "chunks"))
            return result, chunks
        finally:
            server.close()

    result_frames, chunk_frames = asyncio.run(main())
    result = result_from(json.loads(result_frames[0][1]))
    assert result.text == "alpha beta gamma delta epsilon " and result.completion_tokens == 5
    assert result.token_logprobs[0] == TokenLogprob("alpha ", -0.05, (("alpha ", -0.05), ("beta ", -1.05)))
    chunks = [chunk_from(json.loads(p)) for k, p in chunk_frames if k == CHUNK]
    assert "".join(c.text for c in chunks) == result.text
    assert tuple(lp for c in chunks for lp in c.token_logprobs) == result.token_logprobs


def test_every_mode_ends_with_the_replicas_load_as_the_request_left_it() -> None:
    async def main() -> list[list[tuple[bytes, bytes]]]:
        _, server, address = await _serve()
        try:
            return [await _until_end(address, WireRequest(chat_request(), mode)) for mode in ("result", "chunks")]
        finally:
            server.close()

    for frames in asyncio.run(main()):
        assert frames[-1][0] == END
        load = EngineLoad(**json.loads(frames[-1][1])["load"])
        assert load.ongoing == 0 and load.max_num_seqs == TIER.engine.max_num_seqs


def test_an_ingress_on_the_same_node_uses_the_unix_socket_and_falls_back_to_tcp() -> None:
    async def main() -> tuple[int, int]:
        _, server, address = await _serve()
        assert server.local_path is not None and server.local_path.startswith("\0")
        families = []
        try:
            for path in (server.local_path, "\0no-such-replica"):
                stream = await open_stream(address, "secret", WireRequest(chat_request(), "result"), tier="small",
                                           local_path=path)
                families.append(stream._writer.transport.get_extra_info("socket").family)
                async for batch in stream.batches():
                    if batch[-1][0] == END:
                        break
                stream.close()
        finally:
            server.close()
        return families[0], families[1]

    assert asyncio.run(main()) == (socket.AF_UNIX, socket.AF_INET)


async def _until_end(address: str, wire: WireRequest) -> list[tuple[bytes, bytes]]:
    stream = await open_stream(address, "secret", wire, tier="small")
    got: list[tuple[bytes, bytes]] = []
    try:
        async for batch in stream.batches():
            got += batch
            if got[-1][0] == END:
                return got
    finally:
        stream.close()
    return got


def test_engine_refusals_come_back_as_their_client_error() -> None:
    async def main() -> None:
        _, server, address = await _serve()
        try:
            with pytest.raises(InvalidRequest) as err:
                await _frames(address, WireRequest(chat_request(stop=("fail",)), "result"))
            assert err.value.param == "stop" and err.value.status_code == 400
            with pytest.raises(ClientError, match="bad deployment token"):
                await _frames(address, WireRequest(chat_request(), "result"), token="wrong")
        finally:
            server.close()

    asyncio.run(main())


def test_closing_the_connection_mid_stream_aborts_the_engine_request() -> None:
    class Slow(ScriptedEngine):
        tokens_per_s = 50.0
        answer_tokens = 200

    async def main() -> None:
        engine, server, address = await _serve(Slow)
        try:
            stream = await open_stream(address, "secret", WireRequest(chat_request(max_tokens=None), "chunks"),
                                       tier="small")
            async for _ in stream.batches():
                break
            assert engine.load().ongoing == 1
            stream.close()
            for _ in range(100):
                if engine.load().ongoing == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.load().ongoing == 0
        finally:
            server.close()

    asyncio.run(main())


def test_a_replica_that_is_gone_is_a_503_with_retry_after() -> None:
    async def main() -> None:
        _, server, address = await _serve()
        server.close()
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceUnavailable) as err:
            await open_stream(address, "secret", WireRequest(chat_request(), "result"), tier="small")
        assert err.value.status_code == 503 and err.value.headers["Retry-After"] == "2"

    asyncio.run(main())


def test_the_ingress_load_view_follows_the_end_frames_without_a_poll() -> None:
    """After a request the ingress sees the replica as it is now (idle), not as its last poll saw it (busy)."""
    from serving.channel.tiers import TierClient
    from serving.types import ReplicaStatus

    async def main() -> EngineLoad:
        engine, server, address = await _serve()
        client = TierClient({"small": None}, wire_token="secret", node_ip="127.0.0.1")
        busy = EngineLoad(tier="small", running=8, waiting=5, kv_cache_usage=0.9, max_num_seqs=8, ongoing=13,
                          timestamp=1.0)
        client._replicas["small"]["r1"] = (ReplicaStatus("r1", address, busy, server.local_path), time.monotonic())
        try:
            await client.generate("small", chat_request())
            return client.loads(max_age_s=60)["small"]
        finally:
            server.close()

    load = asyncio.run(main())
    assert (load.running, load.waiting, load.ongoing) == (0, 0, 0) and load.timestamp > 1.0


def test_a_load_poll_answers_over_the_data_plane_and_a_gone_replica_is_forgotten() -> None:
    from serving.channel.tiers import TierClient
    from serving.channel.wire import poll_load
    from serving.types import ReplicaStatus

    async def main() -> None:
        engine, server, address = await _serve()
        load = await poll_load(address, "secret", local_path=server.local_path)
        assert load == EngineLoad(**{**asdict(engine.load()), "timestamp": load.timestamp})
        with pytest.raises(ClientError, match="bad deployment token"):
            await poll_load(address, "wrong")
        client = TierClient({"small": None}, wire_token="secret", node_ip="127.0.0.1")
        stale = EngineLoad(tier="small", running=3, waiting=0, kv_cache_usage=0.5, max_num_seqs=8, timestamp=1.0)
        client._replicas["small"]["r1"] = (ReplicaStatus("r1", address, stale, server.local_path), time.monotonic())
        await client._refresh("small", discover=False)
        assert client.loads(max_age_s=60)["small"].running == 0
        server.close()
        await asyncio.sleep(0.05)
        await client._refresh("small", discover=False)
        assert client.loads(max_age_s=60) == {} and client._pick("small") is None

    asyncio.run(main())
