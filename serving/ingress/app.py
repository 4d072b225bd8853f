"""The OpenAI-compatible ingress: authorize, parse, plan, answer (HTTP routing lives in `serving.ingress.http`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import ray
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from router.errors import InvalidRequest, TierserveError
from router.types import Exemplar
from serving.channel.tiers import SseRelay, TierClient
from serving.config import AppConfig
from serving.cpu.affinity import parse_cpus, pin_this_process
from serving.ingress.auth import Keys, Scope
from serving.ingress.errors import PayloadTooLarge, RequestTimeout, to_envelope
from serving.ingress.http import IngressApp, SseResponse, unless_disconnected
from serving.ingress.openai import DONE, response, sse
from serving.ingress.outcome import Outcome
from serving.ingress.pipeline import Pipeline, StreamFormat
from serving.ingress.protocol import (
    SEED_LABELS,
    AddExemplarsRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ReleaseStoreRequest,
    check_limits,
)
from serving.ingress.router_calls import router_calls
from serving.ingress.server import DirectServer
from serving.ingress.sessions import SESSION_HEADER, SessionKey, session_key
from serving.metrics import Metrics
from serving.types import ChatMessage, GenerationRequest

logger = logging.getLogger(__name__)


def _timeout_error() -> RequestTimeout:
    return RequestTimeout(
        "The request ran past http.request_timeout_s and was stopped; raise that setting or ask for fewer "
        "tokens (max_tokens).", param="max_tokens", code="timeout",
    )


@asynccontextmanager
async def _deadline(when: float) -> AsyncIterator[None]:
    """`http.request_timeout_s`, as a 504 naming the setting (the cancelled call aborts its engine work)."""
    try:
        async with asyncio.timeout_at(when):
            yield
    except TimeoutError:
        raise _timeout_error() from None


def error_response(exc: BaseException, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    status, body, headers = to_envelope(exc)
    if status in (503, 504):  # overload, a lost replica, a timeout: expected, counted in the metrics
        logger.debug("request answered %d: %s", status, body["error"]["message"])
    elif status >= 500:
        logger.exception("request failed", exc_info=exc)
    return JSONResponse(body, status_code=status, headers={**headers, **(extra_headers or {})})


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
    return InvalidRequest(f"Invalid request: {problems}", param=param)


async def _parse(request: Request, model: type, without_messages: type | None = None, *, limit: int) -> Any:
    """Validate the JSON body as `model` (as `without_messages` when given and the body has no messages);
    a body over `limit` bytes is refused (413) before it is read in full."""
    try:
        body = json.loads(await _read_body(request, limit))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.", param="body") from None
    except RecursionError:
        raise InvalidRequest("The request body nests arrays or objects too deeply.", param="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", param="body")
    if without_messages is not None and "messages" not in body:
        model = without_messages
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is {size:,} bytes or more; the limit is {limit:,} (http.limits.max_body_bytes).",
        param="body", code="body_too_large",
    )


def _session(request: Request, body: ChatCompletionRequest | CompletionRequest,
             messages: tuple[ChatMessage, ...] | None) -> SessionKey | None:
    """The conversation this request continues: the session header, else derived from a chat's messages."""
    return session_key(request.headers.get(SESSION_HEADER), body.user, messages)


