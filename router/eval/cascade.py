"""Cascade policies evaluated offline, beside the routers, from the weak model's recorded confidence.

A cascade always calls the weak model first and escalates to the strong one when its answer looks unsure.
On labelled data that is one more score per query (higher = escalate sooner), so the decile sweep, CPT and
APGR of `metrics` apply unchanged; what differs is the bill: an escalated query pays both calls. Each policy
therefore returns, beside its score, which rows pay the weak call before the strong one (`weak_first`).

- `cascade`: the confidence alone, escalate when confidence < threshold (what serving does today).
- `cascade+<router>`: route the clearly hard straight to the strong model (no weak call), answer the clearly
  easy with the weak one, cascade the band between on confidence. Two router-score cut-offs, tuned on train.
- `cascade-learned`: an escalation model on [prompt embedding, confidence features] that estimates the gain
  of escalating each answer (the rational-cascade / meta-verifier idea), its form and regularization chosen
  by k-fold CV on train.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from router.eval.tuning import train_apgr

logger = logging.getLogger(__name__)

CASCADE = "cascade"
LEARNED = "cascade-learned"
COMBINED_PREFIX = "cascade+"
BAND_LOW_QUANTILES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
"""Router-score quantiles (on train) below which the weak answer is kept without looking at its confidence."""
BAND_HIGH_QUANTILES = (0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
"""Router-score quantiles above which a query goes straight to the strong model (1.0: none does)."""
LEARNED_CS = (0.03, 0.1, 0.3, 1.0, 3.0)


def is_cascade(name: str) -> bool:
    return name == CASCADE or name == LEARNED or name.startswith(COMBINED_PREFIX)


@dataclass(frozen=True)
class CascadeScores:
    """What a cascade policy says about each query."""

    score: np.ndarray
    """Higher = sent to the strong model sooner; a threshold on it is one operating point."""
    weak_first: np.ndarray
    """True where the strong call, if made, comes after a weak call that is thrown away."""


def confidence_features(confidence: np.ndarray) -> np.ndarray:
    """(n, 3): the probability, its log and its logit, the last two clipped to stay finite at 0 and 1."""
    c = np.clip(np.asarray(confidence, dtype=float), 1e-6, 1 - 1e-6)
    return np.column_stack([c, np.log(c), np.log(c) - np.log1p(-c)])


def confidence_cascade(confidence: np.ndarray) -> CascadeScores:
    """The confidence-only cascade: escalate the least confident first."""
    c = np.asarray(confidence, dtype=float)
    return CascadeScores(1.0 - c, np.ones(len(c), dtype=bool))


@dataclass(frozen=True)
class BandPolicy:
    """Two cut-offs on a router's score around a confidence cascade.

    score >= `high`: straight to the strong model, in router-score order (no weak call);
    `low` <= score < `high`: the cascade band, escalated by confidence;
    score < `low`: the weak answer stands, escalated only when the sweep has run out of everything else.
    """

    low: float
    high: float

    def apply(self, router_score: np.ndarray, confidence: np.ndarray) -> CascadeScores:
        r, c = np.asarray(router_score, dtype=float), np.asarray(confidence, dtype=float)
        hard, easy = r >= self.high, r < self.low
        # three stacked ranges: easy in [0, 1], band in [1, 2], hard in [2, 3]
        score = np.where(hard, 2.0 + r, np.where(easy, 1.0 - c, 2.0 - c))
        return CascadeScores(score, ~hard)


@dataclass(frozen=True)
class TunedBand:
    policy: BandPolicy
    quantiles: tuple[float, float]
    train_apgr: float
    """APGR on train with the router's out-of-sample scores, at the chosen cut-offs."""
    cv_apgr: float
    """APGR of cut-offs chosen on 4/5 of train, scored on the held-out fifth (mean over folds)."""
    oof_scores: np.ndarray | None = None
    """Each train row scored by the cut-offs chosen on the other folds (out of sample)."""


def _best_band(r: np.ndarray, c: np.ndarray, strong: np.ndarray, weak: np.ndarray,
               quantile_edges: np.ndarray) -> tuple[float, tuple[float, float], BandPolicy]:
    best: tuple[float, tuple[float, float], BandPolicy] | None = None
    for lo_q in BAND_LOW_QUANTILES:
        for hi_q in BAND_HIGH_QUANTILES:
            if hi_q <= lo_q:
                continue
            lo = float(np.quantile(quantile_edges, lo_q)) if lo_q > 0 else -np.inf
            hi = float(np.quantile(quantile_edges, hi_q)) if hi_q < 1 else np.inf
            policy = BandPolicy(lo, hi)
            value = train_apgr(policy.apply(r, c).score, strong, weak)
            if best is None or value > best[0] + 1e-12:
                best = (value, (lo_q, hi_q), policy)
    return best


