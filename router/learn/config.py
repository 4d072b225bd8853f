"""`router.learn` and `router.shadow`: learning exemplars from the router's own traffic, and a candidate router
run beside the live one. Both are off by default."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from router.configbase import StrictModel


class LearnConfig(StrictModel):
    """Decided cascades (small answer accepted, or escalated) and explicit feedback become labelled exemplars.

    Learning is sampled, and capped per label and per API key over a sliding window, so one client cannot
    flood the store or steer everyone's traffic with made-up outcomes. Learned exemplars carry their
    provenance and expire with the query log's retention (`query_log.retention_days`).
    """

    enabled: bool = False
    """Turn cascade outcomes and feedback into exemplars (off: nothing is learned; exploration is off too)."""
    sample_accepted: float = Field(default=0.25, ge=0.0, le=1.0)
    """Share of accepted small answers kept as `small` exemplars (they are the common case)."""
    sample_escalated: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of escalations kept as exemplars of the tier above (rarer, and what pre-routing learns from)."""
    sample_feedback: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of explicit feedback kept."""
    window_s: float = Field(default=3600.0, ge=1.0, le=30 * 86_400)
    """Sliding window the caps count over."""
    max_per_label: int = Field(default=1000, ge=1, le=10_000_000)
    """Most exemplars learned per label (tier) per window."""
    max_per_key: int = Field(default=100, ge=1, le=10_000_000)
    """Most exemplars learned from one API key per window."""
    max_key_share: float = Field(default=0.2, gt=0.0, le=1.0)
    """Most share of a window's learned exemplars one API key may supply, once the window holds
    `key_share_after` of them (before that the per-key cap alone applies)."""
    key_share_after: int = Field(default=50, ge=1)
    """Learned exemplars in the window before `max_key_share` applies."""
    confidence_margin: float = Field(default=0.0, ge=0.0, le=0.5)
    """Skip cascade outcomes whose confidence lies within this of their threshold: a coin flip of a decision
    is a noisy label."""
    explore_rate: float = Field(default=0.02, ge=0.0, le=0.5)
    """Share of the requests the router sends above the cheapest tier that still try the cheapest one first
    (through the cascade), so the router keeps learning where it has stopped trying the small tier."""
    feedback_good_at: float = Field(default=0.5, ge=0.0, le=1.0)
    """Feedback scores (0..1) at or above this mean the answer was good enough; below, the tier above should
    have answered."""
    feedback_window_s: float = Field(default=86_400.0, ge=1.0, le=90 * 86_400)
    """How long after its answer a response accepts feedback (never longer than the query log's retention)."""
    max_pending: int = Field(default=100_000, ge=1, le=10_000_000)
    """Answers remembered for feedback at once (oldest forgotten first)."""
    opt_out_key_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] = []
    """API key ids (`router.learn.key_id(key)`: the first 16 hex digits of its SHA-256) whose traffic is never
    learned from."""
    learn_anonymous: bool = True
    """Learn from requests that carry no API key (a stack without keys). Off: only keyed traffic teaches."""
    flush_interval_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    """How often the router writes the exemplars it learned (one store version per `version_every_s`)."""
    version_every_s: float = Field(default=3600.0, ge=1.0, le=30 * 86_400)
    """Learned exemplars go into one store version for this long, then a new one starts (rollback grain)."""


ShadowKind = Literal["version", "classifier", "heuristic", "knn"]


class ShadowConfig(StrictModel):
    """A candidate router decided beside the live one, in the same router call (only the live decision is
    served); its decision is logged next to the live one (`tierserve report` shows how often they agree, and what the candidate would have cost)."""

    enabled: bool = False
    """Decide every sampled request with the candidate too."""
    candidate: ShadowKind = "version"
    """`version`: kNN over another exemplar-store version (`version`); `classifier`: the classifier saved at
    `classifier_path`; `heuristic`; `knn`: the live store with another `threshold`."""
    version: int | None = Field(default=None, ge=1)
    """Store version the `version` candidate searches."""
    classifier_path: str | None = None
    """Classifier folder for the `classifier` candidate (relative paths resolve against data_dir)."""
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Boundary into the top tier for the candidate; None: `router.thresholds`."""
    sample_rate: float = Field(default=1.0, gt=0.0, le=1.0)
    """Share of routed requests the candidate decides too."""
    max_queue_wait_s: float = Field(default=0.05, gt=0.0, le=10.0)
    """A candidate that searches or embeds (`version`, `classifier`) skips a request when the live router's
    queue would make it wait longer than this: a shadow never slows a busy router down. (`knn` with another
    threshold and `heuristic` cost nothing and always decide.)"""

    @property
    def needs_vectors(self) -> bool:
        """Whether the candidate searches or scores the request's vectors (`version`, `classifier`); `knn` at
        another threshold decides from the live score and the heuristic from rules, at no cost."""
        return self.enabled and self.candidate in ("version", "classifier")

    @property
    def label(self) -> str:
        """How the query log names the candidate: `version:3`, `classifier`, `heuristic`, `knn@0.6`."""
        if self.candidate == "version":
            return f"version:{self.version}"
        return self.candidate + (f"@{self.threshold:g}" if self.threshold is not None else "")

    @model_validator(mode="after")
    def _candidate_needs(self) -> ShadowConfig:
        if not self.enabled:
            return self
        if self.candidate == "version" and self.version is None:
            raise ValueError("shadow.candidate 'version' needs shadow.version: the store version to compare "
                             "(`tierserve exemplars versions` lists them).")
        if self.candidate == "classifier" and self.classifier_path is None:
            raise ValueError("shadow.candidate 'classifier' needs shadow.classifier_path (a `tierserve "
                             "train-router` folder).")
        return self
