"""What is kept of each finished request, whatever its status: metrics, the tier its conversation sticks to,
and the query log."""

from __future__ import annotations

import time

from serving.config import AppConfig
from serving.ingress.plan import Outcome
from serving.ingress.sessions import SessionStore, tier_to_remember
from serving.metrics import Metrics
from serving.querylog import QueryLog, QueryRecord
from serving.querylog.log import status_word


class Recorder:
    """Records finished requests into the ingress replica's metrics, session map and query log."""

    def __init__(self, config: AppConfig, metrics: Metrics, sessions: SessionStore | None) -> None:
        self.tier_names = config.tier_names
        self.metrics = metrics
        self.sessions = sessions
        self.query_log = (QueryLog.from_config(config.query_log, config.resolved_data_dir())
                          if config.query_log.enabled else None)
        for tier in config.tier_names[:-1]:  # the drift alert compares escalations with the calibrated target
            target = config.cascade.target_rate_for(tier)
            if target is not None:
                metrics.cascade_escalation_target.labels(tier).set(target)

    def close(self) -> None:
        if self.query_log is not None:
            self.query_log.close()

    def record(self, endpoint: str, outcome: Outcome, status: int, started: float, prompt_tokens: int = 0,
                completion_tokens: int = 0, *, request_id: str, routing_text: str | None = None) -> None:
        """Metrics, the session's tier and the query log for one finished request (any status)."""
        tier, decision, trace = outcome.tier, outcome.decision, outcome.trace
        if status == 200 and decision.session is not None and self.sessions is not None:
            self.sessions.put(decision.session, tier_to_remember(
                decision.tier, tier, escalated=outcome.escalated, moved_by_load=outcome.capacity is not None))
        if trace is not None:
            names = self.tier_names
            for a in trace.attempts:
                if a.confidence is not None:  # the cascade scored this answer and decided
                    self.metrics.cascade_decisions.labels(a.tier, "escalated" if a.escalated else "kept").inc()
                if a.escalated:  # counted when decided, as its wasted tokens are (the next answer may never come)
                    self.metrics.escalations.labels(a.tier, names[names.index(a.tier) + 1]).inc()
            for wasted_tier, wasted in trace.wasted_tokens().items():
                self.metrics.wasted_tokens.labels(wasted_tier).inc(wasted)
        latency_s = time.perf_counter() - started
        self.metrics.requests.labels(endpoint, tier, str(status)).inc()
        self.metrics.latency.labels(endpoint, tier).observe(latency_s)
        if prompt_tokens or completion_tokens:
            self.metrics.tokens.labels(tier, "prompt").inc(prompt_tokens)
            self.metrics.tokens.labels(tier, "completion").inc(completion_tokens)
        if self.query_log is not None:
            self.query_log.append(QueryRecord(
                request_id=request_id, router=decision.router if decision.routed else "none", tier=tier,
                score=decision.score, threshold=decision.thresholds[-1] if decision.thresholds else None,
                tier_chain=outcome.tier_chain, escalated=outcome.escalated, confidences=outcome.confidences,
                cascade_thresholds=outcome.scored_thresholds(self.tier_names), latency_ms=latency_s * 1000,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, status=status_word(status),
                prompt=routing_text,
            ))

