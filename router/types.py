"""Typed values of the router: exemplars, neighbours and the routing decision.

Plain frozen dataclasses (picklable across Ray), free of numpy, Qdrant and torch.
"""

from __future__ import annotations

import hashlib
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Literal

RouterKind = Literal["knn", "classifier", "judge", "heuristic", "cheapest"]
"""`knn`: nearest exemplars decide; `heuristic`: length/keyword rules; `cheapest`: always the first tier."""
ROUTER_KINDS: tuple[RouterKind, ...] = ("knn", "classifier", "judge", "heuristic", "cheapest")
Provenance = Literal["seed", "import", "admin", "cascade", "feedback"]
"""Where an exemplar's label came from: the shipped defaults, a file, the admin endpoint, a decided cascade
(small answer accepted, or escalated), or a client's explicit feedback."""
LEARNED: tuple[Provenance, ...] = ("cascade", "feedback")
"""Provenances the router learned from its own traffic (they expire with the query log's retention)."""
Chosen = Literal["explicit", "forced", "session"]
"""How a request chose its tier without a router: `model` names a tier, `tierserve.tier`, or its session."""

BUSY_CAUSE = "router busy"
"""`RouteDecision.fallback_cause` of a request the router would have taken too long to decide."""
OVERFLOW_LABEL = "knn-static"
"""How headers, the query log and the metrics name a decision of the static overflow (`router.overflow`)."""
FAST_LABEL = "knn-fast"
"""How they name a decision of the static first pass (`router.static_first`)."""

_ID_NAMESPACE = uuid.UUID("6f0b6f3e-3c1e-5d2a-9a57-1d2b7c9e0a41")
"""Fixed namespace so the same text always gets the same point id, on every machine."""


def normalize_text(text: str) -> str:
    """The form two exemplars must share to count as duplicates: NFC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", text).casefold().split())


@dataclass(frozen=True)
class Exemplar:
    """A labelled example prompt: requests that embed near it likely need the same tier."""

    text: str
    tier: str
    """A tier name from the config, or a seed label `small` / `medium` / `large`."""
    source: str = "user"
    """Where it came from (`default`, a file name, `admin`); `delete --source` removes by it."""
    category: str | None = None
    """Free-form task type, for reports."""
    provenance: Provenance = "import"
    created_at: float | None = None
    """Unix seconds the label was made (None: when it is written)."""
    key_id: str | None = None
    """The API key's id whose traffic taught it (learned exemplars only), for per-key caps and purges."""
    expires_at: float | None = None
    """Unix seconds after which the store deletes it for good (learned exemplars: the query log's retention)."""

    @property
    def id(self) -> str:
        """Point id: uuid5 of the normalized text, so re-importing the same text overwrites instead of duplicating."""
        return str(uuid.uuid5(_ID_NAMESPACE, normalize_text(self.text)))

    @property
    def text_hash(self) -> str:
        return hashlib.sha256(normalize_text(self.text).encode()).hexdigest()


@dataclass(frozen=True)
class StoredExemplar:
    """An exemplar as listed from the store, with its point id."""

    id: str
    exemplar: Exemplar
    version: int = 0
    """The store version that added it."""


@dataclass(frozen=True)
class Neighbor:
    """One nearby exemplar returned by a kNN query."""

    id: str
    tier: str
    similarity: float
    """Cosine similarity to the query, in [-1, 1]."""


@dataclass(frozen=True)
class RouteInput:
    """One request to route: the text (for chat, the last user message, optionally with the system prompt)."""

    text: str
    threshold: float | None = None
    """Per-request boundary into the most expensive tier (e.g. from `model="router-knn-0.62"`); None: config."""
    router: RouterKind | None = None
    """Per-request router; None: the config's `default_router`."""
    deadline: float | None = None
    """time.time() past which the caller no longer waits (it has routed without us): not worth embedding."""
    shadow: bool = False
    """Also decide it with the candidate router of `router.shadow`, in the same batch and on the same vectors
    (`RouteDecision.shadow`); the ingress sets it on its sample of the requests."""

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"routing threshold ({self.threshold}) must be within [0, 1].")
        if self.router is not None and self.router not in ROUTER_KINDS:
            raise ValueError(f"router {self.router!r} is not one of {list(ROUTER_KINDS)}.")


