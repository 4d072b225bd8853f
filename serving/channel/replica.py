"""The replica end of the tier channel: the Ray Serve deployment hosting one tier's engine, and the wire server
that serves the engine to the ingresses.

Ray Serve owns the replica's life (placement, health checks, restarts, scaling); the tokens leave through
the replica's own data port (`serving.channel.wire`), whose address the ingress learns from `status()`.
Because requests bypass Ray handles, the replica reports its ongoing and queued requests to Serve's
autoscaler itself (`record_autoscaling_stats`, read by `serving.channel.autoscale.tier_policy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path

import ray
from ray import serve

from router.errors import ClientError, InvalidRequest, TierserveError
from serving.channel import wire
from serving.channel.errors import ServiceUnavailable
from serving.channel.reaper import EngineReaper
from serving.channel.wire import (
    LOAD,
    PING,
    REQUEST,
    WireRequest,
    decode_request,
    encode_chunk,
    end_frame,
    error_frame,
    frame,
    tune,
)
from serving.config import TierConfig
from serving.engines.base import Engine, EngineError
from serving.types import GenerationChunk, ReplicaStatus, TierInfo

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
        d = tier.deployment  # what Ray Serve would hold: ongoing, plus queued (unbounded when -1)
        limit = d.max_ongoing_requests + d.max_queued_requests if d.max_queued_requests >= 0 else 1 << 30
        self.wire = WireServer(self.engine, wire_token, max_ongoing=limit)
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


class WireServer:
    """Serves one replica's engine to the ingresses: a task per connection, its engine request aborted when
    the connection closes. Refuses requests past `max_ongoing` (503 with Retry-After)."""

    def __init__(self, engine: Engine, token: str, *, max_ongoing: int) -> None:
        if len(token) != wire.TOKEN_BYTES:
            raise ValueError(f"wire token must be {wire.TOKEN_BYTES} characters")
        self.engine = engine
        self._token = token.encode()
        self.max_ongoing = max_ongoing
        self.local_path: str | None = None
        """The abstract Unix socket an ingress on this node connects to (None where there is none)."""
        self.ongoing = 0
        """Requests inside this server now (admitted, not yet ended)."""
        self._servers: list[asyncio.Server] = []
        self._last_write: dict[asyncio.StreamWriter, float] = {}
        self._heartbeat: asyncio.Task | None = None

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
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        return f"{host}:{bound[1]}"

    def close(self) -> None:
        for server in self._servers:
            server.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()

    async def _beat(self) -> None:
        """PING every connection that has carried nothing for `wire.HEARTBEAT_S` (one timer for all of them)."""
        ping = frame(PING, b"")
        while True:
            await asyncio.sleep(wire.HEARTBEAT_S / 2)
            now = time.monotonic()
            for writer, last in list(self._last_write.items()):
                if now - last >= wire.HEARTBEAT_S and not writer.is_closing():
                    writer.write(ping)
                    self._last_write[writer] = now

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tune(writer)
        watcher: asyncio.Task | None = None
        try:
            asked = await asyncio.wait_for(self._read_hello(reader, writer), wire.HELLO_TIMEOUT_S)
            if asked is None:
                return
            # The ingress closes the connection when its client goes away: cancel the generation then.
            watcher = asyncio.get_running_loop().create_task(_cancel_on_eof(reader, asyncio.current_task()))
            self._last_write[writer] = time.monotonic()
            await self._serve(asked, writer)
        except asyncio.CancelledError:
            logger.debug("wire: ingress closed the stream")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._last_write.pop(writer, None)
            if watcher is not None:
                watcher.cancel()
            writer.close()

    async def _read_hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> WireRequest | None:
        """The request after a valid hello; None when answered already (a load poll, a refusal)."""
        kind, token, length = wire.HELLO.unpack(await reader.readexactly(wire.HELLO.size))
        if not hmac.compare_digest(token, self._token):
            writer.write(error_frame(ClientError("wire: bad deployment token", code="unauthorized")))
            return None
        if kind == LOAD:
            writer.write(end_frame(None, self.engine.load()))
            return None
        if kind != REQUEST or length > wire.MAX_REQUEST_BYTES:
            writer.write(error_frame(InvalidRequest("wire: malformed request frame", code="malformed_frame")))
            return None
        try:
            return decode_request(await reader.readexactly(length))
        except InvalidRequest as exc:
            writer.write(error_frame(exc))
            return None

    async def _serve(self, asked: WireRequest, writer: asyncio.StreamWriter) -> None:
        request = asked.request
        if self.ongoing >= self.max_ongoing:
            writer.write(error_frame(ServiceUnavailable.make(
                f"this replica of the tier is at its limit of {self.max_ongoing} requests (deployment."
                "max_ongoing_requests + max_queued_requests); retry shortly.", retry_after_s=1, status_code=503)))
            return
        self.ongoing += 1
        last: GenerationChunk | None = None
        try:
            async with aclosing(self.engine.generate(request, whole=asked.whole)) as chunks:
                async for chunk in chunks:
                    last = chunk
                    await self._send(writer, encode_chunk(chunk))
            if last is None:
                raise EngineError("the tier's engine ended the stream without output")
            writer.write(end_frame(last, self.engine.load()))
        except TierserveError as exc:
            writer.write(error_frame(exc))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # an engine bug: logged here, a plain 500 for the client (no internals)
            logger.exception("tier engine failed on %s", request.request_id)
            writer.write(error_frame(EngineError("the tier's engine failed on this request")))
        finally:
            self.ongoing -= 1

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self._last_write[writer] = time.monotonic()
        if writer.transport.get_write_buffer_size() > wire.HIGH_WATER:
            await writer.drain()


async def _cancel_on_eof(reader: asyncio.StreamReader, task: asyncio.Task | None) -> None:
    with contextlib.suppress(ConnectionError):
        await reader.read(1)
    if task is not None:
        task.cancel()
