"""One evaluation: build routers on the train split, score the test split, summarize with RouteLLM metrics.

    ds = load_dataset("mmlu", data_dir)
    report = evaluate(ds, ["random", "heuristic", "knn", "classifier"], cache)
    write_report(report, out_dir)         # results.json + cost_quality.png
    print(format_table(report))
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from router.classifier import DifficultyClassifier
from router.eval import metrics
from router.eval.datasets import LabelledSet, difficulty_label
from router.eval.embcache import EmbeddingCache
from router.eval.routers import ClassifierRouter, EvalRouter, HeuristicRouter, KnnRouter, RandomRouter
from router.eval.tuning import tune_classifier, tune_knn

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

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "quality": self.quality,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "strong_acc": round(self.strong_acc, 4),
            "weak_acc": round(self.weak_acc, 4),
            "routers": {name: m.to_json() for name, m in self.routers.items()},
            "oracle": self.oracle.to_json(),
            "settings": self.settings,
        }


@dataclass
class TrainedRouters:
    """Routers fitted on a train split, plus out-of-sample train scores for calibration."""

    routers: dict[str, EvalRouter]
    train_scores: dict[str, np.ndarray]
    settings: dict


def build_routers(
    train, names: Sequence[str], cache: EmbeddingCache | None, *, tune: bool = True, progress: bool = True,
    classifier_models: Sequence[str] = ("logreg",), extra: dict[str, EvalRouter] | None = None,
) -> TrainedRouters:
    """Fit every named router on `train` (a frame with prompt/weak/strong). Only train rows are read.
    `extra` adds ready-made routers (e.g. the judge) that need no training."""
    extra = extra or {}
    names = [n for n in names if n not in extra]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown routers {unknown}; choose from {', '.join(ROUTERS)}")
    if NEEDS_EMBEDDINGS & set(names) and cache is None:
        raise ValueError(f"routers {sorted(NEEDS_EMBEDDINGS & set(names))} need an embedder")
    prompts = train["prompt"].tolist()
    strong, weak = train["strong"].to_numpy(float), train["weak"].to_numpy(float)
    labels = difficulty_label(train)
    vectors = cache.embed(prompts, progress=progress) if NEEDS_EMBEDDINGS & set(names) else None
    embed = functools.partial(cache.embed, progress=progress) if cache is not None else None
    routers: dict[str, EvalRouter] = {}
    train_scores: dict[str, np.ndarray] = {}
    settings: dict = {}
    for name in names:
        if name == "random":
            routers[name] = RandomRouter()
            train_scores[name] = routers[name].score(prompts)
        elif name == "heuristic":
            routers[name] = HeuristicRouter()
            train_scores[name] = routers[name].score(prompts)
        elif name == "knn":
            grid = {} if tune else {"ks": (10,), "weightings": (("softmax", 0.05),)}
            knn_cfg, tuned = tune_knn(vectors, labels, strong, weak, progress=progress, **grid)
            routers[name] = KnnRouter(embed, vectors, labels, knn_cfg)
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
    return TrainedRouters(routers, train_scores, settings)


def evaluate(
    ds: LabelledSet,
    names: Sequence[str] = ROUTERS,
    cache: EmbeddingCache | None = None,
    *,
    tune: bool = True,
    progress: bool = True,
    num_bins: int = 10,
    classifier_models: Sequence[str] = ("logreg",),
    extra: dict[str, EvalRouter] | None = None,
) -> EvalReport:
    """Score `names` on the test split of `ds`, with learned routers fitted on its train split."""
    train, test = ds.train, ds.test
    if len(test) == 0:
        raise ValueError(f"{ds.name}: the test split is empty")
    learned = NEEDS_EMBEDDINGS & set(names)
    if learned and len(train) < 10:
        raise ValueError(f"{ds.name}: {len(train)} train rows are too few for {sorted(learned)}")
    trained = build_routers(train, names, cache, tune=tune, progress=progress,
                            classifier_models=classifier_models, extra=extra)
    return score_routers(ds, trained, num_bins=num_bins)


def score_routers(ds: LabelledSet, trained: TrainedRouters, *, num_bins: int = 10) -> EvalReport:
    """Score already-trained routers on the test split of `ds`."""
    train, test = ds.train, ds.test
    strong, weak = test["strong"].to_numpy(float), test["weak"].to_numpy(float)
    s_acc, w_acc = strong.mean() * 100, weak.mean() * 100
    ratio = ds.cost_ratio(test)
    prompts = test["prompt"].tolist()
    results = {}
    for name, router in trained.routers.items():
        scores = router.score(prompts)
        curve = metrics.threshold_sweep(scores, strong, weak, num_bins)
        results[name] = metrics.summarize(curve, s_acc, w_acc, cost_ratio=ratio)
        logger.info("%s/%s: CPT50 %.1f%% APGR %.3f", ds.name, name, results[name].cpt50, results[name].apgr)
    oracle = metrics.summarize(metrics.oracle_curve(strong, weak), s_acc, w_acc, cost_ratio=ratio)
    return EvalReport(ds.name, ds.quality, len(train), len(test), s_acc, w_acc, results, oracle, trained.settings)


def format_table(report: EvalReport) -> str:
    """Plain-text table of the report, one row per router plus the oracle."""
    head = (f"{report.dataset}: n_test={report.n_test}  strong={report.strong_acc:.2f}  "
            f"weak={report.weak_acc:.2f}  ({report.quality}, %)")
    cols = f"{'router':<12}{'CPT20%':>8}{'CPT50%':>8}{'CPT80%':>8}{'AUC':>8}{'APGR':>7}{'@95%':>8}{'saved':>7}"
    rows = [head, cols, "-" * len(cols)]
    for name, m in [*report.routers.items(), ("oracle", report.oracle)]:
        flag = "" if m.monotone else "  (non-monotone)"
        rows.append(f"{name:<12}{m.cpt20:>8.1f}{m.cpt50:>8.1f}{m.cpt80:>8.1f}{m.auc:>8.2f}{m.apgr:>7.3f}"
                    f"{m.strong_pct_at_95:>8.1f}{m.cost_saved_at_95 * 100:>6.1f}%{flag}")
    return "\n".join(rows)


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `results.json` and `cost_quality.png` into `out_dir`."""
    from router.eval.plot import plot_cost_quality

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    png_path = plot_cost_quality(report, out / "cost_quality.png")
    return json_path, png_path
