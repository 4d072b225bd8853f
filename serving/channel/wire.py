"""The data plane between the ingress and the tier replicas: one connection per request, framed, both ends.

Tokens bypass Ray handles: every item of a Ray stream is a task-return report through both core workers, about
1 ms of CPU per token on a 2-core box. Here a token costs one `write` on the replica and a share of one `read`
on the ingress, which reads whatever has arrived, so frames coalesce under load without a timer. Closing the
connection aborts the engine request.

A connection opens with a fixed-size hello, `kind | token (32 bytes) | length (4 bytes)`, checked before any
body is read; the body (JSON, never pickle: the port is reachable inside the cluster) is bounded by
`MAX_REQUEST_BYTES`, and hello and body must arrive within `HELLO_TIMEOUT_S`. The replica answers with frames
`kind (1 byte) | length (4 bytes) | payload`: CHUNKs (a compact binary delta), then one END (the summary and
the engine's load as the request left it) or an ERROR. A quiet request (a long prefill, a queue) gets a PING
every `HEARTBEAT_S`, so the ingress tells a slow replica from a dead link (`WireStream.silent_for`). A LOAD
hello asks for the load alone. An ingress on the replica's node connects over an abstract Unix socket; TCP
connections use keepalive and TCP_USER_TIMEOUT, so writes into a cut link fail and the engine work stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from router.errors import InvalidRequest, TierserveError
from serving.channel.errors import ServiceUnavailable, error_from_frame, error_payload
from serving.types import (
    ChatMessage,
    EngineLoad,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

TOKEN_BYTES = 32
"""Length of the per-deployment token (`secrets.token_hex(16)`)."""
HELLO = struct.Struct(f"!c{TOKEN_BYTES}sI")
_FRAME = struct.Struct("!cI")
REQUEST, LOAD = b"Q", b"L"
CHUNK, END, ERROR, PING = b"C", b"E", b"X", b"P"
MAX_REQUEST_BYTES = 16 << 20
"""Largest request body a replica reads (a request at http.limits.max_body_bytes, JSON-escaped, fits)."""
HELLO_TIMEOUT_S = 5.0
"""The hello and the request body must arrive within this; a client that stalls is dropped."""
HEARTBEAT_S = 2.0
"""A replica sends a PING on a connection that has carried nothing for this long."""
STALE_AFTER_S = 10.0
"""The ingress gives a stream up (503, replica lost) when it has heard nothing for this long: 5 missed PINGs."""
CONNECT_TIMEOUT_S = 3.0
HIGH_WATER = 256 << 10
"""Replica-side buffered bytes past which a write waits for the ingress to read (a slow client)."""
_TCP_USER_TIMEOUT_MS = 10_000
_FINISH = {None: 0, "stop": 1, "length": 2, "abort": 3}
_FINISH_BACK = {v: k for k, v in _FINISH.items()}
_CHUNK = struct.Struct("!BBHIII")
"""finish reason, has logprobs, new tokens, prompt tokens, completion tokens, text bytes; then the text, then
the logprobs as JSON when present."""


@dataclass(frozen=True)
class WireRequest:
    """What the ingress asks a replica for: one generation, as deltas or (`whole`) one final chunk."""

    request: GenerationRequest
    whole: bool = False


@dataclass(frozen=True)
class End:
    """The last frame of a request: how it finished and the replica's engine load as it left."""

    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    load: EngineLoad | None = None
    """The replica's engine load as the request left it (None only where a cascade gathered a whole answer)."""


# ---- encoding ------------------------------------------------------------------------------------


def frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def hello(kind: bytes, token: str, payload: bytes = b"") -> bytes:
    return HELLO.pack(kind, token.encode(), len(payload)) + payload


def encode_request(token: str, wire: WireRequest) -> bytes:
    r = wire.request  # by hand: `asdict` deep-copies every field, per request on the ingress's event loop
    messages = [{"role": m.role, "content": m.content} for m in r.messages] if r.messages is not None else None
    request = {**vars(r), "sampling": vars(r.sampling), "messages": messages}
    return hello(REQUEST, token, _dump({"request": request, "whole": wire.whole}))


def decode_request(payload: bytes) -> WireRequest:
    """The request from its JSON; any malformation is a 400 that names nothing internal."""
    try:
        d = json.loads(payload)
        r = d["request"]
        s = r["sampling"]
        sampling = SamplingOptions(**{**s, "stop": tuple(s["stop"])})
        messages = r.get("messages")
        request = GenerationRequest(
            request_id=str(r["request_id"]), sampling=sampling, prompt=r.get("prompt"),
            messages=tuple(ChatMessage(**m) for m in messages) if messages is not None else None,
        )
        return WireRequest(request, whole=bool(d.get("whole", False)))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InvalidRequest("wire: malformed request frame", code="malformed_frame") from exc


def encode_chunk(c: GenerationChunk) -> bytes:
    text = c.text.encode()
    lps = _dump([[lp.token, lp.logprob, lp.top] for lp in c.token_logprobs]) if c.token_logprobs else b""
    head = _CHUNK.pack(_FINISH[c.finish_reason], 1 if lps else 0, c.num_new_tokens, c.prompt_tokens,
                       c.completion_tokens, len(text))
    return frame(CHUNK, head + text + lps)


