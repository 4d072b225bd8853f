"""The scripted engine tuned to find the plumbing's ceiling: it offers far more tokens than any path carries."""

from __future__ import annotations

from serving.engines.scripted import ScriptedEngine


class PlumbingEngine(ScriptedEngine):
    """1,000 steps/s: 32 streams are offered 32,000 tokens/s, so what comes out is what the path carries."""

    tokens_per_s = 1000.0
    answer_tokens = 64
