"""The tier channel's wire, both ends, over real sockets with the scripted engine (no Ray): framing, the hello
checked before any body, heartbeats, errors, aborts, and a fuzz of the replica's data port."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time

import pytest

from router.errors import ClientError, InvalidRequest
from serving.channel import wire
from serving.channel.errors import ServiceUnavailable, error_from_frame
from serving.channel.wire import (
    CHUNK,
    END,
    ERROR,
    End,
    WireRequest,
    decode_chunk,
    decode_request,
    encode_chunk,
    encode_request,
    error_frame,
    frame,
    hello,
    open_stream,
    poll_load,
)
from serving.engines.scripted import ScriptedEngine
from serving.types import (
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)
from tests.unit.channel.helpers import TOKEN, FastEngine, chat_request, serve


async def _collect(address: str, request: WireRequest, token: str = TOKEN, local_path: str | None = None
                   ) -> list[GenerationChunk | End]:
    stream = await open_stream(address, token, request, tier="small", local_path=local_path)
    got: list[GenerationChunk | End] = []
    try:
        async for batch in stream.batches():
            got += batch
            if isinstance(got[-1], End):
                return got
    finally:
        stream.close()
    return got


def test_requests_and_chunks_round_trip() -> None:
    request = WireRequest(chat_request(stop=("a", "b"), logprobs=True, top_logprobs=3, seed=7), whole=True)
    assert decode_request(encode_request(TOKEN, request)[wire.HELLO.size:]) == request
    completion = WireRequest(GenerationRequest(request_id="cmpl-1", sampling=SamplingOptions(), prompt="hi"))
    assert decode_request(encode_request(TOKEN, completion)[wire.HELLO.size:]) == completion
    for chunk in (GenerationChunk(text="héllo \U0001f600", num_new_tokens=2, prompt_tokens=7, completion_tokens=9),
                  GenerationChunk(text="", finish_reason="length", prompt_tokens=1, completion_tokens=1,
                                  token_logprobs=(TokenLogprob("x", -0.5, (("x", -0.5), ("y", -1.25))),))):
        data = encode_chunk(chunk)
        assert data[:1] == CHUNK and decode_chunk(data[wire._FRAME.size:]) == chunk


def test_errors_keep_their_status_param_and_headers() -> None:
    for exc in (InvalidRequest("stop: bad", param="stop"),
                ServiceUnavailable.make("full", retry_after_s=3, status_code=503)):
        back = error_from_frame(json.loads(error_frame(exc)[5:]))
        assert type(back) is type(exc) and (back.status_code, back.error_type) == (exc.status_code, exc.error_type)
        assert (back.message, back.param, back.headers) == (exc.message, exc.param, exc.headers)
    assert error_from_frame({"message": "x"}).status_code == 500


def test_a_stream_sends_deltas_then_the_end_with_the_replicas_load() -> None:
    async def main() -> list[GenerationChunk | End]:
        engine, server, address = await serve()
        try:
            return await _collect(address, WireRequest(chat_request(max_tokens=4, logprobs=True, top_logprobs=2)))
        finally:
            server.close()

    got = asyncio.run(main())
    chunks, end = got[:-1], got[-1]
    assert "".join(c.text for c in chunks) == "alpha beta gamma delta " and len(chunks) == 4
    assert all(len(c.token_logprobs) == 1 and len(c.token_logprobs[0].top) == 2 for c in chunks)
    assert isinstance(end, End) and (end.finish_reason, end.completion_tokens) == ("length", 4)
    assert end.load is not None and end.load.ongoing == 0  # as the request left the replica


def test_a_whole_answer_is_one_chunk() -> None:
    async def main() -> list[GenerationChunk | End]:
        _, server, address = await serve()
        try:
            return await _collect(address, WireRequest(chat_request(max_tokens=3), whole=True))
        finally:
            server.close()

    got = asyncio.run(main())
    assert len(got) == 2 and got[0].text == "alpha beta gamma " and got[0].completion_tokens == 3


def test_the_token_is_checked_before_any_body_is_read() -> None:
    async def main() -> tuple[bytes, bool]:
        engine, server, address = await serve()
        host, port = address.rsplit(":", 1)
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            # A wrong token announcing a 15 MiB body, none of it sent: the answer comes at once.
            writer.write(hello(wire.REQUEST, "x" * wire.TOKEN_BYTES, b"")[:-4] + struct.pack("!I", 15 << 20))
            answer = await asyncio.wait_for(reader.read(1 << 16), 2.0)
            closed = await asyncio.wait_for(reader.read(1), 2.0) == b""
            writer.close()
            return answer, closed and engine.load().ongoing == 0
        finally:
            server.close()

    answer, closed = asyncio.run(main())
    assert answer[:1] == ERROR and json.loads(answer[5:])["code"] == "unauthorized" and closed
    with pytest.raises(ClientError, match="bad deployment token"):
        async def wrong() -> None:
            _, server, address = await serve()
            try:
                await _collect(address, WireRequest(chat_request()), token="y" * wire.TOKEN_BYTES)
            finally:
                server.close()
        asyncio.run(wrong())


def test_the_first_frame_is_bounded_and_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "HELLO_TIMEOUT_S", 0.3)

    async def main() -> tuple[bytes, bytes]:
        _, server, address = await serve()
        host, port = address.rsplit(":", 1)
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(hello(wire.REQUEST, TOKEN)[:-4] + struct.pack("!I", wire.MAX_REQUEST_BYTES + 1))
            too_big = await asyncio.wait_for(reader.read(1 << 16), 2.0)
            writer.close()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(hello(wire.REQUEST, TOKEN, b'{"request": ')[:20])  # a hello that never completes
            stalled = await asyncio.wait_for(reader.read(1 << 16), 2.0)  # closed by the replica
            writer.close()
            return too_big, stalled
        finally:
            server.close()

    too_big, stalled = asyncio.run(main())
    assert too_big[:1] == ERROR and json.loads(too_big[5:])["code"] == "malformed_frame"
    assert stalled == b""


def test_frames_that_arrived_before_an_error_are_delivered() -> None:
    chunk = GenerationChunk(text="kept ", num_new_tokens=1, prompt_tokens=2, completion_tokens=1)

    async def main() -> tuple[list, BaseException | None]:
        async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(wire.HELLO.size)
            await reader.read(1 << 16)
            writer.write(encode_chunk(chunk) + encode_chunk(chunk)
                         + error_frame(ServiceUnavailable.make("gone", retry_after_s=1, status_code=503)))
            await writer.drain()
            await asyncio.sleep(0.5)
            writer.close()

        server = await asyncio.start_server(replica, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stream = await open_stream(f"127.0.0.1:{port}", TOKEN, WireRequest(chat_request()), tier="small")
        got: list = []
        error = None
        try:
            async for batch in stream.batches():
                got += batch
        except ServiceUnavailable as exc:
            error = exc
        stream.close()
        server.close()
        return got, error

    got, error = asyncio.run(main())
    assert got == [chunk, chunk] and isinstance(error, ServiceUnavailable)


def test_a_quiet_request_still_hears_from_its_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prefill or a queue sends nothing for seconds; the replica's PINGs tell it from a dead link."""
    monkeypatch.setattr(wire, "HEARTBEAT_S", 0.2)

    class Slow(ScriptedEngine):
        tokens_per_s = 1.5  # the first token after ~0.7 s
        answer_tokens = 1

    async def main() -> float:
        _, server, address = await serve(Slow)
        stream = await open_stream(address, TOKEN, WireRequest(chat_request()), tier="small")
        try:
            await asyncio.sleep(0.5)
            first = asyncio.get_running_loop().create_task(anext(stream.batches()))
            await asyncio.sleep(0.3)
            quiet = stream.silent_for(time.monotonic())
            await first
            return quiet
        finally:
            stream.close()
            server.close()

    assert asyncio.run(main()) < 0.5


