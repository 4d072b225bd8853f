"""Does the static embedder route as well as its teacher? kNN CPT(50%) per shared routing set, side by side.

    .venv/bin/python -m benchmarks.embedder_quality [--datasets mmlu,gsm8k,...] [--bge-m3 DIR] [--limit N]

For each teacher (the bundled MiniLM; BGE-M3 too where `--bge-m3` or `$TIERSERVE_BGE_M3` names its directory) and
the static embedder distilled from it (`router.embed.static`, the `backend: static` the router serves), the
evaluation harness (`router.eval.runner.evaluate`, as `tierserve eval` runs it) tunes and fits kNN on each set's
train split only and scores its test split. The static embedder qualifies on a set when its CPT(50%) is at most
`MAX_LOSS_POINTS` above its teacher's (a lower CPT is better: fewer strong calls for half the quality gap).
Writes `benchmarks/embedder_quality.md` (or `--out`) and prints it. `--limit N` keeps N train and N test rows per
set (a smoke run; its table says so and is not the measurement).

The static embedder is fitted (`router.embed.static.fit`) on the texts a router would hold as exemplars: the
shipped default exemplars and the train splits of all the sets measured, one model for all of them (as one router
serves all traffic); never on a test split.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from router.config import EmbedderConfig
from router.embed import build_embedder
from router.eval.datasets import (
    BUILTIN,
    CASCADE_BUILTIN,
    default_data_dir,
    load_dataset,
)
from router.eval.embcache import EmbeddingCache
from router.eval.labelled import LabelledSet
from router.eval import bootstrap, metrics
from router.eval.runner import build_routers, score_routers
from router.exemplars import load_default_exemplars
from router.overflow import MARGIN_QUANTILE, static_margin
from router.scoring import KnnRouter

ROOT = Path(__file__).resolve().parents[1]
MD = ROOT / "benchmarks" / "embedder_quality.md"
DATASETS = (*BUILTIN, *CASCADE_BUILTIN)
MAX_LOSS_POINTS = 1.0
"""Most the static embedder's kNN CPT(50%) may exceed its teacher's, in points of strong-call share."""
ROUTER = "knn"
"""The router the stack serves with the embedder (`router.default_router`)."""
QUANTILES = (0.9, 0.95, 0.975, 0.99, 0.995, 1.0)
"""The first pass's margin quantiles tried by cross-validation on the train splits (`choose_quantile`)."""


@dataclass(frozen=True)
class Row:
    dataset: str
    n_train: int
    n_test: int
    teacher: str
    teacher_cpt50: float
    teacher_ci: tuple[float, float]
    static_cpt50: float
    static_ci: tuple[float, float]
    teacher_apgr: float
    static_apgr: float
    first_cpt50: float = float("nan")
    """The static first pass with the teacher near a boundary (`router.static_first`), CPT(50%)."""
    first_share: float = float("nan")
    """Share of the test rows the first pass decides (mean over the sweep's thresholds), in percent."""
    margin: float = float("nan")
    first_loss_ci: tuple[float, float] = (float("nan"), float("nan"))
    """95% paired bootstrap interval of `first_loss` (the same resampled test rows for both)."""

    @property
    def loss(self) -> float:
        """Points of strong-call share the static embedder needs more than its teacher (negative: fewer)."""
        return self.static_cpt50 - self.teacher_cpt50

    @property
    def qualifies(self) -> bool:
        return self.loss <= MAX_LOSS_POINTS

    @property
    def first_loss(self) -> float:
        return self.first_cpt50 - self.teacher_cpt50

    @property
    def first_qualifies(self) -> bool:
        return self.first_loss <= MAX_LOSS_POINTS


def limited(ds, n: int | None):
    """The first `n` train and `n` test rows of `ds` (a smoke run), or `ds`."""
    if n is None:
        return ds
    frame = ds.frame
    keep = np.concatenate([np.flatnonzero(frame["split"].to_numpy() == s)[:n] for s in ("train", "test")])
    return replace(ds, frame=frame.iloc[np.sort(keep)].reset_index(drop=True))


def fit_corpus(sets: Sequence[LabelledSet], fold: int | None = None) -> list[str]:
    """The static embedder's fitting texts: the shipped exemplars and the train splits of `sets`, no test row;
    with `fold` (0 or 1), only the train rows of that cross-validation fold's fitting half (`halves`)."""
    texts = {e.text for e in load_default_exemplars()}
    for ds in sets:
        prompts = ds.train["prompt"].reset_index(drop=True)
        texts.update(prompts if fold is None else prompts[halves(len(prompts))[fold]])
    return sorted(texts)


def halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The two cross-validation folds of `n` train rows: each a mask of the half fitted on (seeded)."""
    half = np.zeros(n, dtype=bool)
    half[np.random.default_rng(0).permutation(n)[: n // 2]] = True
    return half, ~half


def measure(ds: LabelledSet, teacher: EmbeddingCache, static: EmbeddingCache, *, limit: int | None, n_boot: int) -> Row:
    trained, reports = {}, {}
    for label, cache in (("teacher", teacher), ("static", static)):
        # kNN settings are tuned on train for each embedder, as the stack's operator would (tierserve eval).
        trained[label] = build_routers(ds.train, [ROUTER], cache, tune=limit is None, progress=False)
        reports[label] = score_routers(ds, trained[label], n_boot=n_boot).routers[ROUTER]

    def ci(m) -> tuple[float, float]:
        pair = (m.ci or {}).get("cpt50")
        return (float(pair[0]), float(pair[1])) if pair else (float("nan"), float("nan"))

    t, s = reports["teacher"], reports["static"]
    scores = pass_scores(ds, trained["teacher"].routers[ROUTER], trained["static"].routers[ROUTER])
    first, share, margin, diff_ci, _ = first_pass(ds, scores, n_boot)
    return Row(ds.name, len(ds.train), len(ds.test), teacher.name, t.cpt50, ci(t), s.cpt50, ci(s), t.apgr, s.apgr,
               first, share, margin, diff_ci)


@dataclass(frozen=True)
class PassScores:
    """What the first pass is measured on, scored once per split: the train rows each scored without itself,
    and the test rows, by the teacher (`exact`) and by the static embedder (`fast`)."""

    exact_train: np.ndarray
    fast_train: np.ndarray
    exact_test: np.ndarray
    fast_test: np.ndarray


def pass_scores(ds: LabelledSet, exact: KnnRouter, fast: KnnRouter) -> PassScores:
    def left_out(router: KnnRouter) -> np.ndarray:
        index = replace(router.index, exclude_self=True)
        return KnnRouter(router.embed, index, router.knn).score_vectors(router.index.vectors).values

    prompts = ds.test["prompt"].tolist()
    return PassScores(left_out(exact), left_out(fast), exact.score(prompts).values, fast.score(prompts).values)


def first_pass(ds: LabelledSet, scores: PassScores, n_boot: int = 0, quantile: float = MARGIN_QUANTILE
               ) -> tuple[float, float, float, tuple[float, float], float]:
    """CPT(50%) of the static first pass as the stack runs it (`router.overflow`), the share it decides, its
    margin, the 95% paired bootstrap interval of its CPT(50%) less the teacher's (NaN without `n_boot`), and the
    teacher's own CPT(50%) on the same sweep. The margin is measured on the train split (each row scored without
    itself by both, `static_margin` at `quantile`); at each threshold of the sweep a test row is decided by its
    static score, or by the teacher's where the static score is within the margin of the threshold."""
    margin = static_margin(scores.fast_train, scores.exact_train, quantile)
    exact_s, fast_s = scores.exact_test, scores.fast_test
    strong, weak = ds.test["strong"].to_numpy(float), ds.test["weak"].to_numpy(float)

    def cpt50(rows: np.ndarray, first: bool) -> tuple[float, float]:
        """CPT(50%) and the share decided first on `rows`; `first=False`: the teacher alone."""
        e, f, st, wk = exact_s[rows], fast_s[rows], strong[rows], weak[rows]
        edges = metrics.decile_thresholds(e)
        pct, quality, shares = [], [], []
        for i, t in enumerate(edges):
            above = (lambda v: v > t) if i == len(edges) - 1 else (lambda v: v >= t)  # as `threshold_sweep`
            near = np.abs(f - t) < margin if first else np.ones(len(f), dtype=bool)
            selected = np.where(near, above(e), above(f))
            pct.append(selected.mean() * 100)
            quality.append(np.where(selected, st, wk).mean() * 100)
            shares.append((1 - near.mean()) * 100)
        order = np.argsort(pct, kind="stable")
        curve = metrics.Curve(np.asarray(pct)[order], np.asarray(quality)[order], edges[order])
        return metrics.summarize(curve, st.mean() * 100, wk.mean() * 100).cpt50, float(np.mean(shares))

    every = np.arange(len(exact_s))
    first, share = cpt50(every, True)
    diffs = [cpt50(rows, True)[0] - cpt50(rows, False)[0] for rows in bootstrap.resample_indices(len(every), n_boot)]
    interval = bootstrap.interval(np.asarray(diffs)) if n_boot else (float("nan"),) * 2
    return first, share, margin, interval, cpt50(every, False)[0]


@dataclass(frozen=True)
class QuantileTrial:
    """The first pass at one margin quantile, cross-validated on one set's train split."""
    dataset: str
    quantile: float
    loss: float
    """Its CPT(50%) less the teacher's, points, mean of the two folds."""
    share: float
    """Share of the held-out fold it decides, percent, mean of the two folds."""


