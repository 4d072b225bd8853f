"""One evaluation: build routers on the train split, score the test split, summarize with RouteLLM metrics.

    ds = load_dataset("mmlu", data_dir)
    report = evaluate(ds, ["random", "heuristic", "knn", "classifier"], cache)
    # with the weak model's confidence in the data, cascades sit beside the routers:
    report = evaluate(ds, ["knn", "cascade", "cascade+knn", "cascade-learned"], cache, cost_ratio=1 / 8.75)
    # router.eval.report: write_report(report, out_dir) -> results.json + cost_quality.png; format_table(report)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from router.classifier import DifficultyClassifier
from router.eval import bootstrap, metrics
from router.eval.cascade import (
    CASCADE,
    LEARNED,
    TrainedCascade,
    base_router,
    build_cascades,
    is_cascade,
)
from router.eval.datasets import LabelledSet, difficulty_label
from router.eval.embcache import EmbeddingCache
from router.eval.tuning import train_apgr, tune_classifier, tune_knn
from router.scoring import (
    ClassifierRouter,
    HeuristicRouter,
    KnnRouter,
    MatrixIndex,
    RandomRouter,
    Scorer,
)

logger = logging.getLogger(__name__)

ROUTERS = ("random", "heuristic", "knn", "classifier")
"""Routers built from data alone; `judge` also needs a served small tier (`extra` routers)."""
NEEDS_EMBEDDINGS = {"knn", "classifier"}


@dataclass(frozen=True)
class EvalReport:
    dataset: str
    quality: str
    n_train: int
    n_test: int
    strong_acc: float
    weak_acc: float
    routers: dict[str, metrics.RouterMetrics]
    oracle: metrics.RouterMetrics
    settings: dict = field(default_factory=dict)
    """Per router: the settings chosen on train and their cross-validated APGR."""
    cost_basis: str = "strong calls only"
    """How cost was counted: per-row cost columns, a per-call ratio, or strong calls only."""
    confidence_kind: str | None = None
    """What the weak-confidence column held ("prob" / "logprob"); None without one."""
    comparisons: dict = field(default_factory=dict)
    """Paired bootstrap differences on test, e.g. {"cascade+knn vs cascade": {"apgr": d, "ci95": [lo, hi]}}."""
    recommended: dict = field(default_factory=dict)
    """The router to deploy, chosen on train (`bootstrap.choose_router`), and why."""
    notices: tuple[str, ...] = ()
    """What the loader decided on its own (see `LabelledSet.notices`)."""
    self_hosted: dict = field(default_factory=dict)
    """The same policies priced in GPU time, filled in by whoever knows the tiers' cost (`tierserve eval
    --config`, which also prints it below `format_table`'s table); empty otherwise."""

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "quality": self.quality,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "strong_acc": round(self.strong_acc, 4),
            "weak_acc": round(self.weak_acc, 4),
            "cost_basis": self.cost_basis,
            "weak_confidence_kind": self.confidence_kind,
            "routers": {name: m.to_json() for name, m in self.routers.items()},
            "oracle": self.oracle.to_json(),
            "settings": self.settings,
            "comparisons": self.comparisons,
            "recommended": self.recommended,
            "notices": list(self.notices),
            "self_hosted": self.self_hosted,
        }


@dataclass
class TrainedRouters:
    """Routers fitted on a train split, plus out-of-sample train scores for calibration."""

    routers: dict[str, Scorer]
    train_scores: dict[str, np.ndarray]
    settings: dict
    cascades: dict[str, TrainedCascade] = field(default_factory=dict)
    """Cascade policies (`cascade`, `cascade+<router>`, `cascade-learned`), scored from the weak confidence."""
    embed: object = None
    """The embedder the learned policies use on test prompts."""

    def choice(self, train) -> bootstrap.Choice:
        """The policy to deploy, chosen on train: with cascades, the plain cascade unless another policy beats
        it with 95% confidence (`bootstrap.choose_policy`); without, `bootstrap.choose_router`."""
        strong, weak = train["strong"].to_numpy(float), train["weak"].to_numpy(float)
        if CASCADE in self.cascades:
            names = [n for n in self.train_scores if n != "random"]
            values = {n: train_apgr(self.train_scores[n], strong, weak) for n in names}
            idx = bootstrap.resample_indices(len(train), 200, seed=1)
            base = bootstrap.resampled(self.train_scores[CASCADE], strong, weak, idx)["apgr"]
            diffs = {n: bootstrap.interval(bootstrap.resampled(self.train_scores[n], strong, weak, idx)["apgr"] - base)
                     for n in names if n != CASCADE}
            return bootstrap.choose_policy(values, diffs, baseline=CASCADE)
        names = [n for n in self.routers if n in ROUTERS]
        values = {n: train_apgr(self.train_scores[n], strong, weak) for n in names}
        idx = bootstrap.resample_indices(len(train), 100, seed=1)
        cis = {n: bootstrap.interval(bootstrap.resampled(self.train_scores[n], strong, weak, idx)["apgr"])
               for n in names if n != "random"}
        return bootstrap.choose_router(values, train_apgr_ci=cis)


def build_routers(
    train, names: Sequence[str], cache: EmbeddingCache | None, *, tune: bool = True, progress: bool = True,
    classifier_models: Sequence[str] = ("logreg",), extra: dict[str, Scorer] | None = None,
) -> TrainedRouters:
    """Fit every named router on `train` (a frame with prompt/weak/strong). Only train rows are read.
    `extra` adds ready-made routers (e.g. the judge) that need no training."""
    extra = extra or {}
    cascade_names = [n for n in names if is_cascade(n)]
    names = [n for n in names if n not in extra and not is_cascade(n)]
    # a combined cascade reads its router's score: build the router too
    names += [b for b in map(base_router, cascade_names) if b and b not in names and b not in extra]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown routers {unknown}; choose from {', '.join(ROUTERS)}, cascade, "
                         "cascade+<router>, cascade-learned")
    if cascade_names and "weak_confidence" not in train.columns:
        raise ValueError(f"{cascade_names} need the weak model's confidence per query: pass --weak-confidence-col")
    embedded = NEEDS_EMBEDDINGS & set(names) or LEARNED in cascade_names
    if embedded and cache is None:
        raise ValueError(f"{sorted(NEEDS_EMBEDDINGS & set(names)) or [LEARNED]} need an embedder")
    prompts = train["prompt"].tolist()
    strong, weak = train["strong"].to_numpy(float), train["weak"].to_numpy(float)
    labels = difficulty_label(train)
    vectors = cache.embed(prompts, progress=progress) if embedded else None
    embed = functools.partial(cache.embed, progress=progress) if cache is not None else None
    routers: dict[str, Scorer] = {}
    train_scores: dict[str, np.ndarray] = {}
    settings: dict = {}
    for name in names:
        if name == "random":
            routers[name] = RandomRouter()
            train_scores[name] = routers[name].score(prompts).values
        elif name == "heuristic":
            routers[name] = HeuristicRouter()
            train_scores[name] = routers[name].score(prompts).values
        elif name == "knn":
            grid = {} if tune else {"ks": (10,), "weightings": (("softmax", 0.05),)}
            knn_cfg, tuned = tune_knn(vectors, labels, strong, weak, progress=progress, **grid)
            routers[name] = KnnRouter(embed, MatrixIndex(vectors, labels), knn_cfg)
            train_scores[name] = tuned.oof_scores
            settings[name] = {**tuned.params, "cv_apgr": round(float(tuned.cv_apgr), 4)}
        elif name == "classifier":
            grid = {"models": tuple(classifier_models)} if tune else {"cs": (1.0,), "text_features": (True,)}
            fit_kw, tuned = tune_classifier(
                vectors, labels, strong, weak, prompts, embedder=cache.name, progress=progress, **grid
            )
            use_text = fit_kw.pop("text_features")
            clf = DifficultyClassifier.fit(
                vectors, labels, texts=prompts if use_text else None, trained_on="train", **fit_kw
            )
            routers[name] = ClassifierRouter(embed, clf)
            train_scores[name] = tuned.oof_scores
            settings[name] = {**tuned.params, "cv_apgr": round(float(tuned.cv_apgr), 4)}
    routers.update(extra)
    cascades: dict[str, TrainedCascade] = {}
    if cascade_names:
        confidence = train["weak_confidence"].to_numpy(float)
        cascades, oof, cascade_settings = build_cascades(
            cascade_names, confidence, strong, weak, train_scores, vectors, progress=progress
        )
        train_scores.update(oof)
        settings.update(cascade_settings)
    return TrainedRouters(routers, train_scores, settings, cascades, embed)


def evaluate(
    ds: LabelledSet,
    names: Sequence[str] = ROUTERS,
    cache: EmbeddingCache | None = None,
    *,
    tune: bool = True,
    progress: bool = True,
    num_bins: int = 10,
    classifier_models: Sequence[str] = ("logreg",),
    extra: dict[str, Scorer] | None = None,
    cost_ratio: float | None = None,
    n_boot: int = bootstrap.N_BOOT,
) -> EvalReport:
    """Score `names` on the test split of `ds`, with learned routers fitted on its train split.

    `cost_ratio`: weak/strong cost per call, for data without cost columns (else strong calls are counted).
    """
    train, test = ds.train, ds.test
    if len(test) == 0:
        raise ValueError(f"{ds.name}: the test split is empty")
    learned = NEEDS_EMBEDDINGS & set(names)
    if learned and len(train) < 10:
        raise ValueError(f"{ds.name}: {len(train)} train rows are too few for {sorted(learned)}")
    trained = build_routers(train, names, cache, tune=tune, progress=progress,
                            classifier_models=classifier_models, extra=extra)
    return score_routers(ds, trained, num_bins=num_bins, cost_ratio=cost_ratio, n_boot=n_boot)


def cost_columns(ds: LabelledSet, part, cost_ratio: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-row (strong, weak) cost of one call each, and how they were obtained."""
    n = len(part)
    if {"weak_cost", "strong_cost"} <= set(part.columns) and part["strong_cost"].sum() > 0:
        return part["strong_cost"].to_numpy(float), part["weak_cost"].to_numpy(float), "per-query cost columns"
    if cost_ratio is not None:
        return np.ones(n), np.full(n, float(cost_ratio)), f"weak call = {cost_ratio:.4g} × strong call (--cost-ratio)"
    return np.ones(n), np.zeros(n), "strong calls only (no costs known; weak calls counted as free)"


def score_routers(ds: LabelledSet, trained: TrainedRouters, *, num_bins: int = 10, cost_ratio: float | None = None,
                  n_boot: int = bootstrap.N_BOOT) -> EvalReport:
    """Score already-trained routers and cascades on the test split of `ds`, with bootstrap intervals."""
    train, test = ds.train, ds.test
    strong, weak = test["strong"].to_numpy(float), test["weak"].to_numpy(float)
    s_acc, w_acc = strong.mean() * 100, weak.mean() * 100
    strong_cost, weak_cost, basis = cost_columns(ds, test, cost_ratio)
    prompts = test["prompt"].tolist()
    scored: dict[str, tuple[np.ndarray, np.ndarray | bool, str]] = {}
    router_scores = {}
    for name, router in trained.routers.items():
        router_scores[name] = router.score(prompts).values
        scored[name] = (router_scores[name], False, "router")
    if trained.cascades:
        confidence = test["weak_confidence"].to_numpy(float)
        vectors = trained.embed(prompts) if any(c.learned for c in trained.cascades.values()) else None
        for name, policy in trained.cascades.items():
            out = policy.apply(confidence, router_scores, vectors)
            scored[name] = (out.score, out.weak_first, "cascade")
    indices = bootstrap.resample_indices(len(test), n_boot) if n_boot else None
    results, boots = {}, {}
    for name, (scores, weak_first, kind) in scored.items():
        curve = metrics.threshold_sweep(scores, strong, weak, num_bins, strong_cost=strong_cost, weak_cost=weak_cost,
                                        weak_first=weak_first)
        summary = metrics.summarize(curve, s_acc, w_acc, kind=kind)
        if indices is not None:
            boots[name] = bootstrap.resampled(scores, strong, weak, indices, num_bins)
            summary = replace(summary, ci={k: bootstrap.interval(v) for k, v in boots[name].items()})
        results[name] = summary
        logger.info("%s/%s: CPT50 %.1f%% APGR %.3f", ds.name, name, summary.cpt50, summary.apgr)
    oracle = metrics.summarize(metrics.oracle_curve(strong, weak), s_acc, w_acc, cost_ratio=ds.cost_ratio(test)
                               if basis.startswith("per-query") else (cost_ratio or 0.0))
    comparisons = {}
    if CASCADE in boots:
        for name in boots:
            if is_cascade(name) and name != CASCADE:
                diff = boots[name]["apgr"] - boots[CASCADE]["apgr"]
                comparisons[f"{name} vs {CASCADE}"] = {
                    "apgr": round(results[name].apgr - results[CASCADE].apgr, 4),
                    "ci95": [round(v, 4) for v in bootstrap.interval(diff)],
                }
    routed = [n for n in trained.routers if n in ROUTERS and n != "random"]
    recommended = trained.choice(train).to_json() if routed or CASCADE in trained.cascades else {}
    return EvalReport(ds.name, ds.quality, len(train), len(test), s_acc, w_acc, results, oracle, trained.settings,
                      cost_basis=basis, confidence_kind=ds.confidence_kind, comparisons=comparisons,
                      recommended=recommended, notices=ds.notices)
