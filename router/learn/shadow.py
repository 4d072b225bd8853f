"""`ShadowRunner`: the candidate router of `router.shadow`, deciding beside the live one.

It runs in the router replica after the live decision has been handed back (the ingress asks for it off the
request's path), reuses the vectors the live router just embedded, and skips a request rather than queue
behind served decisions. Its decision is logged next to the live one (`QueryRecord.shadow_*`);
`tierserve report` compares them (`serving.querylog.shadow`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from router.classifier import DifficultyClassifier
from router.core import Router, StoreIndex
from router.decide import Decider
from router.learn.config import ShadowConfig
from router.learn.rules import sampled
from router.scorers import ClassifierRouter, KnnRouter, Scores
from router.types import RouteDecision, RouteInput


class ShadowRunner:
    """Decides routed requests with the candidate router."""

    def __init__(self, cfg: ShadowConfig, router: Router, data_dir: str | Path) -> None:
        self.cfg = cfg
        self.router = router
        rcfg = router.cfg if cfg.threshold is None else router.cfg.model_copy(
            update={"thresholds": [*router.decider.thresholds[:-1], cfg.threshold]})
        self.decider = Decider(rcfg, router.tier_names)
        self.classifier: DifficultyClassifier | None = None
        if cfg.candidate == "classifier":
            path = Path(cfg.classifier_path).expanduser()
            path = path if path.is_absolute() else Path(data_dir).expanduser() / path
            self.classifier = DifficultyClassifier.load(path, embedder_name=router.embedder.name,
                                                        dim=router.embedder.dim)

    @property
    def label(self) -> str:
        """How the query log names the candidate (`ShadowConfig.label`)."""
        return self.cfg.label

    def wanted(self, request_key: str) -> bool:
        """Whether this request is in the candidate's sample (deterministic per request id)."""
        return sampled(request_key, self.cfg.sample_rate, salt="shadow")

    def decide(self, items: Sequence[RouteInput]) -> list[RouteDecision]:
        """The candidate's decisions (the per-request threshold is the candidate's own, not the live one's).
        Raises what the candidate raised: a shadow failure is logged by the caller, never served."""
        items = [replace(item, threshold=None) for item in items]
        texts = [item.text for item in items]
        kind = "knn"
        if self.cfg.candidate == "heuristic":
            scores, kind = self.decider.heuristic.score(texts), "heuristic"
        elif self.cfg.candidate == "classifier":
            scores, kind = ClassifierRouter(self.router.embed_recent, self.classifier).score(texts), "classifier"
        else:
            scores = self._knn(texts)
        return [self.decider.decide(item, kind, float(v), reason)
                for item, v, reason in zip(items, scores.values, scores.reasons)]

    def _knn(self, texts: list[str]) -> Scores:
        store = self.router.store
        if store is None:
            raise RuntimeError("the exemplar store is unavailable")
        version = self.cfg.version if self.cfg.candidate == "version" else None
        index = StoreIndex(store, lambda label: self.router._difficulty(label, strict=False), version=version)
        return KnnRouter(self.router.embed_recent, index, self.router.cfg.knn).score_vectors(
            self.router.embed_recent(texts))