def test_closing_the_connection_mid_stream_aborts_the_engine_request() -> None:
    class Slow(ScriptedEngine):
        tokens_per_s = 50.0
        answer_tokens = 200

    async def main() -> tuple[int, int]:
        engine, server, address = await serve(Slow)
        try:
            stream = await open_stream(address, TOKEN, WireRequest(chat_request(max_tokens=None)), tier="small")
            async for _ in stream.batches():
                break
            during = engine.load().ongoing
            stream.close()
            for _ in range(100):
                if engine.load().ongoing == 0:
                    break
                await asyncio.sleep(0.01)
            return during, engine.load().ongoing
        finally:
            server.close()

    assert asyncio.run(main()) == (1, 0)


def test_a_full_replica_refuses_with_503_and_retry_after() -> None:
    class Slow(ScriptedEngine):
        tokens_per_s = 20.0

    async def main() -> ServiceUnavailable:
        _, server, address = await serve(Slow, max_ongoing=1)
        busy = await open_stream(address, TOKEN, WireRequest(chat_request(max_tokens=20)), tier="small")
        try:
            await anext(busy.batches())
            with pytest.raises(ServiceUnavailable) as err:
                await _collect(address, WireRequest(chat_request()))
            return err.value
        finally:
            busy.close()
            server.close()

    err = asyncio.run(main())
    assert err.status_code == 503 and err.headers["Retry-After"] == "1"