def decode_chunk(payload: bytes) -> GenerationChunk:
    finish, has_lps, new, prompt, completion, n = _CHUNK.unpack_from(payload)
    start = _CHUNK.size
    text = payload[start:start + n].decode()
    lps: tuple[TokenLogprob, ...] = ()
    if has_lps:
        lps = tuple(TokenLogprob(token=t, logprob=v, top=tuple((a, b) for a, b in top))
                    for t, v, top in json.loads(payload[start + n:]))
    return GenerationChunk(text=text, token_logprobs=lps, num_new_tokens=new, finish_reason=_FINISH_BACK[finish],
                           prompt_tokens=prompt, completion_tokens=completion)


def end_frame(last: GenerationChunk | None, load: EngineLoad) -> bytes:
    summary = {"finish_reason": last.finish_reason, "prompt_tokens": last.prompt_tokens,
               "completion_tokens": last.completion_tokens} if last else {}
    return frame(END, _dump({**summary, "load": vars(load)}))


def decode_end(payload: bytes) -> End:
    d = json.loads(payload)
    return End(d.get("finish_reason"), d.get("prompt_tokens", 0), d.get("completion_tokens", 0),
               EngineLoad(**d["load"]))


def error_frame(exc: TierserveError) -> bytes:
    return frame(ERROR, _dump(error_payload(exc)))


def tune(writer: asyncio.StreamWriter) -> None:
    """TCP: no Nagle delay, keepalive, and unacknowledged writes fail after `_TCP_USER_TIMEOUT_MS`."""
    sock = writer.transport.get_extra_info("socket")
    if sock is None or sock.family == socket.AF_UNIX:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3),
                          ("TCP_USER_TIMEOUT", _TCP_USER_TIMEOUT_MS)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


# ---- ingress side --------------------------------------------------------------------------------


class WireStream:
    """One request's frames from a replica: `batches()` yields what each socket read completed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._heard = time.monotonic()

    def silent_for(self, now: float) -> float:
        """Seconds since the replica last sent anything (PINGs included)."""
        return now - self._heard

    async def batches(self) -> AsyncIterator[list[GenerationChunk | End]]:
        """Chunks, then the END summary, a list per socket read. An ERROR frame raises its error once the
        frames that arrived before it have been yielded; a connection that ends early raises
        ConnectionResetError."""
        buf = bytearray()
        while True:
            data = await self._reader.read(1 << 16)
            if not data:
                raise ConnectionResetError("the tier replica closed the stream early")
            self._heard = time.monotonic()
            buf += data
            out: list[GenerationChunk | End] = []
            error: TierserveError | None = None
            pos = 0
            while len(buf) - pos >= _FRAME.size:
                kind, length = _FRAME.unpack_from(buf, pos)
                end = pos + _FRAME.size + length
                if end > len(buf):
                    break
                payload = bytes(buf[pos + _FRAME.size:end])
                pos = end
                if kind == CHUNK:
                    out.append(decode_chunk(payload))
                elif kind == END:
                    out.append(decode_end(payload))
                elif kind == ERROR:
                    error = error_from_frame(json.loads(payload))
                    break
            del buf[:pos]
            if out:
                yield out
            if error is not None:
                raise error

    def abort(self) -> None:
        """Drop the connection now (a stale link): a pending read ends with ConnectionError."""
        self._writer.transport.abort()

    def close(self) -> None:
        """Close the connection; mid-stream this aborts the engine request on the replica."""
        sock = self._writer.transport.get_extra_info("socket")
        # No TIME_WAIT pile-up from one connection per request; a connection the peer reset (its node went
        # away) has no descriptor left, and closing it must not turn the caller's 503 into a 500.
        if sock is not None and sock.fileno() >= 0 and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.close()


async def open_stream(address: str, token: str, wire: WireRequest, *, tier: str, local_path: str | None = None
                      ) -> WireStream:
    """Connect to a replica (at `local_path` when it is on this node) and send the request; a refused or
    timed-out connection is a 503 with Retry-After."""
    try:
        reader, writer = await asyncio.wait_for(_connect(address, local_path), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise ServiceUnavailable.make(
            f"tier '{tier}' has no reachable replica right now ({type(exc).__name__}); retry shortly.",
            retry_after_s=2, status_code=503, code="no_replica",
        ) from None
    tune(writer)
    writer.write(encode_request(token, wire))
    return WireStream(reader, writer)


async def _connect(address: str, local_path: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if local_path is not None:
        with contextlib.suppress(OSError):  # not on this node after all, or the replica is gone: TCP
            return await asyncio.open_unix_connection(local_path, limit=1 << 20)
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port), limit=1 << 20)


async def poll_load(address: str, token: str, *, local_path: str | None = None, timeout_s: float = 2.0
                    ) -> EngineLoad:
    """A replica's engine load now, over its data plane (no Ray call); OSError/TimeoutError if it is gone."""

    async def ask() -> EngineLoad:
        reader, writer = await _connect(address, local_path)
        try:
            writer.write(hello(LOAD, token))
            kind, length = _FRAME.unpack(await reader.readexactly(_FRAME.size))
            payload = await reader.readexactly(length)
            if kind == ERROR:
                raise error_from_frame(json.loads(payload))
            return decode_end(payload).load
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(ask(), timeout_s)
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the replica closed the load poll") from None