def cross_validate(ds: LabelledSet, teacher: EmbeddingCache, statics: Sequence[EmbeddingCache], *, tune: bool
                   ) -> list[QuantileTrial]:
    """The first pass at each of `QUANTILES` on `ds`'s train split alone: two folds, each fitted on one half and
    scored on the other, with `statics[i]` the static embedder fitted on fold i's half (`fit_corpus`), so the
    held-out rows were never fitted on. The test split is never read, so the quantile it picks is not fitted to
    the table's."""
    train = ds.train.reset_index(drop=True)
    results: dict[float, list[tuple[float, float]]] = {q: [] for q in QUANTILES}
    for fold, static in zip(halves(len(train)), statics, strict=True):
        split = replace(ds, frame=train.assign(split=np.where(fold, "train", "test")))
        routers = [build_routers(split.train, [ROUTER], cache, tune=tune, progress=False).routers[ROUTER]
                   for cache in (teacher, static)]
        scores = pass_scores(split, *routers)  # once per fold; each quantile is a margin over the same scores
        for q in QUANTILES:
            first, share, _, _, alone = first_pass(split, scores, quantile=q)
            results[q].append((first - alone, share))
    return [QuantileTrial(ds.name, q, float(np.mean([loss for loss, _ in r])), float(np.mean([s for _, s in r])))
            for q, r in results.items()]


def choose_quantile(trials: Sequence[QuantileTrial]) -> float:
    """The smallest quantile (the most requests decided first) whose cross-validated loss is within
    `MAX_LOSS_POINTS` on every set; 1.0 (the largest error seen) where none is."""
    fine = [q for q in QUANTILES if all(t.loss <= MAX_LOSS_POINTS for t in trials if t.quantile == q)]
    return min(fine, default=1.0)


def render(rows: list[Row], trials: Sequence[QuantileTrial], *, limit: int | None, seconds: float) -> str:
    lines = [
        "# Static embedder vs its teacher: routing quality",
        "",
        "Generated by `python -m benchmarks.embedder_quality`; do not edit by hand. "
        f"Python {platform.python_version()}, {seconds:.0f} s.",
        "",
        f"kNN (the router the stack serves) tuned and fitted on each set's train split, scored on its test split by "
        "the evaluation harness (`router.eval.runner.evaluate`, as `tierserve eval`). CPT(50%): strong-model calls "
        "needed to recover half of the weak→strong quality gap (lower is better); brackets are 95% bootstrap "
        f"intervals over the test rows. The static embedder qualifies on a set when its CPT(50%) is at most "
        f"{MAX_LOSS_POINTS:g} point above its teacher's. The first pass (`router.static_first`, as "
        "`router.overflow` runs it): at each threshold of the sweep a test row is decided by its static score "
        "unless that is within the margin of the threshold, where the teacher's decides; the margin is measured "
        "on the train split (each row scored without itself by both embedders, the "
        f"{MARGIN_QUANTILE:g} quantile of the difference, as `router.overflow.MARGIN_QUANTILE`); its difference "
        "from the teacher has a paired bootstrap interval (the same resampled test rows for both).",
        "",
    ]
    if limit is not None:
        lines += [f"**Smoke run on {limit} train and {limit} test rows per set, untuned kNN: not the measurement.**",
                  ""]
    lines += ["| dataset | n train / test | teacher | teacher CPT(50%) | static CPT(50%) | static − teacher | "
              "APGR teacher / static | qualifies | first pass CPT(50%) | first − teacher | decided first "
              "(margin) | qualifies |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.dataset} | {r.n_train} / {r.n_test} | {r.teacher} | {r.teacher_cpt50:.1f}% "
            f"[{r.teacher_ci[0]:.1f}, {r.teacher_ci[1]:.1f}] | {r.static_cpt50:.1f}% [{r.static_ci[0]:.1f}, "
            f"{r.static_ci[1]:.1f}] | {r.loss:+.1f} | {r.teacher_apgr:.3f} / {r.static_apgr:.3f} | "
            f"{'yes' if r.qualifies else '**no**'} | {r.first_cpt50:.1f}% | {r.first_loss:+.1f} "
            f"[{r.first_loss_ci[0]:+.1f}, {r.first_loss_ci[1]:+.1f}] | "
            f"{r.first_share:.0f}% ({r.margin:.3f}) | {'yes' if r.first_qualifies else '**no**'} |")
    by_teacher: dict[str, list[Row]] = {}
    for r in rows:
        by_teacher.setdefault(r.teacher, []).append(r)
    lines.append("")
    for teacher, group in by_teacher.items():
        failed = [r.dataset for r in group if not r.qualifies]
        verdict = ("qualifies on every set" if not failed
                   else f"does not qualify ({', '.join(failed)} lose more than {MAX_LOSS_POINTS:g} point)")
        lines.append(f"- Static embedder of `{teacher}`: {verdict}.")
        failed = [r.dataset for r in group if not r.first_qualifies]
        verdict = ("qualifies on every set" if not failed
                   else f"does not qualify ({', '.join(failed)} lose more than {MAX_LOSS_POINTS:g} point)")
        lines.append(f"- Static first pass with `{teacher}` near a boundary (`router.static_first`): {verdict}; it "
                     f"decides {min(r.first_share for r in group):.0f}-{max(r.first_share for r in group):.0f}% "
                     "of the test rows (mean over the sweep's thresholds).")
    if trials:
        lines += quantile_table(trials)
    return "\n".join(lines) + "\n"


