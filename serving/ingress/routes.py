"""Every endpoint but the two completion ones: health, metrics, models, the routing decision alone, and the
admin endpoints. FastAPI routes them (and documents all of them, completions included, in /openapi.json)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from router.errors import InvalidRequest
from router.types import Exemplar
from serving.channel.channel import TierChannel
from serving.config import AppConfig
from serving.ingress.errors import Forbidden, Unauthorized, error_response
from serving.ingress.learning import Learning, feedback_refusal
from serving.ingress.openai import headers, tierserve_object
from serving.ingress.openapi import document
from serving.ingress.plan import Planner
from serving.ingress.protocol import (
    SEED_LABELS,
    AddExemplarsRequest,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    Keys,
    ReleaseStoreRequest,
    RollbackRequest,
    Scope,
    check_limits,
    parse,
)
from serving.ingress.router_calls import RouterCalls
from serving.ingress.sessions import SESSION_HEADER, session_key
from serving.metrics import Metrics


class Parts(Protocol):
    """What the endpoints use of the ingress replica."""

    config: AppConfig
    keys: Keys
    channel: TierChannel
    planner: Planner
    router: RouterCalls | None
    metrics: Metrics
    learning: Learning | None


def ingress_mode() -> str:
    """`haproxy`: Ray Serve's HAProxy in front of each ingress replica's own HTTP server (the one mode tierserve
    sets up); `serve-proxy`: Ray Serve's Python proxy, on a cluster started without RAY_SERVE_ENABLE_HA_PROXY=1."""
    from ray.serve._private import constants

    return "haproxy" if constants.RAY_SERVE_ENABLE_HA_PROXY else "serve-proxy"


