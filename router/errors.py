"""The root of tierserve's errors, and the router's own.

`router` is the library `serving` builds on, so the root lives here: every layer defines the errors it
raises next to its code (`serving.ingress.errors`, `serving.channel.errors`, `serving.engines.base`, ...),
all subclasses of `TierserveError`, split 4xx (`ClientError`) and 5xx. One function at the HTTP edge
(`serving.ingress.errors.to_envelope`) turns any of them into OpenAI's error envelope.

Errors cross Ray process boundaries (a router replica raises, the ingress answers), so they pickle with
all their fields. Errors of bad input files (config, saved classifier) are also `ValueError`s.
"""

from __future__ import annotations

from typing import Any


class TierserveError(Exception):
    """Base of every error tierserve answers with; carries the HTTP status and OpenAI's fields."""

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
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def _rebuild(cls: type[TierserveError], message: str, param: str | None, code: str | None, headers: dict):
    return cls(message, param=param, code=code, headers=headers)


class ClientError(TierserveError):
    """The request is wrong; retrying it unchanged will fail again."""

    status_code = 400
    error_type = "invalid_request_error"


class InvalidRequest(ClientError):
    """A field of the request is invalid; `param` names it."""


class ConfigError(TierserveError, ValueError):
    """A config file that cannot be used; the message says which field and how to fix it."""


class StoreError(TierserveError):
    """The exemplar store cannot be used; the message says why and what to do."""

    status_code = 503


class StoreLockedError(StoreError):
    """The local Qdrant folder is held by another process (usually the running router)."""


class ClassifierMismatchError(TierserveError, ValueError):
    """A saved classifier does not fit the embedder it is asked to work with."""


class EmbedderDeviceError(ConfigError):
    """The embedder's configured device is not on this machine (e.g. `cuda` without a usable CUDA device)."""


class VersionError(InvalidRequest, ValueError):
    """A rollback names a store version that does not exist, or the one already served; `param` is `version`."""
