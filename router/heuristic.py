"""Heuristic router: difficulty from length and keyword / task-type rules. Pure; no model, no store.

Usable on its own (`router: heuristic`) and the automatic fallback when the embedder or the store fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from router.config import HeuristicConfig


@dataclass(frozen=True)
class HeuristicScore:
    score: float
    """Difficulty in [0, 1]."""
    reason: str
    """What contributed, e.g. `base 0.35, length +0.08, rules: code +0.20`."""


class HeuristicScorer:
    """Scores texts with the rules of one `HeuristicConfig` (patterns compiled once)."""

    def __init__(self, cfg: HeuristicConfig) -> None:
        self._cfg = cfg
        self._rules = [
            (rule.name, rule.weight, re.compile("|".join(f"(?:{p})" for p in rule.patterns), re.IGNORECASE))
            for rule in cfg.rules
        ]

    def score(self, text: str) -> HeuristicScore:
        cfg = self._cfg
        span = cfg.long_chars - cfg.short_chars
        ramp = min(max(len(text) - cfg.short_chars, 0) / span, 1.0)
        length_bonus = cfg.length_weight * ramp
        matched = [(name, weight) for name, weight, pattern in self._rules if pattern.search(text)]
        raw = cfg.base_score + length_bonus + sum(weight for _, weight in matched)
        score = min(max(raw, 0.0), 1.0)
        parts = [f"base {cfg.base_score:.2f}", f"length {len(text)} chars +{length_bonus:.2f}"]
        if matched:
            parts.append("rules: " + ", ".join(f"{name} {weight:+.2f}" for name, weight in matched))
        return HeuristicScore(score=score, reason="heuristic: " + ", ".join(parts))
