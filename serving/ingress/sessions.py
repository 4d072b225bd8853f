"""Sticky tiers for multi-turn conversations: a session keeps the tier that answered it.

A session key comes from the `x-tierserve-session` header or, without one, from the conversation itself
(a hash of its system prompt and first user message, so every turn of one thread maps to the same key).
OpenAI's `user` field names an end user, who may hold many conversations, so it is never a session key on
its own; it is mixed into the key, so two users who open with the same words do not share a session.

The map is per ingress replica (an LRU bounded by `sessions.max_entries`, entries expiring after
`sessions.ttl_s`): with several replicas a later turn that lands on another replica is routed afresh, and
that replica remembers the tier from then on.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from router.errors import InvalidRequest
from serving.types import ChatMessage

SESSION_HEADER = "x-tierserve-session"
MAX_HEADER_CHARS = 256


@dataclass(frozen=True)
class SessionKey:
    """Which conversation a request belongs to."""

    key: str
    """A hash: the map never holds client text."""
    source: Literal["header", "conversation"]
    continuing: bool
    """Whether the request carries earlier turns (or a header): only then is a remembered tier reused."""

    @property
    def short(self) -> str:
        return self.key[:8]


@dataclass(frozen=True)
class Remembered:
    """The tier a session's last answered turn ended on."""

    tier: str
    at: float


def session_key(
    header: str | None, user: str | None, messages: Sequence[ChatMessage] | None
) -> SessionKey | None:
    """The request's session: the header when given, else derived from a chat's opening (None: no session).

    A derived session continues only when the request carries an assistant turn; a first turn starts (or
    restarts) it, so a new chat that opens like an old one is routed on its own merits.
    """
    user_part = user or ""
    if header is not None:
        value = header.strip()
        if not value or len(value) > MAX_HEADER_CHARS:
            raise InvalidRequest(
                f"the {SESSION_HEADER} header must be 1 to {MAX_HEADER_CHARS} characters (got {len(value)}); "
                "send a conversation id, or leave the header out to derive one from the messages.",
                param=SESSION_HEADER,
            )
        return SessionKey(_digest("header", user_part, value), "header", continuing=True)
    if not messages:
        return None
    system = [m.content for m in messages if m.role in ("system", "developer")]
    first_user = next((m.content for m in messages if m.role == "user"), None)
    if first_user is None:
        return None
    continuing = any(m.role == "assistant" for m in messages)
    return SessionKey(_digest("conversation", user_part, *system[:1], first_user), "conversation", continuing)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        h.update(data)
    return h.hexdigest()[:32]


def tier_to_remember(routed_tier: str, answered_tier: str, *, escalated: bool, moved_by_load: bool) -> str:
    """The tier a session keeps after a turn: an escalation moves it; a load spill does not (it is about
    that moment, not the conversation), so the session keeps the tier it was routed to."""
    if moved_by_load and not escalated:
        return routed_tier
    return answered_tier


def sticky_reason(key: SessionKey, remembered: Remembered, now: float) -> str:
    """The `reason` a session-routed request reports."""
    origin = "x-tierserve-session header" if key.source == "header" else "derived from the conversation's opening"
    return (f"session {key.short} ({origin}) stays on {remembered.tier}, the tier of its last answer "
            f"{max(0.0, now - remembered.at):.0f} s ago")


class SessionStore:
    """An LRU map of session key to remembered tier, with a time-to-live; bounded in entries."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, Remembered] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def now(self) -> float:
        return self._clock()

    def get(self, key: str) -> Remembered | None:
        """The session's tier, if it was answered within the TTL (a hit refreshes its LRU place, not its age)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() - entry.at > self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, tier: str) -> None:
        self._entries[key] = Remembered(tier, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
