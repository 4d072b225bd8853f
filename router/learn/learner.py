"""`Learner`: the ingress's outcomes and the clients' feedback in, labelled exemplars out.

    learner = Learner(cfg.router.learn, tier_names, retention_s=cfg.query_log.retention_s)
    learner.observe(outcome)          # once per answered request -> LearnResult
    learner.feedback(feedback)        # POST /v1/feedback -> LearnResult (refuses a foreign response id)
    learner.explore(decision, rid)    # per routed request: try the cheapest tier first?
    exemplars = learner.drain()       # what was learned since the last drain, to embed and store

It keeps only what the rules need: the window's counts (timestamps per label and per key) and the answers
still open for feedback (response id -> key, text, tier), bounded and expired. It never embeds or writes:
the router deployment drains it into the exemplar store (one store version per `version_every_s`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.learn import rules
from router.learn.config import LearnConfig
from router.learn.types import Feedback, LearnResult, RequestOutcome
from router.types import Exemplar, RouteDecision

LEARNED_SOURCE = "learned"
"""`source` of learned exemplars (`tierserve exemplars delete --source learned` removes them all)."""


@dataclass(frozen=True)
class _Answer:
    """An answer still open for feedback."""

    api_key_id: str | None
    text: str
    tier: str
    at: float


class Learner:
    """Learning rules with their small state; thread-safe."""

    def __init__(self, cfg: LearnConfig, tier_names: Sequence[str], *, retention_s: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """`retention_s`: the query log's retention; learned exemplars expire after it, and an answer accepts
        feedback for at most that long."""
        self.cfg = cfg
        self.tier_names = list(tier_names)
        self.retention_s = retention_s
        self._clock = clock
        self._lock = threading.Lock()
        self._learned: deque[tuple[float, str, str | None]] = deque()
        """(time, label, key id) of every exemplar learned within the window, oldest first."""
        self._per_label: dict[str, int] = {}
        self._per_key: dict[str | None, int] = {}
        self._pending: OrderedDict[str, _Answer] = OrderedDict()
        self._queue: list[Exemplar] = []

    @property
    def feedback_window_s(self) -> float:
        window = self.cfg.feedback_window_s
        return window if self.retention_s is None else min(window, self.retention_s)

    def explore(self, decision: RouteDecision, request_id: str, *, cascading: bool) -> bool:
        """Whether this routed request tries the cheapest tier first (see `rules.explore`); off with learning."""
        return self.cfg.enabled and rules.explore(decision, request_id, self.cfg.explore_rate, cascading=cascading)

    def observe(self, outcome: RequestOutcome) -> LearnResult:
        """Learn from one answered request: a decided cascade may become an exemplar; any answer from a tier
        below the top is remembered for feedback."""
        refused = rules.gate(outcome.api_key_id, self.cfg)
        if refused is not None:
            return LearnResult(refused)
        with self._lock:
            self._remember(outcome)
            label, why = rules.outcome_label(outcome, self.tier_names, self.cfg.confidence_margin)
            if label is None:
                return LearnResult("remembered" if outcome.response_id in self._pending else why)
            rate = rules.sample_rate(self.cfg, escalated=outcome.escalated, feedback=False)
            if not rules.sampled(outcome.response_id, rate):
                return LearnResult("sampled_out")
            return self._learn(outcome.text, label, "cascade", outcome.api_key_id, outcome.timestamp)

    def feedback(self, fb: Feedback) -> LearnResult:
        """Learn from a client's score of an answer. Only the key that got the answer may score it (a foreign
        response id is refused as such), and only within the feedback window."""
        refused = rules.gate(fb.api_key_id, self.cfg)
        if refused is not None:
            return LearnResult(refused)
        with self._lock:
            self._expire(self._clock())
            answer = self._pending.get(fb.response_id)
            if answer is None:
                return LearnResult("unknown_response")
            if answer.api_key_id != fb.api_key_id:
                return LearnResult("foreign_response")
            del self._pending[fb.response_id]  # one feedback per answer: a client cannot vote twice
            label = rules.feedback_label(answer.tier, fb.score, self.tier_names, self.cfg.feedback_good_at)
            if label is None:
                return LearnResult("no_label")
            if not rules.sampled(fb.response_id, self.cfg.sample_feedback, salt="feedback"):
                return LearnResult("sampled_out")
            return self._learn(answer.text, label, "feedback", fb.api_key_id, fb.timestamp)

    def drain(self) -> list[Exemplar]:
        """The exemplars learned since the last drain, oldest first."""
        with self._lock:
            out, self._queue = self._queue, []
            return out

    # -- internals ------------------------------------------------------------------------------------------

    def _remember(self, outcome: RequestOutcome) -> None:
        self._expire(self._clock())
        if not outcome.tier_chain or outcome.tier_chain[-1] not in self.tier_names[:-1]:
            return  # feedback on the top tier's answers teaches nothing about routing
        self._pending[outcome.response_id] = _Answer(outcome.api_key_id, outcome.text, outcome.tier_chain[-1],
                                                     outcome.timestamp)
        self._pending.move_to_end(outcome.response_id)
        while len(self._pending) > self.cfg.max_pending:
            self._pending.popitem(last=False)

    def _learn(self, text: str, label: str, provenance: str, api_key_id: str | None, at: float) -> LearnResult:
        now = self._clock()
        self._expire(now)
        counts = rules.WindowCounts(len(self._learned), self._per_label, self._per_key)
        capped = rules.admit(counts, label, api_key_id, self.cfg)
        if capped is not None:
            return LearnResult(capped)
        self._learned.append((now, label, api_key_id))
        self._per_label[label] = self._per_label.get(label, 0) + 1
        self._per_key[api_key_id] = self._per_key.get(api_key_id, 0) + 1
        exemplar = Exemplar(text=text, tier=label, source=LEARNED_SOURCE, provenance=provenance, created_at=at,
                            key_id=api_key_id,
                            expires_at=None if self.retention_s is None else at + self.retention_s)
        self._queue.append(exemplar)
        return LearnResult("learned", exemplar)

    def _expire(self, now: float) -> None:
        while self._learned and self._learned[0][0] <= now - self.cfg.window_s:
            _, label, key = self._learned.popleft()
            self._per_label[label] -= 1
            self._per_key[key] -= 1
            if not self._per_key[key]:
                del self._per_key[key]
        horizon = now - self.feedback_window_s
        while self._pending:
            response_id, answer = next(iter(self._pending.items()))
            if answer.at > horizon:
                break
            del self._pending[response_id]
