"""The OpenAI-compatible HTTP ingress (FastAPI under `@serve.ingress`)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from router.types import Exemplar
from serving.config import AppConfig
from serving.errors import EngineError, InvalidRequest, TierserveError, Unauthorized, to_envelope
from serving.ingress.pipeline import Outcome, Pipeline
from serving.ingress.protocol import (
    SEED_LABELS,
    AddExemplarsRequest,
    ReleaseStoreRequest,
    ChatCompletionRequest,
    CompletionRequest,
    response,
)
from serving.ingress.streaming import ChunkEncoder, encode_stream, sse
from serving.ingress.tiers import TierClient
from serving.metrics import Metrics
from serving.types import GenerationChunk, GenerationRequest

logger = logging.getLogger(__name__)

api = FastAPI(title="tierserve", description="OpenAI-compatible, tier-routing LLM gateway")


def error_response(exc: BaseException, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    status, body, headers = to_envelope(exc)
    if status >= 500:
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


async def _parse(request: Request, model: type, without_messages: type | None = None) -> Any:
    """Validate the JSON body as `model` (as `without_messages` when given and the body has no messages)."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.", param="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", param="body")
    if without_messages is not None and "messages" not in body:
        model = without_messages
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


@serve.ingress(api)
class Ingress:
    """Parses, authorizes and answers; the decisions live in `Pipeline`."""

    def __init__(
        self, config: AppConfig, tier_handles: dict[str, DeploymentHandle], router: DeploymentHandle | None = None
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self.tiers = TierClient(tier_handles, poll_interval_s=config.capacity.poll_interval_s)
        self.router = router
        self.pipeline = Pipeline(config, self.tiers, self.metrics, router)
        self.api_keys = config.api_keys()

    # ---- plumbing -----------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            raise Unauthorized(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )

    # ---- routes -------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Ready only when every tier's engine answers."""
        self.tiers.start_polling()
        infos = await asyncio.gather(*(self.tiers.info(name) for name in self.tiers.names))
        tiers = {name: bool(info and info.ready) for name, info in zip(self.tiers.names, infos, strict=True)}
        ready = all(tiers.values())
        return JSONResponse({"status": "ready" if ready else "starting", "tiers": tiers}, status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        self.tiers.start_polling()
        for tier, load in self.tiers.loads().items():
            self.metrics.engine_running.labels(tier).set(load.running)
            self.metrics.engine_waiting.labels(tier).set(load.waiting)
            self.metrics.engine_kv_usage.labels(tier).set(load.kv_cache_usage)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
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

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completion")

    @api.post("/v1/route")
    async def route(self, request: Request) -> JSONResponse:
        """The routing decision for a chat or completion request, without generating."""
        try:
            self._authorize(request)
            body = await _parse(request, ChatCompletionRequest, CompletionRequest)
            outcome = Outcome(plan=await self.pipeline.plan(body.model, body.routing_text(), body.options))
            return JSONResponse({"object": "tierserve.route", **outcome.meta()}, headers=outcome.headers())
        except Exception as exc:
            return error_response(exc)

    @api.post("/admin/exemplars")
    async def add_exemplars(self, request: Request) -> JSONResponse:
        """Add labelled exemplars at runtime: {"exemplars": [{"text": ..., "tier": ...}, ...]}."""
        try:
            self._authorize(request)
            body = await _parse(request, AddExemplarsRequest)
            unknown = sorted({e.tier for e in body.exemplars} - set(self.config.tier_names) - SEED_LABELS)
            if unknown:
                raise InvalidRequest(
                    f"exemplars name unknown tiers {unknown}; use one of {self.config.tier_names}.",
                    param="exemplars.tier",
                )
            if self.router is None:
                raise InvalidRequest("no router deployment is configured", param="model")
            exemplars = [Exemplar(text=e.text, tier=e.tier, source=e.source) for e in body.exemplars]
            written = await self.router.add_exemplars.remote(exemplars)
            total = await self.router.count.remote()
            return JSONResponse({"object": "tierserve.exemplars", "written": written, "count": total})
        except Exception as exc:
            return error_response(exc)

    @api.post("/admin/router/release-store")
    async def release_store(self, request: Request) -> JSONResponse:
        """Close the router's exemplar store for `seconds` (heuristic routing meanwhile), e.g. so that
        `tierserve exemplars import` can write to an embedded Qdrant folder while the stack serves."""
        try:
            self._authorize(request)
            body = await _parse(request, ReleaseStoreRequest)
            if self.router is None:
                raise InvalidRequest("no router deployment is configured", param="model")
            await self.router.release_store.remote(body.seconds)
            return JSONResponse({"object": "tierserve.store", "released_for_s": body.seconds})
        except Exception as exc:
            return error_response(exc)

    # ---- the request path -----------------------------------------------------------------------

    async def _complete(self, http: Request, kind: str) -> Response:
        started = time.perf_counter()
        self.tiers.start_polling()
        endpoint = "chat" if kind == "chat" else "completions"
        outcome: Outcome | None = None
        request_id = ""
        try:
            self._authorize(http)
            body = await _parse(http, ChatCompletionRequest if kind == "chat" else CompletionRequest)
            request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            gen_request = GenerationRequest(
                request_id=request_id,
                sampling=body.sampling(),
                messages=body.chat_messages() if kind == "chat" else None,
                prompt=body.prompt_text() if kind != "chat" else None,
            )
            plan = await self.pipeline.plan(body.model, body.routing_text(), body.options)
            outcome = Outcome(plan=plan)
            logprobs = gen_request.sampling.logprobs
            if body.stream:
                return await self._stream(endpoint, kind, body, gen_request, outcome, started)
            result = await self.pipeline.generate(gen_request, outcome, body.options)
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

    async def _stream(
        self, endpoint: str, kind: str, body: Any, gen_request: GenerationRequest, outcome: Outcome, started: float
    ) -> Response:
        chunks = await self.pipeline.stream(gen_request, outcome, body.options)
        # Pull the first chunk before answering so errors (context length, overload) get a real status.
        first = await anext(chunks, None)
        if first is None:
            raise EngineError(f"tier '{outcome.tier}' ended the stream without output")
        self.metrics.ttft.labels(outcome.tier).observe(time.perf_counter() - started)
        encoder = ChunkEncoder(
            kind=kind,
            request_id=gen_request.request_id,
            model=body.model,
            logprobs=gen_request.sampling.logprobs,
            include_usage=body.include_usage,
        )
        return StreamingResponse(
            self._sse(endpoint, first, chunks, encoder, outcome, started),
            media_type="text/event-stream",
            headers={**outcome.headers(), "Cache-Control": "no-cache"},
        )

    async def _sse(
        self,
        endpoint: str,
        first: GenerationChunk,
        rest: AsyncIterator[GenerationChunk],
        encoder: ChunkEncoder,
        outcome: Outcome,
        started: float,
    ) -> AsyncIterator[bytes]:
        last = first
        meta = outcome.meta()

        async def chained() -> AsyncIterator[GenerationChunk]:
            nonlocal last
            yield first
            async for chunk in rest:
                last = chunk
                yield chunk

        try:
            async for payload in encode_stream(chained(), encoder, meta):
                yield payload
            self.pipeline.record(endpoint, outcome, 200, started, last, request_id=encoder.request_id)
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.aborts.labels(outcome.tier).inc()
            self.pipeline.record(endpoint, outcome, 499, started, last, request_id=encoder.request_id)
            await rest.aclose()
            raise
        except Exception as exc:  # headers are gone: report in-band, then end the stream
            status, envelope, _ = to_envelope(exc)
            self.pipeline.record(endpoint, outcome, status, started, last, request_id=encoder.request_id)
            yield sse(envelope)
            yield sse("[DONE]")
