"""The OpenAI-compatible ingress: Ray Serve's HTTP ingress hands it every request; a completion reads

    key = self.keys.check(...)                                  # serving.ingress.protocol
    body = await parse(http, ChatCompletionRequest, ...)         # serving.ingress.protocol
    outcome = await self.planner.plan(...)                      # serving.ingress.plan: named tier, router (with
                                                                #   router.shadow's decision beside), session, load
    outcome = self.planner.explore(...)                         # router.learn: a share tries the cheapest tier
    call = await self.channel.open(outcome.entry_tier, request)  # serving.channel: admission, replica, wire
        (a cascade instead: self.cascade.stream / .run)          # serving.cascade.runner, over the channel
    SseResponse / JSONResponse                                   # serving.ingress.openai
    self.recorder.record(...)                                   # `Recorder` below: metrics, session, query log,
                                                                #   the router's learner told (fire and forget)

Every other endpoint is in `serving.ingress.routes`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.cascade import CascadePolicy
from serving.cascade.runner import CascadeRunner, CascadeStream
from serving.channel.channel import TierCall, TierChannel
from serving.channel.errors import Overloaded
from serving.config import AppConfig
from serving.engines.base import EngineError
from serving.ingress.errors import RequestTimeout, error_response, to_envelope
from serving.ingress.learning import Learning, Ticket
from serving.ingress.openai import (
    Kind,
    SseEncoder,
    SseResponse,
    headers,
    response,
    sse,
    tierserve_object,
)
from serving.ingress.plan import Outcome, Planner, router_label
from serving.ingress.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Keys,
    Scope,
    check_limits,
    parse,
)
from serving.ingress.router_calls import RouterCalls, router_calls
from serving.ingress.routes import build_routes
from serving.ingress.sessions import (
    SESSION_HEADER,
    SessionKey,
    SessionStore,
    session_key,
    tier_to_remember,
)
from serving.metrics import Metrics
from serving.querylog import QueryLog, QueryRecord
from serving.querylog.log import status_word
from serving.types import GenerationChunk, GenerationRequest

_COMPLETIONS: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


def _timeout_error() -> RequestTimeout:
    return RequestTimeout("The request ran past http.request_timeout_s and was stopped; raise that setting or ask "
                          "for fewer tokens (max_tokens).", param="max_tokens", code="timeout")


@asynccontextmanager
async def _deadline(when: float) -> AsyncIterator[None]:
    """`http.request_timeout_s`, as a 504 naming the setting (the cancelled call aborts its engine work)."""
    try:
        async with asyncio.timeout_at(when):
            yield
    except TimeoutError:
        raise _timeout_error() from None


@serve.ingress()
class Ingress:
    """One ingress replica: parses, authorizes and answers; the decisions live in `Planner`, the calls in
    `TierChannel`. Ray Serve's ingress (HAProxy in front of each replica's own HTTP port) serves it."""

    async def __init__(self, config: AppConfig, tier_handles: dict[str, DeploymentHandle],
                       router: DeploymentHandle | None = None, *, wire_token: str) -> None:
        if config.device == "cpu" and config.ingress.cpu_affinity:
            from serving.config.cores import parse_cpus
            from serving.cpu import (
                pin_this_process,  # CPU-only placement; the GPU path never imports it
            )

            pin_this_process(parse_cpus(config.ingress.cpu_affinity), "ingress")
        channel = TierChannel(config.tier_names, config.capacity, token=wire_token, handles=tier_handles,
                              node_ip=ray.util.get_node_ip_address())
        self.assemble(config, channel, router_calls(config, router))
        self.channel.start(config.capacity.poll_interval_s)

    def assemble(self, config: AppConfig, channel: TierChannel, router: RouterCalls | None) -> None:
        """The replica's parts around its channel and router (tests assemble them without Ray, the same way)."""
        self.config = config
        self.metrics = Metrics()
        self.keys = Keys(config.api_keys(), config.admin_keys())
        self.channel = channel
        self.router = router
        self.sessions = (SessionStore(config.sessions.ttl_s, config.sessions.max_entries)
                         if config.sessions.enabled else None)
        self.planner = Planner(config, self.channel, self.metrics, self.router, self.sessions)
        self.cascade = CascadeRunner(config.tier_names, self.channel)
        self.learning = Learning.build(config, self.router, self.metrics)
        self.recorder = Recorder(config, self.metrics, self.sessions, self.learning)
        self.routes = build_routes(self)

    def __serve_build_asgi_app__(self) -> _Asgi:
        return _Asgi(self)

    async def __del__(self) -> None:
        self.channel.close()
        self.recorder.close()
        if self.learning is not None:
            self.learning.close()
        close = getattr(self.router, "close", None)  # an in-process router holds the store's folder lock
        if close is not None:
            close()

    # ---- a completion, top to bottom ------------------------------------------------------------------

    async def complete(self, http: Request, kind: Kind) -> Response:
        started = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        outcome: Outcome | None = None
        ticket = Ticket("", endpoint, started)
        try:
            key = self.keys.check(http.headers.get("authorization"), Scope.DATA)
            body = await parse(http, ChatCompletionRequest if kind == "chat" else CompletionRequest,
                               limit=self.config.http.limits.max_body_bytes)
            check_limits(body, self.config.http.limits)
            request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            text = body.routing_text()
            ticket = Ticket(request_id, endpoint, started, text, key if self.keys.enabled else None)
            request = GenerationRequest(
                request_id=request_id, sampling=body.sampling(),
                messages=body.chat_messages() if kind == "chat" else None,
                prompt=body.prompt_text() if kind != "chat" else None,
            )
            outcome = await self.planner.plan(body.model, text, body.options, self._session(http, body, request),
                                              request_id)
            policy = self.planner.cascade(outcome, body.options)
            outcome = self.planner.explore(outcome, policy, request_id, ticket.key_id)
            deadline = asyncio.get_running_loop().time() + self.config.http.request_timeout_s
            if body.stream:
                encoder = SseEncoder(kind=kind, request_id=request_id, model=body.model,
                                     logprobs=request.sampling.logprobs, include_usage=body.include_usage)
                return await self._stream(request, outcome, policy, encoder, ticket, deadline)
            async with _deadline(deadline):
                if policy is None:
                    result, _ = await self.channel.complete(outcome.entry_tier, request)
                else:
                    result, trace = await self.cascade.run(request, policy, self._index(outcome))
                    outcome = replace(outcome, trace=trace, cascade_thresholds=policy.thresholds)
            self.recorder.record(ticket, outcome, 200, result.prompt_tokens, result.completion_tokens)
            payload = response(kind, request_id, body.model, result, request.sampling.logprobs,
                               tierserve_object(outcome))
            return JSONResponse(payload, headers=headers(outcome))
        except asyncio.CancelledError:  # the client went away; the tier call was cancelled with us
            if outcome is not None:
                self.metrics.aborts.labels(outcome.tier).inc()
                self.recorder.record(ticket, outcome, 499)
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes OpenAI's envelope
            status = to_envelope(exc)[0]
            if outcome is not None:
                if isinstance(exc, Overloaded) and exc.code == "overloaded":
                    self.metrics.rejections.labels(outcome.entry_tier, str(status)).inc()
                self.recorder.record(ticket, outcome, status)
            else:
                self.metrics.requests.labels(endpoint, "none", str(status)).inc()
            return error_response(exc, headers(outcome) if outcome else None)

    async def _stream(self, request: GenerationRequest, outcome: Outcome, policy: CascadePolicy | None,
                      encoder: SseEncoder, ticket: Ticket, deadline: float) -> Response:
        """Open the answer and read its first batch, so an error still gets a real status (recorded with what a
        cascade did before it: an escalation the tier above refused, say); then stream the rest as SSE."""
        answer: TierCall | CascadeStream | None = None
        try:
            async with _deadline(deadline):
                if policy is None:
                    answer = await self.channel.open(outcome.entry_tier, request)
                else:
                    answer = self.cascade.stream(request, policy, self._index(outcome))
                    outcome = replace(outcome, cascade_thresholds=policy.thresholds)
                first = await anext(aiter(answer), None)
                if first is None:
                    raise EngineError("the tier ended the stream without output")
        except Exception as exc:  # noqa: BLE001 - before the headers: a real status
            if answer is not None:
                await answer.aclose()
                outcome = _with_trace(outcome, answer)
            status = to_envelope(exc)[0]
            if isinstance(exc, Overloaded) and exc.code == "overloaded":
                self.metrics.rejections.labels(outcome.tier, str(status)).inc()
            self.recorder.record(ticket, outcome, status)
            return error_response(exc, headers(outcome))
        except BaseException:
            if answer is not None:
                await answer.aclose()
            raise
        outcome = _with_trace(outcome, answer)  # a cascade has decided by its first batch
        first_at = time.perf_counter()
        self.metrics.ttft.labels(outcome.tier).observe(first_at - ticket.started)
        body = self._sse(answer, first, outcome, encoder, ticket, first_at, deadline)
        return SseResponse(body, headers(outcome))

    async def _sse(self, answer: TierCall | CascadeStream, first: list[GenerationChunk], outcome: Outcome,
                   encoder: SseEncoder, ticket: Ticket, first_at: float, deadline: float) -> AsyncIterator[bytes]:
        # One timer per stream for http.request_timeout_s (not a timeout context per batch).
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if task is not None:
                task.cancel()

        timer = asyncio.get_running_loop().call_at(deadline, expire)
        meta = tierserve_object(outcome)
        end = None
        try:
            yield encoder.batch(first, meta)
            async for batch in answer:
                yield encoder.batch(batch, meta)
            outcome, end = _with_trace(outcome, answer), answer.end
            tokens = end.completion_tokens if end else 0
            yield encoder.tail(end.prompt_tokens if end else 0, tokens, tierserve_object(outcome))
            if tokens > 1:
                self.metrics.tpot.labels(outcome.tier).observe((time.perf_counter() - first_at) / (tokens - 1))
            self.recorder.record(ticket, outcome, 200, end.prompt_tokens if end else 0, tokens)
        except (asyncio.CancelledError, GeneratorExit):
            if not expired or task is None:  # the client went away
                self.metrics.aborts.labels(outcome.tier).inc()
                self.recorder.record(ticket, _with_trace(outcome, answer), 499)
                raise
            task.uncancel()  # our own deadline: end the stream with the error, in-band
            await answer.aclose()
            yield self._stream_error(ticket, _with_trace(outcome, answer), _timeout_error())
        except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band, then end the stream
            yield self._stream_error(ticket, _with_trace(outcome, answer), exc)
        finally:
            timer.cancel()
            await answer.aclose()

    def _stream_error(self, ticket: Ticket, outcome: Outcome, exc: BaseException) -> bytes:
        status, envelope, _ = to_envelope(exc)
        self.recorder.record(ticket, outcome, status)
        return sse(envelope) + sse("[DONE]")

    def _session(self, http: Request, body: ChatCompletionRequest | CompletionRequest,
                 request: GenerationRequest) -> SessionKey | None:
        """The conversation a routed request continues (the session header, else derived from its messages)."""
        if self.sessions is None or body.model in self.planner.tier_names:
            return None
        return session_key(http.headers.get(SESSION_HEADER), body.user, request.messages)

    def _index(self, outcome: Outcome) -> int:
        return self.planner.tier_names.index(outcome.entry_tier)


