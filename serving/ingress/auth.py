"""API keys and their scopes: data-plane keys open /v1/*, admin keys open /admin/* (and /v1/*).

Keys are compared in constant time (`hmac.compare_digest` against every key, no early exit), so response
timing tells nothing about how much of a guessed key matched. /health is always open; /metrics is open
unless `http.metrics_auth` is set.
"""

from __future__ import annotations

import hmac
from enum import Enum

from serving.ingress.errors import Forbidden, Unauthorized


class Scope(Enum):
    DATA = "data"
    ADMIN = "admin"


class Keys:
    def __init__(self, api_keys: set[str], admin_keys: set[str]) -> None:
        self._api = [k.encode() for k in sorted(api_keys)]
        self._admin = [k.encode() for k in sorted(admin_keys)]

    @property
    def enabled(self) -> bool:
        """False when no key is configured anywhere: a local stack with no auth."""
        return bool(self._api or self._admin)

    def check(self, authorization: str | None, scope: Scope) -> None:
        """Raise Unauthorized (401) for a missing or unknown key, Forbidden (403) for a key without `scope`."""
        if not self.enabled:
            return
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


def _matches(given: bytes, keys: list[bytes]) -> bool:
    found = False
    for key in keys:  # every key compared, whatever matched, in constant time each
        found |= hmac.compare_digest(given, key)
    return found