@serve.ingress()
class Ingress:
    """Parses, authorizes and answers; the decisions live in `Pipeline`.

    With `http.proxy: false` (the default) each ingress replica serves `http.host:port` itself
    (`serving.ingress.server`, SO_REUSEPORT across replicas on a node), as bare vLLM's server does; with
    `http.proxy: true` Ray Serve's HTTP proxy serves it and forwards every request and chunk here.
    """

    async def __init__(
        self,
        config: AppConfig,
        tier_handles: dict[str, DeploymentHandle],
        router: DeploymentHandle | None = None,
        *,
        wire_token: str,
    ) -> None:
        self.config = config
        if config.device == "cpu" and config.ingress.cpu_affinity:
            pin_this_process(parse_cpus(config.ingress.cpu_affinity), "ingress")
        self.metrics = Metrics()
        self.tiers = TierClient(tier_handles, wire_token=wire_token, poll_interval_s=config.capacity.poll_interval_s,
                                node_ip=ray.util.get_node_ip_address())
        self.router = router_calls(config, router)
        self.pipeline = Pipeline(config, self.tiers, self.metrics, self.router)
        self.keys = Keys(config.api_keys(), config.admin_keys())
        self.http_app = IngressApp(self)
        self.server: DirectServer | None = None
        if not config.http.proxy:
            self.server = await DirectServer.start(self.http_app, config.http.host, config.http.port,
                                                   timeout_keep_alive_s=config.http.keep_alive_s)
        self.tiers.start_polling()

    def __serve_build_asgi_app__(self) -> IngressApp:
        """The app Ray Serve's proxy forwards to (with `http.proxy: true`); the same one served directly."""
        return self.http_app

    async def __del__(self) -> None:
        server = getattr(self, "server", None)  # absent when __init__ failed
        if server is not None:
            await server.stop(self.config.http.drain_s)
        close = getattr(getattr(self, "router", None), "close", None)  # an in-process router holds the store's folder lock
        if close is not None:
            close()

    # ---- plumbing -----------------------------------------------------------------------------

    def _authorize(self, request: Request, scope: Scope = Scope.DATA) -> None:
        self.keys.check(request.headers.get("authorization"), scope)

    # ---- routes -------------------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        """Ready only when every tier's engine answers."""
        infos = await asyncio.gather(*(self.tiers.info(name) for name in self.tiers.names))
        tiers = {name: bool(info and info.ready) for name, info in zip(self.tiers.names, infos, strict=True)}
        ready = all(tiers.values())
        return JSONResponse({"status": "ready" if ready else "starting", "tiers": tiers}, status_code=200 if ready else 503)

    async def render_metrics(self, request: Request) -> Response:
        if self.config.http.metrics_auth:
            try:
                self._authorize(request)
            except TierserveError as exc:
                return error_response(exc)
        for tier, load in self.tiers.loads().items():
            self.metrics.engine_running.labels(tier).set(load.running)
            self.metrics.engine_waiting.labels(tier).set(load.waiting)
            self.metrics.engine_kv_usage.labels(tier).set(load.kv_cache_usage)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
        except TierserveError as exc:
            return error_response(exc)
        created = int(time.time())
        data = [{"id": "auto", "object": "model", "created": created, "owned_by": "tierserve"}]
        for t in self.config.tiers:
            data.append(
                {
                    "id": t.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "tierserve",
                    "root": self.config.model_path(t).as_posix(),
                    "max_model_len": t.engine.max_model_len,
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def route(self, request: Request) -> JSONResponse:
        """The routing decision for a chat or completion request, without generating."""
        try:
            self._authorize(request)
            body = await _parse(request, ChatCompletionRequest, CompletionRequest,
                                limit=self.config.http.limits.max_body_bytes)
            check_limits(body, self.config.http.limits)
            messages = body.chat_messages() if isinstance(body, ChatCompletionRequest) else None
            plan = await self.pipeline.plan(body.model, body.routing_text(), body.options,
                                            _session(request, body, messages))
            outcome = Outcome.unmoved(plan)
            return JSONResponse({"object": "tierserve.route", **outcome.meta()}, headers=outcome.headers())
        except Exception as exc:
            return error_response(exc)

    async def add_exemplars(self, request: Request) -> JSONResponse:
        """Add labelled exemplars at runtime: {"exemplars": [{"text": ..., "tier": ...}, ...]}."""
        try:
            self._authorize(request, Scope.ADMIN)
            body = await _parse(request, AddExemplarsRequest, limit=self.config.http.limits.max_body_bytes)
            unknown = sorted({e.tier for e in body.exemplars} - set(self.config.tier_names) - SEED_LABELS)
            if unknown:
                raise InvalidRequest(
                    f"exemplars name unknown tiers {unknown}; use one of {self.config.tier_names}.",
                    param="exemplars.tier",
                )
            if self.router is None:
                raise InvalidRequest("no router deployment is configured", param="model")
            exemplars = [Exemplar(text=e.text, tier=e.tier, source=e.source) for e in body.exemplars]
            written = await self.router.add_exemplars(exemplars)
            total = await self.router.count()
            return JSONResponse({"object": "tierserve.exemplars", "written": written, "count": total})
        except Exception as exc:
            return error_response(exc)

    async def release_store(self, request: Request) -> JSONResponse:
        """Close the router's exemplar store for `seconds` (heuristic routing meanwhile), e.g. so that
        `tierserve exemplars import` can write to an embedded Qdrant folder while the stack serves."""
        try:
            self._authorize(request, Scope.ADMIN)
            body = await _parse(request, ReleaseStoreRequest, limit=self.config.http.limits.max_body_bytes)
            if self.router is None:
                raise InvalidRequest("no router deployment is configured", param="model")
            await self.router.release_store(body.seconds)
            return JSONResponse({"object": "tierserve.store", "released_for_s": body.seconds})
        except Exception as exc:
            return error_response(exc)

    # ---- the request path -----------------------------------------------------------------------

    async def complete(self, http: Request, kind: str) -> Response:
        started = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        outcome: Outcome | None = None
        request_id = ""
        try:
            self._authorize(http)
            body = await _parse(http, ChatCompletionRequest if kind == "chat" else CompletionRequest,
                                limit=self.config.http.limits.max_body_bytes)
            check_limits(body, self.config.http.limits)
            request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            gen_request = GenerationRequest(
                request_id=request_id,
                sampling=body.sampling(),
                messages=body.chat_messages() if kind == "chat" else None,
                prompt=body.prompt_text() if kind != "chat" else None,
            )
            decision = await self.pipeline.plan(body.model, body.routing_text(), body.options,
                                                _session(http, body, gen_request.messages))
            outcome = self.pipeline.place(decision)
            logprobs = gen_request.sampling.logprobs
            deadline = asyncio.get_running_loop().time() + self.config.http.request_timeout_s
            if body.stream:
                fmt = StreamFormat(kind=kind, model=body.model, include_usage=body.include_usage)
                stream = self.pipeline.stream(gen_request, outcome, body.options, fmt)
                try:
                    async with _deadline(deadline):
                        relay = await stream.start()
                finally:
                    outcome = stream.outcome()  # a cascade has decided by its first event (or failed)
                first_at = time.perf_counter()
                self.metrics.ttft.labels(outcome.tier).observe(first_at - started)
                body_bytes = self._sse(endpoint, relay, stream.outcome, started, request_id, deadline, first_at)
                return SseResponse(body_bytes, outcome.headers())
            async with _deadline(deadline):
                result, outcome = await unless_disconnected(
                    http, self.pipeline.generate(gen_request, outcome, body.options)
                )
            payload = response(kind, request_id, body.model, result, logprobs, outcome.meta())
            self.pipeline.record(
                endpoint, outcome, 200, started, result, request_id=request_id, routing_text=body.routing_text()
            )
            return JSONResponse(payload, headers=outcome.headers())
        except asyncio.CancelledError:  # the client went away; the tier call was cancelled with us
            if outcome is not None:
                self.metrics.aborts.labels(outcome.tier).inc()
                self.pipeline.record(endpoint, outcome, 499, started, request_id=request_id)
            raise
        except Exception as exc:
            status, _, _ = to_envelope(exc)
            if outcome is not None:
                self.pipeline.record(endpoint, outcome, status, started, request_id=request_id)
            else:
                self.metrics.requests.labels(endpoint, "none", str(status)).inc()
            return error_response(exc, outcome.headers() if outcome else None)

    async def _sse(
        self, endpoint: str, relay: SseRelay, outcome: Callable[[], Outcome], started: float, request_id: str,
        deadline: float, first_at: float,
    ) -> AsyncIterator[bytes]:
        # One timer per stream for http.request_timeout_s (not a timeout context per chunk: 5 us each).
        task = asyncio.current_task()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if task is not None:
                task.cancel()

        timer = asyncio.get_running_loop().call_at(deadline, expire)
        try:
            yield relay.first
            async for data in relay:
                yield data
            tokens = relay.summary.completion_tokens if relay.summary else 0
            if tokens > 1:
                self.metrics.tpot.labels(outcome().tier).observe((time.perf_counter() - first_at) / (tokens - 1))
            self.pipeline.record(endpoint, outcome(), 200, started, relay.summary, request_id=request_id)
        except asyncio.CancelledError:
            if not expired or task is None:
                self.metrics.aborts.labels(outcome().tier).inc()
                self.pipeline.record(endpoint, outcome(), 499, started, relay.summary, request_id=request_id)
                raise
            task.uncancel()  # our own deadline: end the stream with the error, in-band
            await relay.aclose()
            async for event in self._stream_error(endpoint, outcome(), started, relay, request_id, _timeout_error()):
                yield event
        except GeneratorExit:
            self.metrics.aborts.labels(outcome().tier).inc()
            self.pipeline.record(endpoint, outcome(), 499, started, relay.summary, request_id=request_id)
            raise
        except Exception as exc:  # headers are gone: report in-band, then end the stream
            async for event in self._stream_error(endpoint, outcome(), started, relay, request_id, exc):
                yield event
        finally:
            timer.cancel()
            await relay.aclose()

    async def _stream_error(
        self, endpoint: str, outcome: Outcome, started: float, relay: SseRelay, request_id: str, exc: BaseException
    ) -> AsyncIterator[bytes]:
        status, envelope, _ = to_envelope(exc)
        self.pipeline.record(endpoint, outcome, status, started, relay.summary, request_id=request_id)
        yield sse(envelope)
        yield DONE
