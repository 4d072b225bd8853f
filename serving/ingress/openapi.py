"""The published OpenAPI schema: request and response models for every endpoint.

The handlers parse raw JSON themselves (so a bad body gets OpenAI's envelope with a message naming the
field, not FastAPI's 422), which leaves FastAPI's generated schema without bodies. This module adds them:
the request models the ingress validates with, the openai SDK's own response types (what a client parses),
and the error envelope with every status an endpoint can answer.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serving.ingress.protocol import (
    AddExemplarsRequest,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    ReleaseStoreRequest,
    RollbackRequest,
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope; 429 and 503 carry a Retry-After header."""

    error: ErrorDetail


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class RouteResponse(BaseModel):
    """The decision for a request, without generating: tier, router, score, reason, thresholds."""

    object: Literal["tierserve.route"]
    tier: str
    router: str


class ExemplarsResponse(BaseModel):
    object: Literal["tierserve.exemplars"]
    written: int
    count: int


class StoreResponse(BaseModel):
    object: Literal["tierserve.store"]
    released_for_s: float


class FeedbackResponse(BaseModel):
    """What the router's learner did with the score: `learned` (an exemplar, written within
    `router.learn.flush_interval_s`), or why not (`sampled_out`, `no_label`: the top tier answered, or a cap:
    `label_cap`, `key_cap`, `key_share`)."""

    object: Literal["tierserve.feedback"]
    response_id: str
    verdict: str
    learned: bool
    label: str | None
    """The tier the exemplar was labelled with, when one was learned."""


class StoredExemplarItem(BaseModel):
    id: str
    version: int
    """The store version that added it."""
    text: str
    tier: str
    source: str
    category: str | None = None
    provenance: Literal["seed", "import", "admin", "cascade", "feedback"]
    created_at: float | None = None
    key_id: str | None = None
    """The API key id whose traffic taught it (learned exemplars)."""
    expires_at: float | None = None


class ExemplarList(BaseModel):
    object: Literal["list"]
    data: list[StoredExemplarItem]


class StoreVersionItem(BaseModel):
    version: int
    parent: int
    kind: Literal["initial", "seed", "import", "admin", "learn", "delete", "rollback"]
    created_at: float
    note: str
    committed: bool
    size: int | None = None
    updated_at: float | None = None


class VersionList(BaseModel):
    object: Literal["list"]
    active: int
    """The version decisions are made from."""
    data: list[StoreVersionItem]


class RolledBack(StoreVersionItem):
    object: Literal["tierserve.store_version"]


class Health(BaseModel):
    status: Literal["ready", "starting"]
    tiers: dict[str, bool]
    ingress: Literal["haproxy", "serve-proxy"]
    """What serves the port: Ray Serve's HAProxy ingress, or its Python proxy on a cluster started without it."""


_SERVED_APART = {
    ("/v1/chat/completions", "post"): "Chat completion (stream: true for server-sent events)",
    ("/v1/completions", "post"): "Completion (stream: true for server-sent events)",
}
"""The completion endpoints carry every token, so the ingress serves them without FastAPI's routing and
middleware; they are documented here all the same."""

_REQUESTS: dict[tuple[str, str], tuple[type[BaseModel], ...]] = {  # one of these bodies
    ("/v1/chat/completions", "post"): (ChatCompletionRequest,),
    ("/v1/completions", "post"): (CompletionRequest,),
    ("/v1/route", "post"): (ChatCompletionRequest, CompletionRequest),
    ("/admin/exemplars", "post"): (AddExemplarsRequest,),
    ("/admin/router/release-store", "post"): (ReleaseStoreRequest,),
    ("/v1/feedback", "post"): (FeedbackRequest,),
    ("/admin/exemplars/rollback", "post"): (RollbackRequest,),
}
_RESPONSES: dict[tuple[str, str], tuple[type[BaseModel] | None, type[BaseModel] | None, tuple[int, ...]]] = {
    # (JSON 200 body, streamed chunk, error statuses)
    ("/v1/chat/completions", "post"): (ChatCompletion, ChatCompletionChunk, (400, 401, 404, 413, 429, 500, 503, 504)),
    ("/v1/completions", "post"): (Completion, Completion, (400, 401, 404, 413, 429, 500, 503, 504)),
    ("/v1/route", "post"): (RouteResponse, None, (400, 401, 404, 413, 500)),
    ("/v1/models", "get"): (ModelList, None, (401,)),
    ("/admin/exemplars", "post"): (ExemplarsResponse, None, (400, 401, 403, 413, 500)),
    ("/admin/router/release-store", "post"): (StoreResponse, None, (400, 401, 403, 413, 500)),
    ("/health", "get"): (Health, None, ()),
    ("/v1/feedback", "post"): (FeedbackResponse, None, (400, 401, 403, 404, 413, 500, 503)),
    ("/admin/exemplars", "get"): (ExemplarList, None, (400, 401, 403, 500, 503)),
    ("/admin/exemplars/versions", "get"): (VersionList, None, (400, 401, 403, 500, 503)),
    ("/admin/exemplars/rollback", "post"): (RolledBack, None, (400, 401, 403, 413, 500, 503)),
}
_QUERY = {
    ("/admin/exemplars", "get"): [
        {"name": "source", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "only exemplars of this source (`learned`: what the router learned from traffic)"},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
    ],
}
"""Query parameters the handlers read themselves (a bad one gets OpenAI's envelope, not FastAPI's 422)."""


def document(api: FastAPI) -> None:
    """Make `api.openapi()` return the schema with request bodies and response models."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = _build(api)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def _build(api: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    models = [(m, "validation") for bodies in _REQUESTS.values() for m in bodies]
    models += [(m, "serialization") for body, chunk, _ in _RESPONSES.values() for m in (body, chunk) if m]
    models.append((ErrorResponse, "serialization"))
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}")
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    error = {"description": "OpenAI error envelope", "content": {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}}}
    for (path, method), summary in _SERVED_APART.items():  # answered by the ingress before FastAPI's router
        schema["paths"].setdefault(path, {})[method] = {"summary": summary,
                                                        "operationId": path.strip("/").replace("/", "_")}
    for (path, method), parameters in _QUERY.items():
        schema["paths"][path][method]["parameters"] = parameters
    for (path, method), bodies in _REQUESTS.items():
        refs_ = [refs[(m, "validation")] for m in bodies]
        operation = schema["paths"][path][method]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs_[0] if len(refs_) == 1 else {"oneOf": refs_}}},
        }
    for (path, method), (body, chunk, statuses) in _RESPONSES.items():
        operation = schema["paths"][path][method]
        ok: dict[str, Any] = {"description": "OK", "content": {}}
        if body is not None:
            ok["content"]["application/json"] = {"schema": refs[(body, "serialization")]}
        if chunk is not None:  # `stream: true`: server-sent events, each `data:` line one chunk, then [DONE]
            ok["content"]["text/event-stream"] = {
                "schema": {"type": "string", "description": f"data: <{chunk.__name__} JSON> events, then data: [DONE]"}
            }
        responses = {"200": ok, **{str(s): error for s in statuses}}
        if path == "/health":
            responses["503"] = {"description": "a tier is not ready", "content": ok["content"]}
        operation["responses"] = responses
    return schema