def quantile_table(trials: Sequence[QuantileTrial]) -> list[str]:
    """The cross-validation that picks the margin's quantile, one row per set, and the pick."""
    chosen = choose_quantile(trials)
    lines = ["", "## The margin's quantile, chosen on the train splits", "",
             "Each set's train split cut in two halves (seeded); kNN and the static embedder (one per fold, on "
             "the shipped exemplars and that half of every set) fitted on one half, the first pass scored on "
             "the other, and the other way round. First-pass CPT(50%) less the teacher's (mean of the two folds; "
             "in brackets the share of the held-out rows it decides). The pick is the smallest quantile within "
             f"{MAX_LOSS_POINTS:g} point on every set; the test split above is never read for it.", "",
             "| dataset | " + " | ".join(f"q={q:g}" for q in QUANTILES) + " |",
             "|---|" + "---|" * len(QUANTILES)]
    for name in dict.fromkeys(t.dataset for t in trials):
        cells = {t.quantile: t for t in trials if t.dataset == name}
        lines.append(f"| {name} | " + " | ".join(f"{cells[q].loss:+.1f} ({cells[q].share:.0f}%)"
                                                  for q in QUANTILES) + " |")
    agrees = "the router ships it" if chosen == MARGIN_QUANTILE else f"the router ships {MARGIN_QUANTILE:g}"
    lines += ["", f"- Picked: q={chosen:g} ({agrees}, `router.overflow.MARGIN_QUANTILE`)."]
    return lines


def teachers(bge_m3: str | None, threads: int) -> list[EmbedderConfig]:
    """The teachers to compare: the bundled MiniLM, and BGE-M3 where its directory is given."""
    found = [EmbedderConfig(num_threads=threads)]
    if bge_m3:
        found.append(EmbedderConfig(kind="bge-m3", model_path=bge_m3, num_threads=threads))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--bge-m3", default=os.environ.get("TIERSERVE_BGE_M3"),
                        help="BGE-M3 directory (default: $TIERSERVE_BGE_M3); without it MiniLM only")
    parser.add_argument("--limit", type=int, default=None, help="rows per split (smoke run)")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="tierserve data dir for the static models and the eval embedding cache "
                             "(default: $TIERSERVE_DATA_DIR or ~/.cache/tierserve)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the teachers")
    parser.add_argument("--out", type=Path, default=MD)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data_dir = (args.cache_dir or Path(os.environ.get("TIERSERVE_DATA_DIR") or "~/.cache/tierserve")).expanduser()
    started = time.time()
    rows, trials = [], []
    sets = [limited(load_dataset(name, args.data_dir), args.limit) for name in args.datasets.split(",")]
    for cfg in teachers(args.bge_m3, args.threads):
        teacher = EmbeddingCache(build_embedder(cfg, data_dir), data_dir / "eval-cache")

        def fitted(corpus: list[str]) -> EmbeddingCache:
            fit_started = time.time()
            static = EmbeddingCache(build_embedder(cfg.model_copy(update={"backend": "static"}), data_dir,
                                                   corpus=corpus), data_dir / "eval-cache")
            print(f"static embedder of {teacher.name}: {static.name}, fitted on {len(corpus)} texts "
                  f"(ready in {time.time() - fit_started:.0f} s)", flush=True)
            return static

        static = fitted(fit_corpus(sets))
        # The teacher whose first pass the stack runs by default: its margin's quantile, cross-validated.
        folds = [fitted(fit_corpus(sets, fold)) for fold in (0, 1)] if cfg.kind == "minilm" else []
        for ds in sets:
            rows.append(measure(ds, teacher, static, limit=args.limit, n_boot=args.bootstrap))
            if folds:
                trials += cross_validate(ds, teacher, folds, tune=args.limit is None)
            print(f"{ds.name}: teacher {rows[-1].teacher_cpt50:.1f}%, static {rows[-1].static_cpt50:.1f}%",
                  flush=True)
    text = render(rows, trials, limit=args.limit, seconds=time.time() - started)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