def test_an_ingress_on_the_same_node_uses_the_unix_socket_and_falls_back_to_tcp() -> None:
    async def main() -> list[int]:
        _, server, address = await serve()
        families = []
        try:
            for path in (server.local_path, "\0no-such-replica"):
                stream = await open_stream(address, TOKEN, WireRequest(chat_request()), tier="small", local_path=path)
                families.append(stream._writer.transport.get_extra_info("socket").family)
                stream.close()
        finally:
            server.close()
        return families

    assert asyncio.run(main()) == [socket.AF_UNIX, socket.AF_INET]


def test_a_gone_replica_is_a_503_and_a_load_poll_needs_the_token() -> None:
    async def main() -> None:
        engine, server, address = await serve()
        load = await poll_load(address, TOKEN, local_path=server.local_path)
        assert load.tier == "small" and load.ongoing == 0
        with pytest.raises(ClientError, match="bad deployment token"):
            await poll_load(address, "z" * wire.TOKEN_BYTES)
        server.close()
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceUnavailable) as err:
            await open_stream(address, TOKEN, WireRequest(chat_request()), tier="small")
        assert err.value.status_code == 503 and err.value.headers["Retry-After"] == "2"

    asyncio.run(main())


def test_engine_refusals_come_back_as_their_client_error() -> None:
    async def main() -> None:
        _, server, address = await serve()
        try:
            with pytest.raises(InvalidRequest) as err:
                await _collect(address, WireRequest(chat_request(stop=("fail",))))
            assert err.value.param == "stop" and err.value.status_code == 400
        finally:
            server.close()

    asyncio.run(main())


def test_a_fuzzed_data_port_never_crashes_the_replica_leaks_internals_or_leaves_engine_work() -> None:
    """Random and half-valid frames at the replica's port: every answer is a plain error frame (or nothing), the
    replica keeps serving real requests, and no engine request is left running."""
    rng = random.Random(7)
    valid = encode_request(TOKEN, WireRequest(chat_request(max_tokens=2)))

    def cases() -> list[bytes]:
        out = [b"", b"\x00", valid[:10], valid[: wire.HELLO.size], b"Q" + b"x" * 200,
               hello(wire.REQUEST, TOKEN, b"not json"), hello(wire.REQUEST, TOKEN, b"{}"),
               hello(wire.REQUEST, TOKEN, b'{"request": {"request_id": 1}}'),
               hello(wire.REQUEST, TOKEN, json.dumps({"request": {"request_id": "r", "sampling": {"stop": 5}}}).encode()),
               hello(b"Z", TOKEN, b"{}"), hello(wire.LOAD, TOKEN, b"trailing"), frame(END, b"{}") * 3]
        for _ in range(150):
            base = bytearray(rng.choice([valid, valid[: wire.HELLO.size], hello(wire.LOAD, TOKEN)]))
            for _ in range(rng.randint(1, 6)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            out.append(bytes(base[: rng.randint(1, len(base))]))
        out += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))) for _ in range(100)]
        return out

    async def main() -> tuple[list[bytes], int, list[GenerationChunk | End]]:
        engine, server, address = await serve(FastEngine)
        host, port = address.rsplit(":", 1)
        answers = []
        try:
            for data in cases():
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(data)
                writer.write_eof()
                try:
                    answers.append(await asyncio.wait_for(reader.read(1 << 20), 3.0))
                except (ConnectionError, TimeoutError):
                    answers.append(b"")
                writer.close()
            for _ in range(100):
                if engine.load().ongoing == 0:
                    break
                await asyncio.sleep(0.02)
            still_serves = await _collect(address, WireRequest(chat_request(max_tokens=2)))
            return answers, engine.load().ongoing + server.ongoing, still_serves
        finally:
            server.close()

    answers, left_running, still_serves = asyncio.run(main())
    assert left_running == 0 and isinstance(still_serves[-1], End)
    for answer in answers:
        text = answer.decode("utf-8", "replace")
        assert "Traceback" not in text and "File \"" not in text and "/work/" not in text and ".py" not in text
        if answer[:1] == ERROR:
            assert json.loads(answer[5:5 + struct.unpack("!I", answer[1:5])[0]])["status"] in (400, 401, 503)
