"""The data plane between the ingress and the tier replicas: one TCP connection per request, framed.

Why not Ray's streaming generators (the control plane still uses Ray handles): every item of a Ray
stream is a task-return report through both core workers, about 1 ms of CPU per token on this
machine, so a 32-stream load spent more CPU on the hop than the engine spent decoding (0.17x of bare
vLLM). Here a token costs one `write` on the replica and a share of one `read` on the ingress: the
ingress reads whatever has arrived, so frames coalesce by themselves under load and never wait on a
timer. Closing the connection is the cancellation signal: the replica aborts the engine request.

Frames are `kind (1 byte) | length (4 bytes, big-endian) | payload`. The request frame is JSON (never
pickle: the port is reachable inside the cluster) and carries a per-deployment token. Every request ends
with an END frame that carries the replica's engine load as the request left it, so the ingress's load
view is fresh after every request without a control-plane call; a LOAD frame asks for that load alone
(the ingress's background poll), answered with an END frame.

A replica also listens on an abstract Unix socket; an ingress on the same node connects there instead of
TCP loopback (measured: a loopback TCP write was a fifth of the replica's CPU per streamed token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import Any, Literal

from router.errors import ClientError, TierserveError
from serving.channel.errors import ServiceUnavailable, error_from_frame, error_payload
from serving.engines.base import Engine, EngineError
from serving.ingress.openai import DONE, ChunkEncoder, Kind
from serving.types import (
    ChatMessage,
    EngineLoad,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!cI")
REQUEST, LOAD, SSE, CHUNK, RESULT, END, ERROR = b"Q", b"L", b"S", b"C", b"R", b"E", b"X"
_MAX_FRAME = 64 << 20
_HIGH_WATER = 256 << 10
"""Replica-side buffered bytes past which a write waits for the ingress to read (a slow client)."""

Mode = Literal["sse", "chunks", "result"]


def frame(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


@dataclass(frozen=True)
class SseOptions:
    """How the replica encodes a plain stream: what the ingress would have put in each event."""

    kind: Kind
    model: str
    logprobs: bool
    include_usage: bool
    meta: dict[str, Any]
    """The `tierserve` object for the first and last chunk."""


@dataclass(frozen=True)
class WireRequest:
    request: GenerationRequest
    mode: Mode
    sse: SseOptions | None = None


# ---- JSON of the typed values ------------------------------------------------------------------


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _request_from(d: dict[str, Any]) -> GenerationRequest:
    s = d["sampling"]
    sampling = SamplingOptions(**{**s, "stop": tuple(s["stop"])})
    messages = d.get("messages")
    return GenerationRequest(
        request_id=d["request_id"],
        sampling=sampling,
        prompt=d.get("prompt"),
        messages=tuple(ChatMessage(**m) for m in messages) if messages is not None else None,
    )


def _logprobs_from(items: list[dict[str, Any]]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(token=i["token"], logprob=i["logprob"], top=tuple((t, v) for t, v in i["top"])) for i in items
    )


def chunk_from(d: dict[str, Any]) -> GenerationChunk:
    return GenerationChunk(**{**d, "token_logprobs": _logprobs_from(d["token_logprobs"])})


def result_from(d: dict[str, Any]) -> GenerationResult:
    return GenerationResult(**{**d, "token_logprobs": _logprobs_from(d["token_logprobs"])})


def encode_request(token: str, wire: WireRequest) -> bytes:
    body = {"token": token, "mode": wire.mode, "request": asdict(wire.request),
            "sse": asdict(wire.sse) if wire.sse else None}
    return frame(REQUEST, _dump(body))


def decode_request(payload: bytes) -> tuple[str, WireRequest]:
    d = json.loads(payload)
    sse = SseOptions(**d["sse"]) if d.get("sse") else None
    return d["token"], WireRequest(request=_request_from(d["request"]), mode=d["mode"], sse=sse)


def error_frame(exc: TierserveError) -> bytes:
    return frame(ERROR, _dump(error_payload(exc)))


# ---- replica side ------------------------------------------------------------------------------


class WireServer:
    """Serves one replica's engine to the ingress: a task per connection, aborted when it closes."""

    def __init__(self, engine: Engine, token: str) -> None:
        self.engine = engine
        self.token = token
        self.local_path: str | None = None
        """The abstract Unix socket an ingress on this node connects to (None where there is none)."""
        self._servers: list[asyncio.Server] = []

    async def start(self, host: str, port: int = 0) -> str:
        """Listen on host:port (0: any free port) and on a node-local Unix socket; return "host:port"."""
        server = await asyncio.start_server(self._handle, host, port, backlog=1024)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        path = f"\0tierserve-wire-{os.getpid()}-{bound[1]}"  # abstract: nothing on disk to clean up
        try:
            self._servers.append(await asyncio.start_unix_server(self._handle, path, backlog=1024))
            self.local_path = path
        except OSError as exc:  # TCP alone still serves every ingress
            logger.warning("wire: no node-local socket (%s); same-node ingresses use TCP", exc)
        return f"{host}:{bound[1]}"

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _no_delay(writer)
        watcher: asyncio.Task | None = None
        try:
            kind, length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
            if kind not in (REQUEST, LOAD) or length > _MAX_FRAME:
                return
            payload = await reader.readexactly(length)
            token, wire = decode_request(payload) if kind == REQUEST else (json.loads(payload)["token"], None)
            if not hmac.compare_digest(token.encode(), self.token.encode()):
                writer.write(error_frame(ClientError("wire: bad deployment token", code="unauthorized")))
                return
            if wire is None:
                writer.write(self._end({}))
                return
            # The ingress closes the connection when its client goes away: cancel the generation then.
            watcher = asyncio.get_running_loop().create_task(_cancel_on_eof(reader, asyncio.current_task()))
            await self._serve(wire, writer)
        except asyncio.CancelledError:
            logger.debug("wire: ingress closed the stream")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if watcher is not None:
                watcher.cancel()
            writer.close()

    async def _serve(self, wire: WireRequest, writer: asyncio.StreamWriter) -> None:
        request = wire.request
        try:
            if wire.mode == "result":
                result = await self.engine.complete(request)
                writer.write(frame(RESULT, _dump(asdict(result))) + self._end({}))
                return
            async with aclosing(self.engine.generate(request)) as chunks:
                if wire.mode == "chunks":
                    async for chunk in chunks:
                        await _send(writer, frame(CHUNK, _dump(asdict(chunk))))
                    writer.write(self._end({}))
                else:
                    await self._serve_sse(wire.sse, request.request_id, chunks, writer)
        except TierserveError as exc:
            writer.write(error_frame(exc))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # an engine bug: logged here, a plain 500 for the client (no internals)
            logger.exception("tier engine failed on %s", request.request_id)
            writer.write(error_frame(EngineError("the tier's engine failed on this request")))

    async def _serve_sse(
        self, opts: SseOptions, request_id: str, chunks: AsyncIterator[GenerationChunk], writer: asyncio.StreamWriter
    ) -> None:
        encoder = ChunkEncoder(kind=opts.kind, request_id=request_id, model=opts.model, logprobs=opts.logprobs,
                               include_usage=opts.include_usage)
        last: GenerationChunk | None = None
        async for chunk in chunks:
            edge = last is None or chunk.finish_reason is not None
            last = chunk
            await _send(writer, frame(SSE, encoder.encode(chunk, opts.meta if edge else None)))
        if last is None:
            raise EngineError("the tier's engine ended the stream without output")
        tail = (encoder.usage_chunk(last, opts.meta) if opts.include_usage else b"") + DONE
        summary = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
                   "finish_reason": last.finish_reason}
        writer.write(frame(SSE, tail) + self._end(summary))

    def _end(self, summary: dict[str, Any]) -> bytes:
        """The END frame: `summary`, plus the engine's load now that this request has left it."""
        return frame(END, _dump({**summary, "load": asdict(self.engine.load())}))


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.transport.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    if writer.transport.get_write_buffer_size() > _HIGH_WATER:
        await writer.drain()


