"""RouteLLM's routing-quality metrics, computed exactly as `routellm/evals/evaluate.py` does.

A router gives every prompt a score (higher = more likely to need the strong model). Thresholds are the
decile edges of those scores; at each edge a prompt goes to the strong model when `score >= t` (`>` for the
last edge, so the curve reaches 0% strong calls). Each edge gives one point (strong-call %, quality %).

Quality is a mean per-prompt score in [0, 1] reported in percent: accuracy for right/wrong datasets, the
judge score / 10 for MT-Bench.

One deliberate difference, for curves that are not monotone: RouteLLM calls `np.interp(target, quality,
strong_pct)`, which assumes quality rises along the curve and returns garbage otherwise. `calls_to_reach`
walks the piecewise-linear curve from the fewest strong calls upward and returns the first point where it
reaches the target, i.e. the cheapest share of strong calls that provably reaches that quality. On a
monotone curve this is identical to RouteLLM's `np.interp`; `Curve.monotone` says which case applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

PGR_TARGETS = (0.2, 0.5, 0.8)
"""Fractions of the weak→strong quality gap CPT is reported at (RouteLLM's 20/50/80%)."""


@dataclass(frozen=True)
class Curve:
    """A cost–quality curve, sorted by strong-call share."""

    strong_pct: np.ndarray
    """Share of prompts sent to the strong model, in percent, ascending."""
    quality: np.ndarray
    """Mean quality at that share, in percent."""
    thresholds: np.ndarray | None = None
    """Score threshold of each point (None for the oracle, which has no scores)."""
    cost: np.ndarray | None = None
    """Total cost at each point in percent of sending everything to the strong model (None: not known)."""

    @property
    def monotone(self) -> bool:
        """True when quality never falls as strong calls rise (RouteLLM's np.interp assumption holds)."""
        return bool(np.all(np.diff(self.quality) >= -1e-12))

    def points(self) -> list[list[float]]:
        return [[round(float(p), 4), round(float(q), 4)] for p, q in zip(self.strong_pct, self.quality)]


@dataclass(frozen=True)
class RouterMetrics:
    """RouteLLM's summary of one curve, plus the cost saved at 95% of strong quality."""

    cpt20: float
    cpt50: float
    cpt80: float
    """Strong-call % needed to recover 20/50/80% of the weak→strong quality gap."""
    auc: float
    """Area under the curve, quality % integrated over the strong-call share in [0, 1]."""
    apgr: float
    """Average performance-gap recovered: (AUC − weak) / (strong − weak); random ≈ 0.5."""
    strong_pct_at_95: float
    """Strong-call % needed to reach 95% of the strong model's quality (0 when the weak model already does)."""
    cost_saved_at_95: float
    """Share of the all-strong cost saved at that point (counts calls when no per-call costs are known)."""
    monotone: bool
    curve: Curve
    cost_at_cpt50: float = float("nan")
    """Total cost at CPT(50%), in percent of all-strong (NaN when costs are unknown or 50% is never reached)."""
    kind: str = "router"
    """"router" (one call per query) or "cascade" (the weak call first, the strong one when escalated)."""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """95% bootstrap intervals over the test rows, e.g. {"apgr": (lo, hi), "cpt50": (lo, hi)}."""

    @property
    def like_random(self) -> bool:
        """True when the APGR interval holds 0.5, random routing's value: not distinguishable from random."""
        lo, hi = self.ci.get("apgr", (float("nan"), float("nan")))
        return bool(lo <= 0.5 <= hi)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "cpt20": round(self.cpt20, 4),
            "cpt50": round(self.cpt50, 4),
            "cpt80": round(self.cpt80, 4),
            "auc": round(self.auc, 4),
            "apgr": round(self.apgr, 4),
            "strong_pct_at_95": round(self.strong_pct_at_95, 4),
            "cost_saved_at_95": round(self.cost_saved_at_95, 4),
            "cost_at_cpt50": None if np.isnan(self.cost_at_cpt50) else round(self.cost_at_cpt50, 4),
            "monotone": self.monotone,
            "ci95": {k: [round(float(v), 4) for v in pair] for k, pair in self.ci.items()},
            "like_random": self.like_random if self.ci else None,
            "curve": self.curve.points(),
            "cost_curve": None if self.curve.cost is None else [round(float(c), 4) for c in self.curve.cost],
        }


def decile_thresholds(scores: np.ndarray, num_bins: int = 10) -> np.ndarray:
    """Bin edges of `pd.qcut(scores, num_bins, retbins=True, duplicates="drop")`, ascending."""
    _, edges = pd.qcut(np.asarray(scores, dtype=float), num_bins, retbins=True, duplicates="drop")
    return np.asarray(edges, dtype=float)


def threshold_sweep(
    scores: np.ndarray,
    strong: np.ndarray,
    weak: np.ndarray,
    num_bins: int = 10,
    *,
    strong_cost: np.ndarray | None = None,
    weak_cost: np.ndarray | None = None,
    weak_first: np.ndarray | bool = False,
) -> Curve:
    """The curve a router's scores trace on labelled prompts (RouteLLM's `Benchmark.evaluate`).

    With per-row `strong_cost` and `weak_cost` the curve also carries its total cost. `weak_first` marks the
    rows whose strong call comes after a weak one (a cascade escalating): they pay both calls when selected.
    A plain router has `weak_first=False` (one call per query); a confidence cascade `True`.
    """
    scores, strong, weak = (np.asarray(a, dtype=float) for a in (scores, strong, weak))
    if not len(scores) == len(strong) == len(weak):
        raise ValueError(f"scores ({len(scores)}), strong ({len(strong)}) and weak ({len(weak)}) differ in length")
    if len(scores) == 0:
        raise ValueError("no prompts to evaluate")
    edges = decile_thresholds(scores, num_bins)
    costed = strong_cost is not None and weak_cost is not None
    if costed:
        strong_cost, weak_cost = np.asarray(strong_cost, dtype=float), np.asarray(weak_cost, dtype=float)
        both = np.broadcast_to(np.asarray(weak_first, dtype=bool), scores.shape)
    pct, qual, cost = [], [], []
    for i, t in enumerate(edges):
        selected = scores > t if i == len(edges) - 1 else scores >= t
        pct.append(selected.mean() * 100.0)
        qual.append(np.where(selected, strong, weak).mean() * 100.0)
        if costed:
            paid = np.where(selected, strong_cost + np.where(both, weak_cost, 0.0), weak_cost)
            cost.append(paid.sum() / strong_cost.sum() * 100.0)
    order = np.argsort(pct, kind="stable")
    return Curve(np.asarray(pct)[order], np.asarray(qual)[order], edges[order],
                 np.asarray(cost)[order] if costed else None)


