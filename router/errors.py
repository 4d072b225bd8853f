"""One error hierarchy for router and serving, split 4xx/5xx, and one mapper to OpenAI's error envelope.

Errors cross Ray process boundaries (a tier replica raises, the ingress answers), so they pickle
with all their fields. Errors of bad input files (config, plan, saved classifier) are also `ValueError`s.
"""

from __future__ import annotations

from typing import Any


class TierserveError(Exception):
    """Base of every error tierserve answers with; carries the HTTP status and OpenAI fields."""

    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(cls: type[TierserveError], message: str, param: str | None, code: str | None, headers: dict):
    return cls(message, param=param, code=code, headers=headers)


class ClientError(TierserveError):
    """The request is wrong; retrying it unchanged will fail again."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidRequest(ClientError):
    pass


def prompt_too_long(prompt_tokens: int, max_tokens: int, max_model_len: int, tier: str) -> InvalidRequest:
    """OpenAI's context-length error, naming both numbers."""
    return InvalidRequest(
        f"This model's maximum context length is {max_model_len} tokens (tier '{tier}'). However, you "
        f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
        "the completion). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


class Unauthorized(ClientError):
    status_code = 401
    error_type = "authentication_error"


class Forbidden(ClientError):
    """A valid key without the scope the endpoint needs (a data-plane key on /admin/*)."""

    status_code = 403
    error_type = "permission_error"


class PayloadTooLarge(ClientError):
    status_code = 413


class ModelNotFound(ClientError):
    status_code = 404
    error_type = "not_found_error"


class Overloaded(TierserveError):
    """Admission control said no; the client should retry after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"

    @classmethod
    def make(cls, message: str, *, retry_after_s: float, status_code: int = 429) -> Overloaded:
        return (ServiceUnavailable if status_code == 503 else cls)(
            message, code="overloaded", headers={"Retry-After": str(max(1, round(retry_after_s)))}
        )


class ServiceUnavailable(Overloaded):
    status_code = 503
    error_type = "service_unavailable_error"


class EngineError(TierserveError):
    status_code = 500
    error_type = "server_error"


class RequestTimeout(TierserveError):
    """A request ran past `http.request_timeout_s`; its engine work was aborted."""

    status_code = 504
    error_type = "timeout_error"


class StartupError(TierserveError):
    """The stack (or a benchmark's server) could not start: a missing model, a server that never got ready."""


class StoreError(TierserveError):
    """The exemplar store cannot be used; the message says why and what to do."""

    status_code = 503


class StoreLockedError(StoreError):
    """The local Qdrant folder is held by another process (usually the running router)."""


class ConfigError(TierserveError, ValueError):
    """A config file that cannot be used; the message says which field and how to fix it."""


class PlanError(TierserveError, ValueError):
    """A GPU plan that cannot work; the message names the tier, the shortfall and the fix."""


class ClassifierMismatchError(TierserveError, ValueError):
    """A saved classifier does not fit the embedder it is asked to work with."""


def error_from_dict(d: dict[str, Any]) -> TierserveError:
    """Rebuild an error sent over the wire (`serving.wire`) by class name; unknown names become a 500."""
    classes = {c.__name__: c for c in _all_subclasses(TierserveError)}
    cls = classes.get(d.get("class", ""), EngineError)
    return cls(d.get("message", "error"), param=d.get("param"), code=d.get("code"), headers=d.get("headers"))


def _all_subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _all_subclasses(sub)
    return found


_RAY_OVERLOAD = ("BackPressureError", "DeploymentUnavailableError")
"""Ray Serve's own refusals (queue full, no replica): overload, not a server bug. Matched by name so this
module does not import Ray."""


def to_envelope(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Any exception -> (status, OpenAI error body, headers). Unknown errors become a 500."""
    err = find_tierserve_error(exc)
    if err is None and type(exc).__name__ in _RAY_OVERLOAD:
        err = Overloaded.make(f"Overloaded: {exc}", retry_after_s=2, status_code=503)
    if err is None:
        err = EngineError(f"internal error: {type(exc).__name__}: {exc}")
    return err.status_code, err.envelope(), err.headers


def find_tierserve_error(exc: BaseException) -> TierserveError | None:
    """Unwrap Ray's task errors (RayTaskError subclasses the cause, or holds it in `.cause`)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, TierserveError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None