def build_routes(parts: Parts) -> FastAPI:
    """The FastAPI app for the endpoints above, each a thin function over the ingress's parts."""
    api = FastAPI(title="tierserve", description="OpenAI-compatible, tier-routing LLM gateway")
    config, keys, limit = parts.config, parts.keys, parts.config.http.limits.max_body_bytes

    @api.get("/health")
    async def health() -> Response:
        """200 only when every tier's engine answers; `ingress` says what serves the port."""
        names = parts.channel.names
        infos = await asyncio.gather(*(parts.channel.info(name) for name in names))
        tiers = {name: bool(info and info.ready) for name, info in zip(names, infos, strict=True)}
        ready = all(tiers.values())
        return JSONResponse({"status": "ready" if ready else "starting", "tiers": tiers, "ingress": ingress_mode()},
                            status_code=200 if ready else 503)

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (open unless `http.metrics_auth`)."""
        if config.http.metrics_auth:
            try:
                keys.check(request.headers.get("authorization"), Scope.DATA)
            except Exception as exc:  # noqa: BLE001 - the key's error, as an envelope
                return error_response(exc)
        m = parts.metrics
        for tier, load in parts.channel.loads().items():
            m.engine_running.labels(tier).set(load.running)
            m.engine_waiting.labels(tier).set(load.waiting)
            m.engine_kv_usage.labels(tier).set(load.kv_cache_usage)
        for tier, count in parts.channel.inflight.items():
            m.inflight.labels(tier).set(count)
        return Response(m.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            keys.check(request.headers.get("authorization"), Scope.DATA)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)
        created = int(time.time())
        data = [{"id": "auto", "object": "model", "created": created, "owned_by": "tierserve"}]
        data += [{"id": t.name, "object": "model", "created": created, "owned_by": "tierserve",
                  "root": config.model_path(t).as_posix(), "max_model_len": t.engine.max_model_len}
                 for t in config.tiers]
        return JSONResponse({"object": "list", "data": data})

    @api.post("/v1/route")
    async def route(request: Request) -> Response:
        """The routing decision for a chat or completion request, without generating."""
        try:
            keys.check(request.headers.get("authorization"), Scope.DATA)
            body = await parse(request, ChatCompletionRequest, CompletionRequest, limit=limit)
            check_limits(body, config.http.limits)
            messages = body.chat_messages() if isinstance(body, ChatCompletionRequest) else None
            session = session_key(request.headers.get(SESSION_HEADER), body.user, messages)
            placed = await parts.planner.plan(body.model, body.routing_text(), body.options, session)
            return JSONResponse({"object": "tierserve.route", **tierserve_object(placed)}, headers=headers(placed))
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    @api.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        """A client's score of an answer its key got (`router.learn`): a good one teaches the router that such
        requests belong on the tier that answered, a bad one that they need the tier above."""
        try:
            key = keys.check(request.headers.get("authorization"), Scope.DATA)
            if not keys.enabled:
                raise Unauthorized("POST /v1/feedback needs an API key: only the key that got an answer may score "
                                   "it. Configure http.api_keys (or TIERSERVE_API_KEYS) and send one as "
                                   "'Authorization: Bearer <key>'.", code="invalid_api_key")
            body = await parse(request, FeedbackRequest, limit=limit)
            if parts.learning is None or not config.router.learn.enabled:
                raise Forbidden("Feedback is off on this stack: router.learn.enabled is false"
                                + (" and no router runs (router.default_router: cheapest)"
                                   if parts.router is None else "") + ", so scores are not learned from.",
                                code="learning_disabled")
            result = await parts.learning.feedback(body.response_id, body.score, key)
            refusal = feedback_refusal(result.verdict, body.response_id)
            if refusal is not None:
                raise refusal
            return JSONResponse({"object": "tierserve.feedback", "response_id": body.response_id,
                                 "verdict": result.verdict, "learned": result.learned,
                                 "label": result.exemplar.tier if result.exemplar else None})
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    @api.get("/admin/exemplars")
    async def list_exemplars(request: Request) -> Response:
        """Exemplars the router serves from, with their provenance: `?source=learned` (what it learned from
        traffic), `&limit=` (100 by default, at most 1,000)."""
        try:
            keys.check(request.headers.get("authorization"), Scope.ADMIN)
            router = _router(parts)
            source, limit_ = request.query_params.get("source"), request.query_params.get("limit", "100")
            if not limit_.isdigit() or not 1 <= int(limit_) <= 1000:
                raise InvalidRequest(f"limit must be a whole number from 1 to 1000, got {limit_!r}.", param="limit")
            items = await router.exemplars(source=source or None, limit=int(limit_))
            return JSONResponse({"object": "list", "data": [
                {"id": item.id, "version": item.version, **asdict(item.exemplar)} for item in items]})
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    @api.get("/admin/exemplars/versions")
    async def versions(request: Request) -> Response:
        """The exemplar store's versions, oldest first, and the one served (`tierserve exemplars versions`)."""
        try:
            keys.check(request.headers.get("authorization"), Scope.ADMIN)
            router = _router(parts)
            listed, active = await asyncio.gather(router.versions(), router.active_version())
            return JSONResponse({"object": "list", "active": active, "data": [asdict(v) for v in listed]})
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    @api.post("/admin/exemplars/rollback")
    async def rollback(request: Request) -> Response:
        """Serve what an older store version held, as a new version: no restart, and decisions in flight finish
        on the old exemplars (`tierserve exemplars rollback V`)."""
        try:
            keys.check(request.headers.get("authorization"), Scope.ADMIN)
            body = await parse(request, RollbackRequest, limit=limit)
            record = await _router(parts).rollback(body.version)
            parts.planner.exemplars_changed()
            return JSONResponse({"object": "tierserve.store_version", **asdict(record)})
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    @api.post("/admin/exemplars")
    async def add_exemplars(request: Request) -> Response:
        """Add labelled exemplars at runtime: {"exemplars": [{"text": ..., "tier": ...}, ...]}."""
        try:
            keys.check(request.headers.get("authorization"), Scope.ADMIN)
            body = await parse(request, AddExemplarsRequest, limit=limit)
            unknown = sorted({e.tier for e in body.exemplars} - set(config.tier_names) - SEED_LABELS)
            if unknown:
                raise InvalidRequest(f"exemplars name unknown tiers {unknown}; use one of {config.tier_names}.",
                                     param="exemplars.tier")
            if parts.router is None:
                raise InvalidRequest("no router deployment is configured", param="model")
            written = await parts.router.add_exemplars([Exemplar(text=e.text, tier=e.tier, source=e.source)
                                                        for e in body.exemplars])
            parts.planner.exemplars_changed()
            return JSONResponse({"object": "tierserve.exemplars", "written": written,
                                 "count": await parts.router.count()})
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    @api.post("/admin/router/release-store")
    async def release_store(request: Request) -> Response:
        """Close the router's exemplar store for `seconds` (heuristic routing meanwhile), e.g. so that
        `tierserve exemplars import` can write to an embedded Qdrant folder while the stack serves."""
        try:
            keys.check(request.headers.get("authorization"), Scope.ADMIN)
            body = await parse(request, ReleaseStoreRequest, limit=limit)
            if parts.router is None:
                raise InvalidRequest("no router deployment is configured", param="model")
            await parts.router.release_store(body.seconds)
            return JSONResponse({"object": "tierserve.store", "released_for_s": body.seconds})
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)

    document(api)
    return api


def _router(parts: Parts) -> RouterCalls:
    if parts.router is None:
        raise InvalidRequest("no router deployment is configured (router.default_router: cheapest)", param="model")
    return parts.router