def cost_at(curve: Curve, strong_pct: float) -> float:
    """Total cost (% of all-strong) where the curve sends `strong_pct` % to the strong model (interpolated)."""
    if curve.cost is None or np.isnan(strong_pct):
        return float("nan")
    return float(np.interp(strong_pct, curve.strong_pct, curve.cost))


def calls_to_reach(curve: Curve, target: float) -> float:
    """Smallest strong-call % at which the piecewise-linear curve reaches `target` quality.

    Equals RouteLLM's `np.interp(target, quality, strong_pct)` on a monotone curve; on a non-monotone one
    it is the first crossing (see the module docstring). NaN when the curve never reaches the target.
    """
    x, y = curve.strong_pct, curve.quality
    if y[0] >= target:
        return float(x[0])
    for i in range(len(x) - 1):
        if y[i] < target <= y[i + 1]:
            return float(x[i] + (target - y[i]) * (x[i + 1] - x[i]) / (y[i + 1] - y[i]))
    return float("nan")


def auc(curve: Curve) -> float:
    """`np.trapz(quality, strong_pct / 100)`, as RouteLLM computes it."""
    return float(np.trapezoid(curve.quality, curve.strong_pct / 100.0))


def apgr(curve: Curve, strong_quality: float, weak_quality: float) -> float:
    """(AUC − weak AUC) / (strong AUC − weak AUC), both baselines integrated over the curve's own span."""
    span = (curve.strong_pct[-1] - curve.strong_pct[0]) / 100.0
    if span == 0 or strong_quality == weak_quality:
        return float("nan")  # a single point (all scores equal) or no gap: nothing to average
    weak_auc, strong_auc = weak_quality * span, strong_quality * span
    return (auc(curve) - weak_auc) / (strong_auc - weak_auc)


def cpt(curve: Curve, pgr: float, strong_quality: float, weak_quality: float) -> float:
    """Calls to the strong model (%) needed to recover `pgr` of the quality gap."""
    return calls_to_reach(curve, weak_quality + pgr * (strong_quality - weak_quality))


def summarize(
    curve: Curve,
    strong_quality: float,
    weak_quality: float,
    *,
    cost_ratio: float = 0.0,
    kind: str = "router",
) -> RouterMetrics:
    """All metrics of one curve. When the curve carries costs they are used; otherwise `cost_ratio`, the
    weak/strong cost per call (0: count strong calls only), with one call per query for a router and the
    weak call always plus the strong one when escalated for a cascade."""
    target95 = 0.95 * strong_quality
    pct95 = 0.0 if weak_quality >= target95 else calls_to_reach(curve, target95)
    c20, c50, c80 = (cpt(curve, x, strong_quality, weak_quality) for x in PGR_TARGETS)
    if curve.cost is None:
        shares = curve.strong_pct / 100.0
        weak_calls = np.ones_like(shares) if kind == "cascade" else 1.0 - shares
        curve = replace(curve, cost=(shares + weak_calls * cost_ratio) * 100.0)
    saved = 1.0 - cost_at(curve, pct95) / 100.0
    return RouterMetrics(
        cpt20=c20,
        cpt50=c50,
        cpt80=c80,
        auc=auc(curve),
        apgr=apgr(curve, strong_quality, weak_quality),
        strong_pct_at_95=pct95,
        cost_saved_at_95=saved,
        monotone=curve.monotone,
        curve=curve,
        cost_at_cpt50=cost_at(curve, c50),
        kind=kind,
    )


def optimal_quality(strong: np.ndarray, weak: np.ndarray, strong_share: float) -> float:
    """Best quality (%) any router can reach with `strong_share` (0..1) of calls to the strong model.

    The oracle sends the prompts with the largest positive gain (strong − weak) first. For right/wrong
    labels this is RouteLLM's `get_optimal_accuracy` (weak correct + min(calls, strong-only wins)); for
    judge scores it is its MT-Bench version. A fractional last call counts pro rata.
    """
    strong, weak = np.asarray(strong, dtype=float), np.asarray(weak, dtype=float)
    gains = np.sort(np.clip(strong - weak, 0.0, None))[::-1]
    calls = len(gains) * strong_share
    whole = int(np.floor(calls))
    bonus = gains[:whole].sum() + (gains[whole] * (calls - whole) if whole < len(gains) else 0.0)
    return float((weak.sum() + bonus) / len(weak) * 100.0)


def oracle_curve(strong: np.ndarray, weak: np.ndarray, steps: int = 100) -> Curve:
    """The optimal curve at `steps + 1` evenly spaced strong-call shares."""
    shares = np.linspace(0.0, 1.0, steps + 1)
    return Curve(shares * 100.0, np.array([optimal_quality(strong, weak, s) for s in shares]))