async def _cancel_on_eof(reader: asyncio.StreamReader, task: asyncio.Task | None) -> None:
    try:
        await reader.read(1)
    except ConnectionError:
        pass
    if task is not None:
        task.cancel()


# ---- ingress side ------------------------------------------------------------------------------


class WireStream:
    """One request's frames from a replica. Iterate for batches of frames, one batch per socket read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()

    async def batches(self) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """Complete frames as they arrive; an ERROR frame raises its error."""
        buf = self._buffer
        while True:
            data = await self._reader.read(1 << 16)
            if not data:
                raise ConnectionResetError("the tier replica closed the stream early")
            buf += data
            out: list[tuple[bytes, bytes]] = []
            pos = 0
            while len(buf) - pos >= _HEADER.size:
                kind, length = _HEADER.unpack_from(buf, pos)
                end = pos + _HEADER.size + length
                if end > len(buf):
                    break
                payload = bytes(buf[pos + _HEADER.size:end])
                if kind == ERROR:
                    raise error_from_frame(json.loads(payload))
                out.append((kind, payload))
                pos = end
            del buf[:pos]
            if out:
                yield out

    def close(self) -> None:
        """Close the connection; mid-stream this aborts the engine request on the replica."""
        sock = self._writer.transport.get_extra_info("socket")
        # No TIME_WAIT pile-up from one connection per request; a connection the peer reset (its node went
        # away) has no descriptor left, and closing it must not turn the caller's 503 into a 500.
        if sock is not None and sock.fileno() >= 0 and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.close()


async def open_stream(
    address: str, token: str, wire: WireRequest, *, tier: str, local_path: str | None = None
) -> WireStream:
    """Connect to a replica (at `local_path` when it is on this node) and send the request; a refused
    connection is a 503 with Retry-After."""
    try:
        reader, writer = await _connect(address, local_path)
    except OSError as exc:
        raise ServiceUnavailable.make(
            f"tier '{tier}' has no reachable replica right now ({type(exc).__name__}); retry shortly.",
            retry_after_s=2, status_code=503,
        ) from None
    _no_delay(writer)
    writer.write(encode_request(token, wire))
    return WireStream(reader, writer)


async def _connect(address: str, local_path: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if local_path is not None:
        with contextlib.suppress(OSError):  # not on this node after all, or the replica is gone: TCP
            return await asyncio.open_unix_connection(local_path, limit=1 << 20)
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port), limit=1 << 20)


async def poll_load(address: str, token: str, *, local_path: str | None = None, timeout_s: float = 2.0) -> EngineLoad:
    """A replica's engine load now, over its data plane (no Ray call); OSError/TimeoutError if it is gone."""

    async def ask() -> EngineLoad:
        reader, writer = await _connect(address, local_path)
        try:
            writer.write(frame(LOAD, _dump({"token": token})))
            kind, length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
            payload = json.loads(await reader.readexactly(length))
            if kind == ERROR:
                raise error_from_frame(payload)
            return EngineLoad(**payload["load"])
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(ask(), timeout_s)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the replica closed the load poll") from None