def tune_band(router_oof: np.ndarray, confidence: np.ndarray, strong: np.ndarray, weak: np.ndarray, *,
              folds: int = 5, seed: int = 0) -> TunedBand:
    """Pick the band's cut-offs (as train quantiles of the router score) by APGR on train.

    `router_oof` must be out-of-sample router scores of the train rows (leave-one-out / k-fold), else the
    band would trust a router that has memorized its own labels.
    """
    r, c = np.asarray(router_oof, dtype=float), np.asarray(confidence, dtype=float)
    strong, weak = np.asarray(strong, dtype=float), np.asarray(weak, dtype=float)
    fold = np.random.default_rng(seed).permutation(len(r)) % folds
    held = []
    oof = np.empty(len(r))
    for f in range(folds):
        tr, te = fold != f, fold == f
        _, _, policy = _best_band(r[tr], c[tr], strong[tr], weak[tr], r[tr])
        oof[te] = policy.apply(r[te], c[te]).score
        held.append(train_apgr(oof[te], strong[te], weak[te]))
    value, quantiles, policy = _best_band(r, c, strong, weak, r)
    return TunedBand(policy, quantiles, value, float(np.mean(held)), oof)


def _fit_soft(x: np.ndarray, y: np.ndarray, c: float):
    """Logistic regression on soft labels in [0, 1]: a positive row weighted y, a negative row weighted 1 − y,
    so the predicted probability estimates the expected label."""
    from sklearn.linear_model import LogisticRegression

    y = np.clip(np.asarray(y, dtype=float), 0.0, 1.0)
    xx, yy, ww = np.vstack([x, x]), np.r_[np.ones(len(y)), np.zeros(len(y))], np.r_[y, 1.0 - y]
    keep = ww > 0
    return LogisticRegression(C=c, max_iter=3000).fit(xx[keep], yy[keep], sample_weight=ww[keep])


