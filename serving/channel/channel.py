"""The tier channel: the one way the ingress calls a tier.

    call = await channel.open("small", request)      # admitted, connected to the least-loaded replica
    async with call:
        async for chunks in call: ...                # typed chunks, a batch per socket read
    call.end                                         # how it finished, tokens, the replica's load then

`open` takes an admission slot (429/503 with Retry-After past `capacity` limits), picks the replica with the
fewest requests in flight (`pick_replica`), connects (one retry on another replica) and
sends the request. The call holds the slot until it ends, however it ends: its last chunk, an error, the
caller closing it (which aborts the engine request), or the replica going silent for `STALE_AFTER_S` (a
cut link: 503 `replica_lost`). Whole answers (`complete`), streams, the LLM judge and cascades all use it.

Replicas are found through their deployment's Ray handle (`status()`, every couple of seconds, never per
request); their load arrives with every END frame and with a background poll over the data port.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from serving.capacity import CapacityConfig, admit, combine_loads
from serving.channel.errors import Overloaded, ServiceUnavailable
from serving.channel.wire import (
    STALE_AFTER_S,
    End,
    WireRequest,
    WireStream,
    open_stream,
    poll_load,
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
"""How often the poller asks Ray Serve for a tier's replicas besides polling the known ones."""


class TierCall:
    """One request on one tier. Iterate for batches of typed chunks; `end` is set once the replica's END
    frame has arrived. `aclose()` (or leaving `async with`) ends it early, aborting the engine work, and
    frees the admission slot; it is safe to call more than once."""

    def __init__(self, channel: TierChannel, tier: str, address: str, stream: WireStream) -> None:
        self.tier = tier
        self.address = address
        self.end: End | None = None
        self._channel = channel
        self._stream = stream
        self._batches = self._read()
        self._closed = False

    async def __aenter__(self) -> TierCall:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[list[GenerationChunk]]:
        return self._batches

    async def _read(self) -> AsyncIterator[list[GenerationChunk]]:
        try:
            async for batch in self._stream.batches():
                if isinstance(batch[-1], End):
                    self.end = batch[-1]
                    if self.end.load is not None:  # it answered, so it is alive
                        self._channel._note_load(self.tier, self.address, self.end.load, heard=True)
                    if len(batch) > 1:
                        yield batch[:-1]  # type: ignore[misc]
                    return
                yield batch  # type: ignore[misc]
        except ConnectionError:  # the replica died or its link went silent (Serve replaces it): retryable
            self._channel._forget(self.tier, self.address)
            raise ServiceUnavailable.make(
                f"tier '{self.tier}': its replica went away mid-request; retry shortly.",
                retry_after_s=2, status_code=503, code="replica_lost",
            ) from None
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._stream.close()
            self._channel._closed(self)

    async def aclose(self) -> None:
        self._finish()
        await self._batches.aclose()


