"""The HTTP layer: routes, a lean path for the completion endpoints, and the SSE response.

The two completion endpoints carry every token, so they skip FastAPI's routing and middleware stack
(four coroutine layers around every streamed chunk's `send`): `IngressApp` hands them straight to the
ingress and writes each relayed batch with one `send`. Everything else goes through FastAPI, which also
documents the completion endpoints in /openapi.json.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import Response

from serving.ingress.openapi import document

if TYPE_CHECKING:
    from serving.ingress.app import Ingress

T = TypeVar("T")

_COMPLETIONS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class IngressApp:
    """The ASGI app an ingress replica serves (directly, or behind Ray Serve's proxy)."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.fastapi = build_fastapi(ingress)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = _COMPLETIONS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.fastapi(scope, receive, send)
            return
        response = await self.ingress.complete(Request(scope, receive), kind)
        await response(scope, receive, send)


class SseResponse(Response):
    """A text/event-stream response that sends each body item as it comes, and stops (cancelling the
    body, which aborts the engine request) when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({**headers, "Cache-Control": "no-cache"})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if task is not None and not finished:
                gone.set()
                task.cancel()

        finished = False
        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for data in self.body_iterator:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            task.uncancel()  # the client left: a normal end for the server
        finally:
            finished = True
            watcher.cancel()
            await _aclose(self.body_iterator)


async def _aclose(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


async def unless_disconnected(http: Request, call: Awaitable[T]) -> T:
    """Await `call`, cancelling it (and so its engine request) if the client hangs up first."""
    task = asyncio.ensure_future(call)
    watch = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise asyncio.CancelledError("client disconnected")
    return task.result()


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


def build_fastapi(ingress: Ingress) -> FastAPI:
    """The routes, each a thin call into the ingress (the completion ones are served by `IngressApp`)."""
    api = FastAPI(title="tierserve", description="OpenAI-compatible, tier-routing LLM gateway")

    @api.get("/health")
    async def health() -> Response:
        """200 only when every tier's engine answers."""
        return await ingress.health()

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus metrics (open unless `http.metrics_auth`)."""
        return await ingress.render_metrics(request)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        return await ingress.models(request)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await ingress.complete(request, "chat")

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await ingress.complete(request, "completion")

    @api.post("/v1/route")
    async def route(request: Request) -> Response:
        """The routing decision for a chat or completion request, without generating."""
        return await ingress.route(request)

    @api.post("/admin/exemplars")
    async def add_exemplars(request: Request) -> Response:
        """Add labelled exemplars at runtime: {"exemplars": [{"text": ..., "tier": ...}, ...]}."""
        return await ingress.add_exemplars(request)

    @api.post("/admin/router/release-store")
    async def release_store(request: Request) -> Response:
        """Close the router's exemplar store for `seconds` (heuristic routing meanwhile)."""
        return await ingress.release_store(request)

    document(api)
    return api
