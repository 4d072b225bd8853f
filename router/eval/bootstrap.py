"""How sure a result is on little data: bootstrap intervals over the test rows, and the simpler router when
cross-validation cannot show that a learned one is better.

The resamples are drawn once per split (`resample_indices`) and shared by every policy, so a difference
between two policies is judged on paired resamples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from router.eval import metrics

N_BOOT = 200
"""Resamples per interval; the 2.5/97.5 percentiles of 200 are stable to about ±0.005 APGR at n≈2000."""


def resample_indices(n: int, reps: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(reps, n) row indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(reps, n))


def resampled(scores: np.ndarray, strong: np.ndarray, weak: np.ndarray, indices: np.ndarray,
              num_bins: int = 10) -> dict[str, np.ndarray]:
    """APGR and CPT(50%) of the decile sweep on each resample (baselines from the same resample)."""
    scores, strong, weak = (np.asarray(a, dtype=float) for a in (scores, strong, weak))
    apgr, cpt50 = np.full(len(indices), np.nan), np.full(len(indices), np.nan)
    for i, idx in enumerate(indices):
        s, w = strong[idx].mean() * 100, weak[idx].mean() * 100
        if s == w or np.ptp(scores[idx]) == 0:
            continue
        curve = metrics.threshold_sweep(scores[idx], strong[idx], weak[idx], num_bins)
        apgr[i] = metrics.apgr(curve, s, w)
        cpt50[i] = metrics.cpt(curve, 0.5, s, w)
    return {"apgr": apgr, "cpt50": cpt50}


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite values (NaN, NaN when there are none)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Choice:
    """The router to deploy, picked on train, and why."""

    router: str
    reason: str

    def to_json(self) -> dict:
        return {"router": self.router, "reason": self.reason}


def choose_router(train_apgr: Mapping[str, float], *, simple: str = "heuristic",
                  train_apgr_ci: Mapping[str, tuple[float, float]] | None = None) -> Choice:
    """The learned router with the best cross-validated APGR on train, unless it cannot beat `simple`
    (whose APGR on train is honest: it never trained), or nothing can beat random (interval holds 0.5),
    in which case a prior — a fixed share sent at random — is as good as routing.

    `train_apgr`: per router, its out-of-sample APGR on train (CV for learned routers, plain for the rest).
    """
    candidates = {k: v for k, v in train_apgr.items() if k != "random" and np.isfinite(v)}
    if not candidates:
        return Choice("random", "no router to choose from; route a fixed share at random (the prior)")
    best = max(candidates, key=candidates.get)
    value = candidates[best]
    if best != simple and simple in candidates and value <= candidates[simple]:
        best, value = simple, candidates[simple]
    ci = (train_apgr_ci or {}).get(best)
    if value <= 0.5 or (ci is not None and ci[0] <= 0.5):
        shown = f", 95% interval [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        return Choice("random", f"best on train is {best} at APGR {value:.3f}{shown}: not distinguishable from "
                                "random; route a fixed share at random (the prior)")
    if best == simple and len(candidates) > 1:
        others = ", ".join(f"{k} {v:.3f}" for k, v in candidates.items() if k != simple)
        return Choice(simple, f"cross-validation on train does not beat {simple} ({value:.3f} vs {others})")
    return Choice(best, f"best out-of-sample APGR on train ({value:.3f})")