class _Asgi:
    """The ASGI app Ray Serve's ingress serves. The completion endpoints carry every token, so they skip
    FastAPI's routing and middleware (coroutine layers around every chunk's `send`); the rest is FastAPI's."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = _COMPLETIONS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.ingress.routes(scope, receive, send)
            return
        answer = await self.ingress.complete(Request(scope, receive), kind)
        await answer(scope, receive, send)


class Recorder:
    """Records finished requests into the ingress replica's metrics, session map and query log, and tells the
    router's learner about the answered ones (`serving.ingress.learning`, off the request's path)."""

    def __init__(self, config: AppConfig, metrics: Metrics, sessions: SessionStore | None,
                 learning: Learning | None = None) -> None:
        self.tier_names = list(config.tier_names)
        self.metrics = metrics
        self.sessions = sessions
        self.learning = learning
        self.query_log = (QueryLog.from_config(config.query_log, config.resolved_data_dir())
                          if config.query_log.enabled else None)
        self.shadow_label = config.router.shadow.label
        for tier in config.tier_names[:-1]:  # the drift alert compares escalations with the calibrated target
            target = config.cascade.target_rate_for(tier)
            if target is not None:
                metrics.cascade_escalation_target.labels(tier).set(target)
            floor = config.cascade.floor_rate_for(tier)  # ... and with the floor its quality bound needs
            if floor is not None:
                metrics.cascade_escalation_floor.labels(tier).set(floor)

    def close(self) -> None:
        if self.query_log is not None:
            self.query_log.close()

    def record(self, ticket: Ticket, outcome: Outcome, status: int, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
        """Metrics, the session's tier, the learner and the query log for one finished request (any status)."""
        tier, decision, trace = outcome.tier, outcome.decision, outcome.trace
        if status == 200 and decision.session is not None and self.sessions is not None:
            self.sessions.put(decision.session, tier_to_remember(  # exploring, like load, is about this turn only
                decision.tier, tier, escalated=outcome.escalated,
                moved_by_load=outcome.capacity is not None or outcome.explored))
        if trace is not None:
            names = self.tier_names
            for a in trace.attempts:
                if a.confidence is not None:  # the cascade scored this answer and decided
                    self.metrics.cascade_decisions.labels(a.tier, "escalated" if a.escalated else "kept").inc()
                if a.escalated:  # counted when decided, as its wasted tokens are (the next answer may never come)
                    self.metrics.escalations.labels(a.tier, names[names.index(a.tier) + 1]).inc()
            for wasted_tier, wasted in trace.wasted_tokens().items():
                self.metrics.wasted_tokens.labels(wasted_tier).inc(wasted)
        latency_s = time.perf_counter() - ticket.started
        self.metrics.requests.labels(ticket.endpoint, tier, str(status)).inc()
        self.metrics.latency.labels(ticket.endpoint, tier).observe(latency_s)
        if prompt_tokens or completion_tokens:
            self.metrics.tokens.labels(tier, "prompt").inc(prompt_tokens)
            self.metrics.tokens.labels(tier, "completion").inc(completion_tokens)
        if status == 200 and self.learning is not None:
            self.learning.observe(ticket, outcome)
        if self.query_log is None:
            return
        shadow = decision.shadow if outcome.routed else None
        record = QueryRecord(
            request_id=ticket.request_id, router=router_label(decision) if outcome.routed else "none", tier=tier,
            score=decision.score, threshold=decision.thresholds[-1] if decision.thresholds else None,
            tier_chain=outcome.tier_chain, escalated=outcome.escalated, confidences=outcome.confidences,
            cascade_thresholds=outcome.scored_thresholds(self.tier_names), latency_ms=latency_s * 1000,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, status=status_word(status),
            prompt=ticket.routing_text, routed_tier=decision.tier if outcome.routed else None,
            explored=outcome.explored, shadow_router=self.shadow_label if shadow else None,
            shadow_tier=shadow.tier if shadow else None, shadow_score=shadow.score if shadow else None,
        )
        self.query_log.append(record)


def _with_trace(outcome: Outcome, answer: TierCall | CascadeStream) -> Outcome:
    """The outcome as the cascade has told it so far (a plain call has no trace)."""
    if isinstance(answer, CascadeStream) and answer.trace.attempts:
        return replace(outcome, trace=answer.trace)
    return outcome