@dataclass
class LearnedEscalation:
    """An escalation model on [prompt embedding, confidence features] that estimates the gain of escalating.

    Two forms, chosen by cross-validation on train:
    - `difficulty`: one logistic model of the difficulty label (1 + strong − weak) / 2;
    - `gain`: P(strong right | prompt) − P(weak right | prompt, confidence), two logistic models — the expected
      quality gained by escalating this answer (rational-cascade style: the weak model's confidence informs
      only its own side).
    """

    form: str = "difficulty"
    c: float = 1.0
    """Inverse regularization of the (weak-side) model."""
    c_strong: float = 1.0
    """Inverse regularization of the strong-side model (`gain` only)."""
    models: tuple = ()
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def _features(self, vectors: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        conf = confidence_features(confidence)
        return np.hstack([np.asarray(vectors, dtype=np.float64), (conf - self.mean) / self.std])

    def fit(self, vectors: np.ndarray, confidence: np.ndarray, strong: np.ndarray,
            weak: np.ndarray) -> LearnedEscalation:
        conf = confidence_features(confidence)
        self.mean, self.std = conf.mean(axis=0), conf.std(axis=0) + 1e-9
        x = self._features(vectors, confidence)
        strong, weak = np.asarray(strong, dtype=float), np.asarray(weak, dtype=float)
        if self.form == "gain":
            self.models = (_fit_soft(np.asarray(vectors, dtype=np.float64), strong, self.c_strong),
                           _fit_soft(x, weak, self.c))
        else:
            self.models = (_fit_soft(x, (1.0 + strong - weak) / 2.0, self.c),)
        return self

    def apply(self, vectors: np.ndarray, confidence: np.ndarray) -> CascadeScores:
        x = self._features(vectors, confidence)
        if self.form == "gain":
            strong_side, weak_side = self.models
            score = (strong_side.predict_proba(np.asarray(vectors, dtype=np.float64))[:, 1]
                     - weak_side.predict_proba(x)[:, 1])
        else:
            score = self.models[0].predict_proba(x)[:, 1]
        return CascadeScores(score, np.ones(len(score), dtype=bool))

    def params(self) -> dict:
        return {"form": self.form, "c": self.c, **({"c_strong": self.c_strong} if self.form == "gain" else {})}


@dataclass(frozen=True)
class TunedLearned:
    model: LearnedEscalation
    cv_apgr: float
    oof_scores: np.ndarray


LEARNED_GRID = (
    *(("difficulty", c, 1.0) for c in LEARNED_CS),
    *(("gain", c, c_strong) for c in (0.3, 1.0) for c_strong in (0.3, 1.0, 3.0)),
)
"""(form, C, C of the strong side) candidates for `cascade-learned`."""


def tune_learned(vectors: np.ndarray, confidence: np.ndarray, strong: np.ndarray, weak: np.ndarray, *,
                 grid: Sequence[tuple[str, float, float]] = LEARNED_GRID, folds: int = 5, seed: int = 0,
                 progress: bool = False) -> TunedLearned:
    """Choose the form and regularization by k-fold APGR on train, then fit on all of train."""
    from tqdm import tqdm

    vectors, confidence = np.asarray(vectors), np.asarray(confidence, dtype=float)
    fold = np.random.default_rng(seed).permutation(len(confidence)) % folds
    best: tuple[float, tuple, np.ndarray] | None = None
    for form, c, c_strong in tqdm(grid, desc=f"tuning cascade-learned ({folds}-fold)", disable=not progress):
        oof = np.empty(len(confidence))
        for f in range(folds):
            tr, te = fold != f, fold == f
            model = LearnedEscalation(form, c, c_strong).fit(vectors[tr], confidence[tr], strong[tr], weak[tr])
            oof[te] = model.apply(vectors[te], confidence[te]).score
        value = train_apgr(oof, strong, weak)
        logger.debug("cascade-learned %s C=%s C_strong=%s: cv APGR %.3f", form, c, c_strong, value)
        if best is None or value > best[0]:
            best = (value, (form, c, c_strong), oof)
    value, params, oof = best
    return TunedLearned(LearnedEscalation(*params).fit(vectors, confidence, strong, weak), value, oof)


@dataclass
class TrainedCascade:
    """A cascade policy fitted on train, ready to score the test rows."""

    name: str
    base: str | None = None
    """Router whose score the policy reads (combined policies), else None."""
    band: BandPolicy | None = None
    learned: LearnedEscalation | None = None

    def apply(self, confidence: np.ndarray, router_scores: dict[str, np.ndarray] | None = None,
              vectors: np.ndarray | None = None) -> CascadeScores:
        if self.band is not None:
            return self.band.apply(router_scores[self.base], confidence)
        if self.learned is not None:
            return self.learned.apply(vectors, confidence)
        return confidence_cascade(confidence)


def base_router(name: str) -> str | None:
    """`cascade+knn` → `knn`; None for the others."""
    return name.removeprefix(COMBINED_PREFIX) if name.startswith(COMBINED_PREFIX) else None


def build_cascades(names: Sequence[str], confidence: np.ndarray, strong: np.ndarray, weak: np.ndarray,
                   router_oof: dict[str, np.ndarray], vectors: np.ndarray | None, *,
                   progress: bool = False) -> tuple[dict[str, TrainedCascade], dict[str, np.ndarray], dict]:
    """Fit the named cascade policies on train rows. Returns the policies, their out-of-sample train scores
    (for calibration) and the settings chosen (with cross-validated APGR)."""
    policies: dict[str, TrainedCascade] = {}
    oof: dict[str, np.ndarray] = {}
    settings: dict = {}
    for name in names:
        if name == CASCADE:
            policies[name] = TrainedCascade(name)
            oof[name] = confidence_cascade(confidence).score
            settings[name] = {"train_apgr": round(float(train_apgr(oof[name], strong, weak)), 4)}
        elif name.startswith(COMBINED_PREFIX):
            base = base_router(name)
            tuned = tune_band(router_oof[base], confidence, strong, weak)
            policies[name] = TrainedCascade(name, base=base, band=tuned.policy)
            oof[name] = tuned.oof_scores  # cut-offs chosen without the row: honest for the recommendation
            settings[name] = {"low_quantile": tuned.quantiles[0], "high_quantile": tuned.quantiles[1],
                              "low": _finite(tuned.policy.low), "high": _finite(tuned.policy.high),
                              "cv_apgr": round(tuned.cv_apgr, 4)}
        elif name == LEARNED:
            tuned_l = tune_learned(vectors, confidence, strong, weak, progress=progress)
            policies[name] = TrainedCascade(name, learned=tuned_l.model)
            oof[name] = tuned_l.oof_scores
            settings[name] = {**tuned_l.model.params(), "cv_apgr": round(tuned_l.cv_apgr, 4)}
        else:
            raise ValueError(f"unknown cascade policy {name!r}; use cascade, cascade+<router> or cascade-learned")
    return policies, oof, settings


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None
