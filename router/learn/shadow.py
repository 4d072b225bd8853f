"""`ShadowRunner`: the candidate router of `router.shadow`, deciding beside the live one.

It decides in the router replica, in the batch that made the live decisions and on the vectors the live router
just embedded, and rides back on the live decision (`RouteDecision.shadow`): no second call, no second
embedding. What it adds to that batch is its own scoring: nothing for `knn` with another threshold (the same
neighbours), a linear model for `classifier`, rules for `heuristic`, one kNN search for `version`. The router
drops the request's shadow rather than let it wait in a queue (`router.shadow.max_queue_wait_s`). The ingress
logs the candidate's decision next to the live one (`QueryRecord.shadow_*`); `tierserve report` compares them
(`serving.querylog.shadow`).

It replaced a second router call per request, which cost about 15% of `auto`'s tokens/s at c=32 in one pair of
runs. Priced by `benchmarks/router_latency.py --shadow`; the figures are in the README (Learning from traffic).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from router.classifier import DifficultyClassifier
from router.core import Router
from router.learn.config import ShadowConfig
from router.scoring import ClassifierRouter, Decider, KnnRouter, Scores, StoreIndex
from router.types import RouteDecision, RouteInput

logger = logging.getLogger(__name__)

SHADOWED = ("knn", "classifier", "heuristic")
"""Live routers whose decisions the candidate is compared with (not a fallback, a session's tier, or the judge,
which decides in the ingress)."""


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

    def attach(self, items: Sequence[RouteInput], decisions: Sequence[RouteDecision]) -> list[RouteDecision]:
        """The live decisions of a batch, with the candidate's beside those that asked for it (`item.shadow`)
        and are worth comparing; a failing candidate is logged and leaves the live decisions as they were."""
        out = list(decisions)
        rows = []
        for i, (item, live) in enumerate(zip(items, decisions, strict=True)):
            if not item.shadow or live.router not in SHADOWED or live.fallback:
                continue
            if self.cfg.candidate == "knn" and live.router == "knn" and live.score is not None:
                # The same store and vectors: the same score, against the candidate's boundaries.
                shadow = self.decider.decide(replace(item, threshold=None, shadow=False), "knn", live.score,
                                             live.reason)
                out[i] = replace(live, shadow=shadow)
            else:
                rows.append(i)
        if not rows:
            return out
        try:
            candidate = self.decide([items[i] for i in rows])
        except Exception:
            logger.warning("shadow router %s failed; the live decisions stand", self.label, exc_info=True)
            return out
        for i, shadow in zip(rows, candidate, strict=True):
            out[i] = replace(out[i], shadow=replace(shadow, neighbors=()))  # the live decision carries them
        return out

    @property
    def instant(self) -> bool:
        """Whether the candidate decides without embedding or searching (`ShadowConfig.needs_vectors`), so it
        may run on the replica's event loop."""
        return not self.cfg.needs_vectors

    def decide(self, items: Sequence[RouteInput]) -> list[RouteDecision]:
        """The candidate's decisions (the per-request threshold is the candidate's own, not the live one's).
        Raises what the candidate raised: a shadow failure is logged by the caller, never served."""
        items = [replace(item, threshold=None, shadow=False) for item in items]
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
