"""`tierserve calibrate --cascade`: the confidence threshold of one tier for a target escalation rate or a
target quality, from labelled data (train to choose, test to check) or from the confidences the query log
recorded (older records to choose, the latest `--holdout` share to check)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from router.eval import calibrate
from router.eval.calibrate import CascadeCalibration


@dataclass(frozen=True)
class CascadeCheck:
    """A cascade threshold chosen on one part of the data and what it does on the held-out part."""

    tier: str
    calibration: CascadeCalibration
    n_calibration: int
    target_rate: float
    """The escalation rate asked for (with a quality target: the rate that reached it on calibration data)."""
    held_out_rate: float
    n_held_out: int
    held_out_pgr: float | None = None
    warning: str | None = None
    """Set when ties in the calibration confidences keep the rate more than 2 points from the target."""

    @property
    def within_tolerance(self) -> bool:
        return abs(self.held_out_rate - self.target_rate) <= calibrate.TOLERANCE


def check_labelled(train_conf: np.ndarray, test_conf: np.ndarray, *, tier: str, target_rate: float | None = None,
                   target_pgr: float | None = None, train_quality: tuple[np.ndarray, np.ndarray] | None = None,
                   test_quality: tuple[np.ndarray, np.ndarray] | None = None) -> CascadeCheck:
    """Calibrate on train confidences, check on test. Quality pairs are (strong, weak) per row."""
    if target_pgr is not None:
        strong, weak = train_quality
        cal = calibrate.confidence_threshold_for_pgr(train_conf, strong, weak, target_pgr)
        target = cal.escalation_rate
    else:
        cal = calibrate.confidence_threshold_for_rate(train_conf, target_rate)
        target = target_rate
    warning = calibrate.discreteness_warning(cal.escalation_rate, target, train_conf)
    escalated = np.asarray(test_conf, dtype=float) < cal.threshold
    pgr = None
    if test_quality is not None and len(escalated):
        strong, weak = (np.asarray(a, dtype=float) for a in test_quality)
        gap = strong.mean() - weak.mean()
        pgr = float((np.where(escalated, strong, weak).mean() - weak.mean()) / gap) if gap else None
    rate = float(escalated.mean()) if len(escalated) else float("nan")
    return CascadeCheck(tier, cal, len(train_conf), target, rate, len(escalated), pgr, warning)


def logged_confidences(records, tier: str) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, confidences) of the cascade decisions on `tier`'s answers, oldest first."""
    times, conf = [], []
    for r in records:
        for d in r.cascade_decisions():
            if d.tier == tier:
                times.append(r.timestamp)
                conf.append(d.confidence)
    order = np.argsort(times, kind="stable")
    return np.asarray(times)[order], np.asarray(conf, dtype=float)[order]


def run_cascade_calibration(args, load: Callable, since: Callable) -> int:
    """The CLI body of `tierserve calibrate --cascade`."""
    if args.target_strong_share is not None:  # for a cascade the strong share is the escalation rate
        args.target_escalation_rate = args.target_strong_share
    config = None
    if args.config:
        from serving.config import load_config

        config = load_config(args.config)
    tier = args.tier or (config.tier_names[0] if config else None)
    if args.from_querylog:
        check = _from_querylog(args, tier, since)
        source = f"query log {args.from_querylog}"
    elif args.dataset:
        check = _from_dataset(args, tier or "cheapest tier", load)
        source = f"{args.dataset}"
    else:
        raise ValueError("give --dataset (labelled data with --weak-confidence-col) or --from-querylog DIR")
    cal = check.calibration
    print(f"cascade on {check.tier}, {source}: threshold {cal.threshold:.6f} (escalate when confidence < it) → "
          f"{cal.escalation_rate:.1%} escalated on {check.n_calibration} calibration answers"
          + (f", PGR {cal.pgr:.3f}" if cal.pgr is not None else ""))
    if check.warning:
        print(f"warning: {check.warning}", file=sys.stderr)
    verdict = "within" if check.within_tolerance else "OUTSIDE"
    print(f"held out ({check.n_held_out}): {check.held_out_rate:.1%} escalated, target {check.target_rate:.1%} "
          f"({verdict} ±{calibrate.TOLERANCE * 100:.0f} points)"
          + (f", PGR {check.held_out_pgr:.3f}" if check.held_out_pgr is not None else ""))
    if args.write:
        if tier is None:
            raise ValueError("--write needs --tier or a --config whose cheapest tier is the one to calibrate")
        calibrate.write_cascade_threshold(args.config, tier, cal.threshold, check.target_rate)
        print(f"wrote cascade.tier_thresholds[{tier}] = {cal.threshold:.6f} and "
              f"cascade.tier_target_escalation_rates[{tier}] = {check.target_rate:.4f} into {args.config} "
              "(old file: .bak)")
        if config is not None and config.cascade.method != "logprob" and not args.from_querylog:
            print(f"note: {args.config} measures confidence with cascade.method={config.cascade.method!r}; this "
                  "threshold was calibrated on the dataset's answer probabilities", file=sys.stderr)
    return 0


def _from_dataset(args, tier: str, load: Callable) -> CascadeCheck:
    ds = load(args)
    if not ds.has_confidence:
        raise ValueError(f"{args.dataset}: --cascade needs the weak model's confidence: pass --weak-confidence-col")
    train, test = ds.train, ds.test
    return check_labelled(train["weak_confidence"].to_numpy(float), test["weak_confidence"].to_numpy(float),
                          tier=tier, target_rate=args.target_escalation_rate, target_pgr=args.target_pgr,
                          train_quality=_quality(train), test_quality=_quality(test))


def _quality(part) -> tuple[np.ndarray, np.ndarray]:
    return part["strong"].to_numpy(float), part["weak"].to_numpy(float)


def _from_querylog(args, tier: str | None, since: Callable) -> CascadeCheck:
    from router.querylog import read_records

    if args.target_pgr is not None:
        raise ValueError("--target-pgr needs labelled data (--dataset); the query log has no correctness labels")
    records = list(read_records(args.from_querylog, since=since(args.since)))
    if tier is None:
        firsts = [r.tier_chain[0] for r in records if r.confidences and r.tier_chain]
        if not firsts:
            raise ValueError(f"{args.from_querylog}: no cascade decisions recorded in that window")
        tier = max(set(firsts), key=firsts.count)
    _, conf = logged_confidences(records, tier)
    if len(conf) < 20:
        raise ValueError(f"{args.from_querylog}: {len(conf)} cascade decisions on tier {tier!r}; need at least 20")
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    cut = len(conf) - int(round(args.holdout * len(conf)))
    return check_labelled(conf[:cut], conf[cut:], tier=tier, target_rate=args.target_escalation_rate)
