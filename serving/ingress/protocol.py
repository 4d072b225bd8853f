"""What clients send: the API key checked against its scope, the body read within its size limit, and OpenAI's
request models validated, every refusal naming the field. The response shapes are in `serving.ingress.openai`.

Keys are compared in constant time (`hmac.compare_digest` against every key, no early exit), so response timing
tells nothing about how much of a guessed key matched. /health is always open; /metrics is open unless
`http.metrics_auth` is set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.errors import InvalidRequest
from serving.ingress.errors import Forbidden, PayloadTooLarge, Unauthorized
from serving.types import ChatMessage, SamplingOptions

if TYPE_CHECKING:
    from serving.config import LimitsConfig


class TierserveOptions(BaseModel):
    """Per-request knobs, sent as `extra_body={"tierserve": {...}}` with the openai SDK."""

    model_config = ConfigDict(extra="forbid")

    tier: str | None = None
    """Force this tier (skips routing)."""
    routing: bool = True
    """False: skip the router and use the cheapest tier (or `tier`)."""
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Routing threshold for this request (same as `model="router-knn-0.62"`)."""
    cascade: bool | None = None
    """Turn the cascade on or off for this request (default: config)."""
    cascade_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    cascade_method: Literal["logprob", "consistency", "verify"] | None = None
    shadow: bool | None = None
    """Whether `router.shadow`'s candidate decides this request too: None follows `sample_rate`, false never,
    true always (needs `router.shadow.enabled`). `tierserve bench --shadow` compares both in one stack."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False
    """vLLM extension: keep generating past end-of-sequence (benchmarks)."""
    tierserve: TierserveOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_words(cls, stop: str | list[str] | None) -> str | list[str] | None:
        words = [stop] if isinstance(stop, str) else stop or []
        if any(w == "" for w in words):
            raise ValueError("stop strings must not be empty; remove the empty string")
        for word in words:
            _utf8(word)
        return stop

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @property
    def options(self) -> TierserveOptions:
        return self.tierserve or TierserveOptions()


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return _utf8(self.content)
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; send text parts")
            parts.append(str(part.get("text", "")))
        return _utf8("".join(parts))


def _utf8(text: str) -> str:
    """`text` if it encodes as UTF-8 (JSON's \\ud800 escapes decode to lone surrogates that cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text holds an unpaired surrogate ({text[exc.start]!r} at {exc.start}); send valid "
                         "UTF-8 text") from None
    return text


class ChatCompletionRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("messages")
    @classmethod
    def _texts(cls, messages: list[_Message]) -> list[_Message]:
        for m in messages:
            m.text()  # raises a ValueError naming the bad part
        return messages

    def chat_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(ChatMessage(role=m.role, content=m.text()) for m in self.messages)

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_tuple(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs or 0,
            ignore_eos=self.ignore_eos,
        )

    def routing_text(self) -> str:
        """What the router reads: the system prompt and the last user message."""
        system = [m.text() for m in self.messages if m.role in ("system", "developer")]
        users = [m.text() for m in self.messages if m.role == "user"]
        return "\n".join(system[:1] + users[-1:]) or self.messages[-1].text()


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _single(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("only one prompt per request is supported; send a string or a list of one")
        _utf8(prompt if isinstance(prompt, str) else prompt[0])
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported")
        return echo

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_tuple(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs or 0,
            ignore_eos=self.ignore_eos,
        )

    def routing_text(self) -> str:
        return self.prompt_text()


def check_limits(body: ChatCompletionRequest | CompletionRequest, limits: LimitsConfig) -> None:
    """The configured request limits (`http.limits`), each refused with a 400 naming the field."""
    messages = getattr(body, "messages", None)
    if messages is not None and len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages has {len(messages)} entries; the limit is {limits.max_messages} (http.limits.max_messages).",
            param="messages",
        )
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value > limits.max_tokens:
            raise InvalidRequest(
                f"{field} is {value}; the limit is {limits.max_tokens} (http.limits.max_tokens).", param=field
            )
    stops = body.stop_tuple()
    if len(stops) > limits.max_stop:
        raise InvalidRequest(f"stop has {len(stops)} strings; the limit is {limits.max_stop}.", param="stop")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_chars:
        raise InvalidRequest(
            f"a stop string has {longest} characters; the limit is {limits.max_stop_chars}.", param="stop"
        )


SEED_LABELS = frozenset({"small", "medium", "large"})
"""Labels of the shipped exemplar set; the router maps them onto the configured tiers."""


class _NewExemplar(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=20_000)
    tier: str = Field(min_length=1)
    source: str = "admin-api"


class AddExemplarsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exemplars: list[_NewExemplar] = Field(min_length=1, max_length=10_000)


class ReleaseStoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=30.0, gt=0, le=3600)
    """How long the store stays closed before the router reopens it."""


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a client's score of an answer it got (the router learns from it, `router.learn`)."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=256)
    """The answer's `id` (`chatcmpl-...` or `cmpl-...`), as the completion returned it."""
    score: float = Field(ge=0.0, le=1.0)
    """0 (useless) .. 1 (right); at or above `router.learn.feedback_good_at` the answer was good enough."""


class RollbackRequest(BaseModel):
    """`POST /admin/exemplars/rollback`: serve what an older exemplar-store version held, as a new version."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)
    """The version to restore (`GET /admin/exemplars/versions` lists them)."""


# ---- the API key -----------------------------------------------------------------------------------


class Scope(Enum):
    DATA = "data"
    ADMIN = "admin"


class Keys:
    """Data-plane keys open /v1/*, admin keys open /admin/* (and /v1/*)."""

    def __init__(self, api_keys: set[str], admin_keys: set[str]) -> None:
        self._api = [k.encode() for k in sorted(api_keys)]
        self._admin = [k.encode() for k in sorted(admin_keys)]

    @property
    def enabled(self) -> bool:
        """False when no key is configured anywhere: a local stack with no auth."""
        return bool(self._api or self._admin)

    def check(self, authorization: str | None, scope: Scope) -> str:
        """The key's id (a short hash; "anonymous" with no auth configured). Raises Unauthorized (401) for a
        missing or unknown key, Forbidden (403) for a key without `scope`."""
        if not self.enabled:
            return "anonymous"
        scheme, _, key = (authorization or "").partition(" ")
        given = key.strip().encode()
        is_admin = _matches(given, self._admin)
        is_api = _matches(given, self._api)
        if scheme.lower() != "bearer" or not (is_admin or is_api):
            raise Unauthorized(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.", code="invalid_api_key"
            )
        if scope is Scope.ADMIN and not is_admin:
            raise Forbidden(
                "This key has no admin scope; /admin/* needs a key from http.admin_keys (or TIERSERVE_ADMIN_KEYS)."
                if self._admin
                else "The admin endpoints are closed: no admin key is configured. Set http.admin_keys "
                "(or TIERSERVE_ADMIN_KEYS) and send one of those keys.",
                code="insufficient_scope",
            )
        return hashlib.sha256(given).hexdigest()[:16]


def _matches(given: bytes, keys: list[bytes]) -> bool:
    found = False
    for key in keys:  # every key compared, whatever matched, in constant time each
        found |= hmac.compare_digest(given, key)
    return found


# ---- the body --------------------------------------------------------------------------------------


async def parse(request: Request, model: type, without_messages: type | None = None, *, limit: int) -> Any:
    """Validate the JSON body as `model` (as `without_messages` when given and the body has no messages); a body
    over `limit` bytes is refused (413) before it is read in full."""
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


def _validation_error(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
    return InvalidRequest(f"Invalid request: {problems}", param=param)
