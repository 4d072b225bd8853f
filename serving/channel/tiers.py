"""The ingress's view of the tier deployments: the data-plane calls, readiness and a cached load view.

Tokens travel over each replica's wire port (`serving.channel.wire`), whose END frame also brings the replica's
load as each request leaves it; the background poll asks known replicas for their load over the same
port. Ray handles carry only the control plane: `status()` to find replicas (every couple of seconds,
never per request) and `info()` for /health.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import replace

from ray.serve.handle import DeploymentHandle

from serving.capacity import combine_loads
from serving.channel.errors import ServiceUnavailable
from serving.channel.wire import (
    CHUNK,
    END,
    RESULT,
    SSE,
    SseOptions,
    WireRequest,
    WireStream,
    chunk_from,
    open_stream,
    poll_load,
    result_from,
)
from serving.engines.base import EngineError
from serving.types import (
    EngineLoad,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    ReplicaStatus,
    TierInfo,
)

logger = logging.getLogger(__name__)

_ADDRESS_MAX_AGE_S = 10.0
"""A replica not heard from for this long is not sent new requests (its poll keeps failing)."""
_DISCOVER_EVERY_S = 2.0
"""How often the poller asks Ray Serve for a tier's replicas (one per call) besides polling known ones."""


class SseRelay:
    """A replica-encoded SSE stream: `first` is already read (errors surface before the headers go out),
    iterate for the rest; `summary` holds the token counts once the stream has ended."""

    def __init__(self) -> None:
        self.first = b""
        self._rest: AsyncIterator[bytes] | None = None
        self.summary: GenerationChunk | None = None
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the stream has ended, however it ends."""
        self._on_close.append(callback)

    async def _closing(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async with aclosing(body) as inner:
                async for data in inner:
                    yield data
        finally:
            for callback in self._on_close:
                callback()

    async def start(self, body: AsyncIterator[bytes]) -> SseRelay:
        """Read the first event of `body` (raising its error, if any); the rest is read by iterating."""
        body = self._rest = self._closing(body)
        try:
            self.first = await anext(body)
        except StopAsyncIteration:
            raise EngineError("the tier ended the stream without output") from None
        except BaseException:
            await body.aclose()
            raise
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        assert self._rest is not None, "start() first"
        return self._rest

    async def aclose(self) -> None:
        if self._rest is not None:
            await self._rest.aclose()


class TierClient:
    """Calls into the tier deployments. Picks the replica with the fewest requests in flight from here."""

    def __init__(
        self, handles: Mapping[str, DeploymentHandle], *, wire_token: str, poll_interval_s: float = 0.25,
        node_ip: str | None = None,
    ) -> None:
        self.handles = dict(handles)
        self.names = list(handles)
        self.wire_token = wire_token
        self.poll_interval_s = poll_interval_s
        self.node_ip = node_ip
        """This process's node: its replicas are reached over their Unix socket."""
        self._replicas: dict[str, dict[str, tuple[ReplicaStatus, float]]] = {name: {} for name in self.names}
        self._inflight: dict[str, int] = {}
        self._poller: asyncio.Task | None = None

    # ---- the data plane ---------------------------------------------------------------------

    async def _open(self, tier: str, wire: WireRequest) -> tuple[str, WireStream]:
        """Connect to a replica of `tier`; one retry on another replica if a known one went away."""
        for attempt in range(2):
            replica = self._pick(tier)
            if replica is None:
                await self._poll(tier)
                replica = self._pick(tier)
            if replica is None:
                raise ServiceUnavailable(
                    f"tier '{tier}' has no ready replica (starting, or its node is gone); retry shortly.",
                    code="no_replica", headers={"Retry-After": "2"},
                )
            address = replica.address
            try:
                return address, await open_stream(address, self.wire_token, wire, tier=tier,
                                                  local_path=self._local_path(replica))
            except ServiceUnavailable:
                self._forget(tier, address)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _frames(self, tier: str, wire: WireRequest) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """Frames of one call, a batch per socket read; closing early aborts the engine request."""
        address, stream = await self._open(tier, wire)
        self._inflight[address] = self._inflight.get(address, 0) + 1
        try:
            async for batch in stream.batches():
                if batch[-1][0] == END:  # the replica's load as this request left it
                    self._note_load(tier, address, EngineLoad(**json.loads(batch[-1][1])["load"]))
                yield batch
        except ConnectionError:  # the replica died (Serve replaces it): retryable, so 503 with Retry-After
            self._forget(tier, address)
            raise ServiceUnavailable(
                f"tier '{tier}': its replica went away mid-request; retry shortly.",
                code="replica_lost", headers={"Retry-After": "2"},
            ) from None
        finally:
            self._inflight[address] -= 1
            stream.close()

    async def stream(self, tier: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Typed chunks (for the cascade's hold-back); leaving early aborts the engine request."""
        frames = self._frames(tier, WireRequest(request, "chunks"))
        try:
            async for batch in frames:
                for kind, payload in batch:
                    if kind == CHUNK:
                        yield chunk_from(json.loads(payload))
                    elif kind == END:
                        return
        finally:
            await frames.aclose()

    async def generate(self, tier: str, request: GenerationRequest) -> GenerationResult:
        frames = self._frames(tier, WireRequest(request, "result"))
        try:
            async for batch in frames:
                for kind, payload in batch:
                    if kind == RESULT:
                        return result_from(json.loads(payload))
        finally:
            await frames.aclose()
        raise EngineError(f"tier '{tier}' ended the request without a result")

    async def relay(self, tier: str, request: GenerationRequest, options: SseOptions) -> SseRelay:
        """A stream the replica encodes itself: the ingress forwards its bytes, a write per socket read."""
        frames = self._frames(tier, WireRequest(request, "sse", options))
        relay = SseRelay()

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for batch in frames:
                    data = b"".join(p for k, p in batch if k == SSE)
                    if data:
                        yield data
                    for kind, payload in batch:
                        if kind == END:
                            s = json.loads(payload)
                            relay.summary = GenerationChunk(
                                text="", finish_reason=s["finish_reason"], prompt_tokens=s["prompt_tokens"],
                                completion_tokens=s["completion_tokens"],
                            )
                            return
            finally:
                await frames.aclose()

        return await relay.start(rest())

    async def info(self, tier: str, timeout_s: float = 2.0) -> TierInfo | None:
        """The tier's info, or None while it has no ready replica."""
        try:
            return await asyncio.wait_for(self.handles[tier].info.remote(), timeout_s)
        except Exception:  # starting, restarting or gone: not ready
            return None

    # ---- replicas and load --------------------------------------------------------------------

    def _pick(self, tier: str) -> ReplicaStatus | None:
        now = time.monotonic()
        live = [s for s, seen in self._replicas[tier].values() if now - seen <= _ADDRESS_MAX_AGE_S]
        return min(live, key=lambda s: self._inflight.get(s.address, 0), default=None)

    def _local_path(self, replica: ReplicaStatus) -> str | None:
        """The replica's Unix socket when it is on this node."""
        return replica.local_path if replica.address.rpartition(":")[0] == self.node_ip else None

    def _forget(self, tier: str, address: str) -> None:
        for replica_id, (status, _) in list(self._replicas[tier].items()):
            if status.address == address:
                del self._replicas[tier][replica_id]

    def start_polling(self) -> None:
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        discover_every = max(1, round(_DISCOVER_EVERY_S / self.poll_interval_s))
        for n in itertools.count():
            await asyncio.gather(*(self._refresh(name, discover=n % discover_every == 0) for name in self.names),
                                 return_exceptions=True)
            await asyncio.sleep(self.poll_interval_s)

    async def _refresh(self, tier: str, *, discover: bool) -> None:
        """Known replicas' loads over their data plane; a Ray call only to find replicas."""
        known = [status for status, _ in self._replicas[tier].values()]
        if discover or not known:
            await self._poll(tier)
        await asyncio.gather(*(self._poll_wire(tier, status) for status in known), return_exceptions=True)

    async def _poll_wire(self, tier: str, status: ReplicaStatus) -> None:
        try:
            load = await poll_load(status.address, self.wire_token, local_path=self._local_path(status))
        except TimeoutError:  # busy, not gone: the view it had stands, and ages out if it never answers
            logger.debug("load poll of %s at %s timed out", tier, status.address)
            return
        except OSError as exc:  # gone (Serve replaces it): stop sending it requests now
            logger.debug("load poll of %s at %s failed: %s", tier, status.address, exc)
            self._forget(tier, status.address)
            return
        self._note_load(tier, status.address, load, heard=True)

    async def _poll(self, tier: str) -> None:
        try:
            status: ReplicaStatus = await asyncio.wait_for(self.handles[tier].status.remote(), 2.0)
        except Exception as exc:  # a replica starting or restarting: keep the last view, it ages out
            logger.debug("status poll of %s failed: %s", tier, exc)
            return
        held = self._replicas[tier].get(status.replica_id)
        if held is None or status.load.timestamp >= held[0].load.timestamp:  # a slow reply never wins
            self._replicas[tier][status.replica_id] = (status, time.monotonic())

    def _note_load(self, tier: str, address: str, load: EngineLoad, *, heard: bool = False) -> None:
        """A replica's load from its END frame or a load poll (`heard`: it answered, so it is alive); an older
        reading never replaces a newer one."""
        for replica_id, (status, seen) in self._replicas[tier].items():
            if status.address == address and load.timestamp >= status.load.timestamp:
                self._replicas[tier][replica_id] = (replace(status, load=load), time.monotonic() if heard else seen)

    def loads(self, max_age_s: float = 5.0) -> dict[str, EngineLoad]:
        """Per tier, its replicas' loads reported within max_age_s, combined (tiers with none omitted)."""
        now = time.time()
        result = {}
        for tier, by_replica in self._replicas.items():
            fresh = [s.load for s, _ in by_replica.values() if now - s.load.timestamp <= max_age_s]
            if fresh:
                result[tier] = combine_loads(fresh)
        return result