class TierChannel:
    """Admitted calls to the tier deployments, on their replicas' data ports (`serving.channel.wire`)."""

    def __init__(self, tier_names: list[str], capacity: CapacityConfig, *, token: str,
                 handles: Mapping[str, object] | None = None, node_ip: str | None = None) -> None:
        self.names = list(tier_names)
        self.handles = dict(handles or {})
        """Each tier deployment's Ray handle, to find its replicas (a tier without one uses `add_replica`)."""
        self.capacity = capacity
        self.token = token
        self.node_ip = node_ip
        """This process's node: its replicas are reached over their Unix socket."""
        self.inflight = {name: 0 for name in self.names}
        """Calls open from this ingress replica, per tier (the admission count)."""
        self.limits = {name: capacity.limits_for(name).max_inflight for name in self.names}
        """Calls each tier admits from this ingress replica at once (`capacity` limits)."""
        self._replicas: dict[str, dict[str, tuple[ReplicaStatus, float]]] = {name: {} for name in self.names}
        self._by_address: dict[str, int] = {}
        self._open: set[TierCall] = set()
        self._done: dict[str, deque[float]] = {name: deque() for name in self.names}
        self._tasks: list[asyncio.Task] = []

    # ---- calls ----------------------------------------------------------------------------------

    async def open(self, tier: str, request: GenerationRequest, *, whole: bool = False) -> TierCall:
        """A call on `tier`, admitted and sent: Overloaded past the tier's limits, ServiceUnavailable when
        no replica answers."""
        self._admit(tier)
        self.inflight[tier] += 1
        try:
            address, stream = await self._connect(tier, WireRequest(request, whole))
        except BaseException:
            self._release(tier)
            raise
        call = TierCall(self, tier, address, stream)
        self._by_address[address] = self._by_address.get(address, 0) + 1
        self._open.add(call)
        return call

    async def complete(self, tier: str, request: GenerationRequest) -> tuple[GenerationResult, End]:
        """The whole answer on `tier` (the engine delivers it in one piece)."""
        async with await self.open(tier, request, whole=True) as call:
            chunks = [c async for batch in call for c in batch]
        if not chunks or call.end is None:
            raise EngineError(f"tier '{tier}' ended the request without a result")
        text = chunks[0].text if len(chunks) == 1 else "".join(c.text for c in chunks)
        return GenerationResult(text=text, finish_reason=call.end.finish_reason or "abort",  # type: ignore[arg-type]
                                prompt_tokens=call.end.prompt_tokens, completion_tokens=call.end.completion_tokens,
                                token_logprobs=tuple(lp for c in chunks for lp in c.token_logprobs)), call.end

    def has_room(self, tier: str) -> bool:
        """Whether `tier` would admit one more call now (no side effects)."""
        return self.inflight[tier] < self.limits[tier]

    def _admit(self, tier: str) -> None:
        if self.inflight[tier] < self.limits[tier]:
            return
        verdict = admit(self.inflight, tier, self.capacity, load=self.loads(self.capacity.stats_max_age_s).get(tier),
                        throughput_rps=self._throughput_rps(tier))
        if not verdict.admitted:
            raise Overloaded.make(
                f"Tier '{tier}' is at its limit of {verdict.limit} requests in flight; retry after "
                f"{verdict.retry_after_s} s.",
                retry_after_s=verdict.retry_after_s or self.capacity.retry_after_default_s,
                status_code=verdict.status or self.capacity.reject_status,
            )

    def _release(self, tier: str) -> None:
        self.inflight[tier] -= 1
        self._done[tier].append(time.monotonic())

    def _closed(self, call: TierCall) -> None:
        self._open.discard(call)
        self._by_address[call.address] -= 1
        self._release(call.tier)

    def _throughput_rps(self, tier: str) -> float | None:
        window = self.capacity.stats_window_s
        done, now = self._done[tier], time.monotonic()
        while done and now - done[0] > window:
            done.popleft()
        return len(done) / window if done else None

    async def _connect(self, tier: str, wire: WireRequest) -> tuple[str, WireStream]:
        """Connect to a replica of `tier`; one retry on another replica if a known one went away."""
        for attempt in range(2):
            replica = self._pick(tier)
            if replica is None:
                await self._discover(tier)
                replica = self._pick(tier)
            if replica is None:
                raise ServiceUnavailable.make(
                    f"tier '{tier}' has no ready replica (starting, or its node is gone); retry shortly.",
                    retry_after_s=2, status_code=503, code="no_replica",
                )
            try:
                return replica.address, await open_stream(replica.address, self.token, wire, tier=tier,
                                                          local_path=self._local_path(replica))
            except ServiceUnavailable:
                self._forget(tier, replica.address)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    # ---- replicas and their load ------------------------------------------------------------------

    def _pick(self, tier: str) -> ReplicaStatus | None:
        now = time.monotonic()
        live = [s for s, seen in self._replicas[tier].values() if now - seen <= _ADDRESS_MAX_AGE_S]
        return pick_replica(live, self._by_address, now=time.time(), max_age_s=self.capacity.stats_max_age_s)


    def _local_path(self, replica: ReplicaStatus) -> str | None:
        """The replica's Unix socket when it is on this node."""
        return replica.local_path if replica.address.rpartition(":")[0] == self.node_ip else None

    def _forget(self, tier: str, address: str) -> None:
        for replica_id, (status, _) in list(self._replicas[tier].items()):
            if status.address == address:
                del self._replicas[tier][replica_id]

    def _note_load(self, tier: str, address: str, load: EngineLoad, *, heard: bool = False) -> None:
        """A replica's load from its END frame or a load poll (`heard`: it answered, so it is alive); an older
        reading never replaces a newer one."""
        for replica_id, (status, seen) in self._replicas[tier].items():
            if status.address == address and load.timestamp >= status.load.timestamp:
                self._replicas[tier][replica_id] = (replace(status, load=load), time.monotonic() if heard else seen)

    def loads(self, max_age_s: float = 5.0) -> dict[str, EngineLoad]:
        """Per tier, its replicas' loads reported within `max_age_s`, combined (tiers with none omitted)."""
        now = time.time()
        result = {}
        for tier, by_replica in self._replicas.items():
            fresh = [s.load for s, _ in by_replica.values() if now - s.load.timestamp <= max_age_s]
            if fresh:
                result[tier] = combine_loads(fresh)
        return result

    def replicas(self, tier: str) -> list[ReplicaStatus]:
        """The replicas of `tier` this ingress knows, as last heard."""
        return [status for status, _ in self._replicas[tier].values()]

    async def info(self, tier: str, timeout_s: float = 2.0) -> TierInfo | None:
        """The tier's info (control plane), or None while it has no ready replica."""
        if tier not in self.handles:
            return None
        try:
            return await asyncio.wait_for(self.handles[tier].info.remote(), timeout_s)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - starting, restarting or gone: not ready
            return None

    # ---- background: discovery, load polls, silent links ------------------------------------------

    def start(self, poll_interval_s: float) -> None:
        """Start polling replicas and watching open calls for silence (in the running event loop)."""
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_forever(poll_interval_s)), loop.create_task(self._watch())]

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _watch(self) -> None:
        """Drop calls whose replica has sent nothing (not even a PING) for `STALE_AFTER_S`: a cut link or a
        frozen replica ends the stream with an error instead of hanging until the request timeout."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for call in list(self._open):
                if call._stream.silent_for(now) > STALE_AFTER_S:
                    logger.warning("tier %s: replica %s silent for %.0f s; dropping its call", call.tier,
                                   call.address, STALE_AFTER_S)
                    call._stream.abort()

    async def _poll_forever(self, interval_s: float) -> None:
        discover_every = max(1, round(_DISCOVER_EVERY_S / interval_s))
        for n in itertools.count():
            await asyncio.gather(*(self._refresh(name, discover=n % discover_every == 0) for name in self.names),
                                 return_exceptions=True)
            await asyncio.sleep(interval_s)

    async def _refresh(self, tier: str, *, discover: bool) -> None:
        """Known replicas' loads over their data plane; a Ray call only to find replicas."""
        known = self.replicas(tier)
        if discover or not known:
            await self._discover(tier)
        await asyncio.gather(*(self._poll_wire(tier, status) for status in known), return_exceptions=True)

    async def _poll_wire(self, tier: str, status: ReplicaStatus) -> None:
        try:
            load = await poll_load(status.address, self.token, local_path=self._local_path(status))
        except TimeoutError:  # busy, not gone: the view it had stands, and ages out if it never answers
            logger.debug("load poll of %s at %s timed out", tier, status.address)
            return
        except OSError as exc:  # gone (Serve replaces it): stop sending it requests now
            logger.debug("load poll of %s at %s failed: %s", tier, status.address, exc)
            self._forget(tier, status.address)
            return
        self._note_load(tier, status.address, load, heard=True)

    async def _discover(self, tier: str) -> None:
        """Ask Ray Serve for replicas of `tier`: one call more than the replicas known, so Serve's own router
        (which picks among replicas at random) reaches a new one within a round or two."""
        if tier not in self.handles:
            return
        calls = [self.handles[tier].status.remote() for _ in range(len(self._replicas[tier]) + 1)]  # type: ignore[attr-defined]
        for reply in await asyncio.gather(*(asyncio.wait_for(c, 2.0) for c in calls), return_exceptions=True):
            if isinstance(reply, BaseException):  # starting or restarting: keep the last view, it ages out
                logger.debug("status poll of %s failed: %s", tier, reply)
                continue
            self.add_replica(tier, reply)

    def add_replica(self, tier: str, status: ReplicaStatus) -> None:
        """Know (or refresh) a replica of `tier`: what discovery does, and how a channel without Ray (a test, a
        tool) is pointed at replicas. A slower, older report never replaces a newer one."""
        held = self._replicas[tier].get(status.replica_id)
        if held is None or status.load.timestamp >= held[0].load.timestamp:
            self._replicas[tier][status.replica_id] = (status, time.monotonic())


def pick_replica(replicas: list[ReplicaStatus], inflight: Mapping[str, int], *, now: float, max_age_s: float
                 ) -> ReplicaStatus | None:
    """The least-loaded replica: by the calls this ingress has open there, or by what the replica last reported
    (every ingress's requests) when that is fresh and higher; ties keep the first."""
    if len(replicas) < 2:
        return replicas[0] if replicas else None

    def load(r: ReplicaStatus) -> int:
        mine = inflight.get(r.address, 0)
        reported = r.load.ongoing if now - r.load.timestamp <= max_age_s else 0
        return max(mine, reported)

    return min(replicas, key=load)
