"""The HTTP edge's errors, and the one mapper from any error to OpenAI's envelope and status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from router.errors import ClientError, TierserveError
from serving.channel.errors import Overloaded

logger = logging.getLogger(__name__)


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


class NotFound(ClientError):
    """Something the request names does not exist, or is not this key's to see (same answer, so ids don't leak)."""

    status_code = 404
    error_type = "not_found_error"


class RouterUnavailable(TierserveError):
    """The router deployment did not answer a call that needs it (not routing: that falls back, never a 5xx)."""

    status_code = 503
    error_type = "server_error"


class RequestTimeout(TierserveError):
    """A request ran past `http.request_timeout_s`; its engine work was aborted."""

    status_code = 504
    error_type = "timeout_error"


class InternalError(TierserveError):
    """An error tierserve did not expect: a 500 whose message names the exception, never a traceback."""


_RAY_OVERLOAD = ("BackPressureError", "DeploymentUnavailableError")
"""Ray Serve's own refusals (queue full, no replica) on a control-plane call: overload, not a server bug.
Matched by name so this module does not import Ray."""


def to_envelope(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Any exception -> (status, OpenAI error body, headers). Unknown errors become a 500."""
    err = find_tierserve_error(exc)
    if err is None and type(exc).__name__ in _RAY_OVERLOAD:
        err = Overloaded.make(f"Overloaded: {exc}", retry_after_s=2, status_code=503)
    if err is None:
        err = InternalError(f"internal error: {type(exc).__name__}: {exc}")
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


def error_response(exc: BaseException, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error response for `exc` (5xx other than overload and timeouts are logged with their trace)."""
    status, body, headers = to_envelope(exc)
    if status in (503, 504):  # overload, a lost replica, a timeout: expected, counted in the metrics
        logger.debug("request answered %d: %s", status, body["error"]["message"])
    elif status >= 500:
        logger.exception("request failed", exc_info=exc)
    return JSONResponse(body, status_code=status, headers={**headers, **(extra_headers or {})})