def parse_router_model(model: str) -> tuple[RouterKind, float | None]:
    """Router and threshold from a RouteLLM-style model name: `router-knn-0.62` -> ("knn", 0.62),
    `router-heuristic` -> ("heuristic", None). Raises ValueError saying the expected form."""
    name, _, rest = model.removeprefix("router-").partition("-")
    if not model.startswith("router-") or name not in ROUTER_KINDS:
        raise ValueError(
            f"model {model!r} is not a router name; use router-<{'|'.join(ROUTER_KINDS)}>[-<threshold 0..1>], "
            "e.g. router-knn-0.62."
        )
    if not rest:
        return name, None
    try:
        threshold = float(rest)
    except ValueError:
        raise ValueError(f"model {model!r}: threshold {rest!r} is not a number; e.g. router-knn-0.62.") from None
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"model {model!r}: threshold {threshold} must be within [0, 1].")
    return name, threshold


@dataclass(frozen=True)
class QueueReport:
    """The router deployment's batch queue, as one of its answers reports it."""

    wait_s: float
    """Expected wait for a request arriving now: what is left of the running batch and the queued ones."""
    item_s: float
    """What one more request adds to it, in a full batch (0 until a batch has been timed)."""


@dataclass(frozen=True)
class RouteDecision:
    """Which tier a request goes to, and why: made by a router, or by the request itself; carried to the
    response's headers, its `tierserve` object and the query log."""

    tier: str
    tier_index: int
    """Position of `tier` in the config's cost-ordered tiers."""
    router: RouterKind | Chosen
    """The router that decided (a `RouterKind`; `heuristic` when another router fell back), or how the request
    chose its tier: `explicit` (model names a tier), `forced` (`tierserve.tier`), `session` (the tier a
    conversation answered on before)."""
    score: float | None
    """Difficulty in [0, 1]: 0 routine, 1 hard. None when no router scored the request."""
    thresholds: tuple[float, ...]
    """The tier boundaries applied (after any per-request threshold)."""
    reason: str
    fallback: bool = False
    """True when the requested router failed and the heuristic decided instead."""
    overhead_ms: float = 0.0
    """Time spent deciding, including the wait for a batch (and, in the ingress, the call to the router)."""
    embed_ms: float = 0.0
    """Share of the decision spent embedding (the batch's embedding time)."""
    batch_size: int = 1
    """Requests decided together with this one (one embedding pass and one kNN query)."""
    neighbors: tuple[Neighbor, ...] = ()
    """The nearest exemplars (kNN only), most similar first."""
    session: str | None = None
    """The session key whose tier the answer updates (None: the request belongs to no session)."""
    fallback_cause: str | None = None
    """Why the requested router could not decide (with `fallback`), e.g. `BUSY_CAUSE`, `embedder`, `store`."""
    cached: bool = False
    """Answered from the router's decision cache: the same text was decided moments ago (not embedded again)."""
    shadow: RouteDecision | None = None
    """The candidate router's decision (`router.shadow`), for a request that asked for one (`RouteInput.shadow`)
    and was decided by kNN or the classifier in a batch the router had time for; logged, never served."""
    overflow: bool = False
    """Decided by the static overflow (`router.overflow`): kNN over the same exemplars on a static embedder's
    vectors, the router being too busy for its own embedder (`router` is `knn`, `fallback` False; headers, the
    query log and the metrics name it `OVERFLOW_LABEL`)."""
    fast: bool = False
    """Decided by the static first pass (`router.static_first`): kNN on the static vectors put the score farther
    than the calibrated margin from every boundary, where the router's own embedder decides the same tier
    (`router` is `knn`; named `FAST_LABEL`)."""
    queue: QueueReport | None = None
    """The router deployment's queue as it answered (None where no deployment decided): the ingress answers the
    busy fallback itself while its estimate of that queue is over `router.max_queue_wait_s`
    (`serving.ingress.plan.RouterQueue`)."""

    @property
    def busy(self) -> bool:
        """The router was too busy to decide in time (`router.max_queue_wait_s`); the heuristic decided."""
        return self.fallback and self.fallback_cause == BUSY_CAUSE

    @property
    def routed(self) -> bool:
        """True when a router (or a session's memory) chose the tier, not the request itself."""
        return self.router not in ("explicit", "forced")
