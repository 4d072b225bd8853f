"""The tier channel's errors: admission said no, no replica answers, a replica went away.

All are retryable overload (429/503 with Retry-After). An error a replica sends over the wire is rebuilt
from its status and OpenAI fields (`error_from_frame`), so no class has to be known on both sides.
"""

from __future__ import annotations

from typing import Any

from router.errors import ClientError, InvalidRequest, TierserveError
from serving.engines.base import EngineError


class Overloaded(TierserveError):
    """Admission control said no; the client should retry after `retry_after_s`."""

    status_code = 429
    error_type = "rate_limit_error"

    @classmethod
    def make(cls, message: str, *, retry_after_s: float, status_code: int = 429, code: str = "overloaded"
             ) -> Overloaded:
        return (ServiceUnavailable if status_code == 503 else cls)(
            message, code=code, headers={"Retry-After": str(max(1, round(retry_after_s)))}
        )


class ServiceUnavailable(Overloaded):
    """No replica of the tier can take the request now (starting, gone, unreachable, or full)."""

    status_code = 503
    error_type = "service_unavailable_error"


def error_payload(exc: TierserveError) -> dict[str, Any]:
    """What an ERROR frame carries: the status and OpenAI's fields."""
    return {"status": exc.status_code, "type": exc.error_type, "message": exc.message, "param": exc.param,
            "code": exc.code, "headers": exc.headers}


def error_from_frame(d: dict[str, Any]) -> TierserveError:
    """An error a replica sent, rebuilt with its status: overload stays `Overloaded` (the cascade keeps a
    cheaper answer when the next tier refuses), 4xx stay client errors, anything else is an `EngineError`."""
    status = int(d.get("status", 500))
    fields = {"param": d.get("param"), "code": d.get("code"), "headers": d.get("headers")}
    message = str(d.get("message", "error"))
    if status == 429:
        return Overloaded(message, **fields)
    if status == 503:
        return ServiceUnavailable(message, **fields)
    if status == 400:
        return InvalidRequest(message, **fields)
    err: TierserveError = ClientError(message, **fields) if 400 < status < 500 else EngineError(message, **fields)
    err.status_code = status
    err.error_type = str(d.get("type") or err.error_type)
    return err
