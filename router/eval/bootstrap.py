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


def choose_policy(train_apgr: Mapping[str, float], diff_ci: Mapping[str, tuple[float, float]], *,
                  baseline: str = "cascade") -> Choice:
    """With the weak model's confidence known: the plain cascade (`baseline`), unless cross-validation on train
    shows another policy (a router, a combined cascade, the learned one) better with 95% confidence, i.e. the
    paired bootstrap interval of its APGR minus the cascade's lies above 0; then the best such policy.

    `train_apgr`: out-of-sample APGR on train per policy; `diff_ci`: per policy, the 95% interval of
    (its APGR - the baseline's) over paired resamples of the train rows."""
    base = train_apgr[baseline]
    better = {n: v for n, v in train_apgr.items()
              if n != baseline and np.isfinite(v) and n in diff_ci and diff_ci[n][0] > 0}
    if better:
        best = max(better, key=better.get)
        lo, hi = diff_ci[best]
        return Choice(best, f"cross-validation on train shows it better than the plain {baseline}: APGR "
                            f"{better[best]:.3f} vs {base:.3f}, paired 95% interval of the gain [{lo:+.3f}, {hi:+.3f}]")
    runner_up = max((n for n in train_apgr if n != baseline and np.isfinite(train_apgr[n])),
                    key=lambda n: train_apgr[n], default=None)
    detail = ""
    if runner_up is not None and runner_up in diff_ci:
        lo, hi = diff_ci[runner_up]
        detail = (f"; the best other, {runner_up} at {train_apgr[runner_up]:.3f}, has a paired 95% interval of "
                  f"[{lo:+.3f}, {hi:+.3f}] against it")
    return Choice(baseline, f"no policy beats the plain {baseline} (APGR {base:.3f} on train) with 95% "
                            f"confidence in cross-validation{detail}")
