"""`tierserve calibrate`: the router threshold for a target strong share or quality, or (`--cascade`) one
tier's confidence threshold for a target escalation rate or quality, from labelled data or the query log.
`--write` puts it into the config file, validated by the config's own schema before the file is replaced.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

from router.eval.calibrate import (
    TOLERANCE,
    Calibration,
    confidence_threshold_for_quality_loss,
    discreteness_warning,
    rate_interval,
    threshold_for_pgr,
    threshold_for_share,
)
from router.eval.cascade_calibrate import CascadeCheck, check_labelled
from serving.cli.data import (
    ROUTER_CHOICES,
    dataset_args,
    embedding_cache,
    load_dataset_noting,
    parse_since,
)
from serving.config import load_config, parse_config
from serving.querylog import read_records
from serving.querylog.report import logged_confidences

logger = logging.getLogger(__name__)



def register(sub: argparse._SubParsersAction) -> None:
    """Add `tierserve calibrate` to the parser."""
    cal = sub.add_parser("calibrate", help="pick the router (or cascade) threshold for a target share or quality")
    dataset_args(cal, required=False)
    cal.add_argument("--router", default="knn", choices=ROUTER_CHOICES)
    cal.add_argument("--cascade", action="store_true",
                     help="calibrate the cascade's confidence threshold (cascade.tier_thresholds[--tier]) instead")
    cal.add_argument("--tier", help="--cascade: the tier whose answers are scored (default: the cheapest in --config)")
    cal.add_argument("--from-querylog", metavar="DIR",
                     help="calibrate on the router scores (or, with --cascade, the confidences) in this query log")
    cal.add_argument("--since", help="query-log window start: 24h, 7d or an ISO date")
    cal.add_argument("--holdout", type=float, default=0.3,
                     help="query log: the latest share of records kept out of calibration to check it (0.3)")
    target = cal.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-strong-share", type=float, help="share of requests for the strong tier, 0..1")
    target.add_argument("--target-escalation-rate", type=float,
                        help="--cascade: share of the tier's answers to escalate, 0..1")
    target.add_argument("--target-pgr", type=float, help="fraction of the quality gap to recover, 0..1")
    target.add_argument("--max-quality-loss", type=float, metavar="POINTS",
                        help="--cascade: the lowest escalation rate whose quality is within POINTS of the strong "
                             "model's at 95%% confidence (labelled data)")
    cal.add_argument("--write", action="store_true",
                     help="write the threshold into --config (router.thresholds, or with --cascade "
                          "cascade.tier_thresholds and cascade.tier_target_escalation_rates); the old file is kept as .bak")
    cal.set_defaults(func=calibrate)



def calibrate(args) -> int:
    """`tierserve calibrate`: the router threshold (or with `--cascade`, a tier's confidence threshold)."""
    if args.write and not args.config:
        raise ValueError("--write needs --config FILE to write the threshold into")
    if args.cascade:
        return calibrate_cascade(args)
    if args.target_escalation_rate is not None or args.max_quality_loss is not None:
        raise ValueError("--target-escalation-rate and --max-quality-loss are for --cascade; a router takes "
                         "--target-strong-share or --target-pgr")
    if args.from_querylog:
        if args.target_pgr is not None:
            raise ValueError("--target-pgr needs labelled data (--dataset); the query log has no correctness labels")
        scores = [r.score for r in read_records(args.from_querylog, since=parse_since(args.since))
                  if r.router == args.router and r.score is not None]
        if not scores:
            raise ValueError(f"{args.from_querylog}: no records scored by router {args.router!r} in that window")
        result = threshold_for_share(scores, args.target_strong_share)
        print(f"{args.router} on {len(scores)} logged requests: threshold {result.threshold:.6f} "
              f"→ {result.strong_share:.1%} strong")
        _warn_discrete(result.strong_share, args.target_strong_share, scores)
    elif args.dataset:
        result = _calibrate_labelled(args)
    else:
        raise ValueError("give --dataset (labelled data) or --from-querylog DIR")
    if args.write:
        write_threshold(args.config, result.threshold)
        print(f"wrote router.thresholds[-1] = {result.threshold:.6f} into {args.config} (old file: .bak)")
        _warn_router_mismatch(args.config, args.router)
    return 0


def _calibrate_labelled(args) -> Calibration:
    from router.eval.runner import build_routers

    ds = load_dataset_noting(args)
    cache = embedding_cache(args) if args.router in ("knn", "classifier") else None
    trained = build_routers(ds.train, [args.router], cache, progress=not args.quiet)
    train_scores = trained.train_scores[args.router]  # out-of-sample for learned routers
    train = ds.train
    if args.target_strong_share is not None:
        result = threshold_for_share(train_scores, args.target_strong_share)
    else:
        result = threshold_for_pgr(train_scores, train["strong"], train["weak"], args.target_pgr)
    print(f"{args.router} on {ds.name} train ({len(train)}): threshold {result.threshold:.6f} → "
          f"{result.strong_share:.1%} strong" + (f", PGR {result.pgr:.3f}" if result.pgr is not None else ""))
    if args.target_strong_share is not None:
        _warn_discrete(result.strong_share, args.target_strong_share, train_scores)
    test = ds.test
    if len(test):
        scores = trained.routers[args.router].score(test["prompt"].tolist()).values
        chosen = scores >= result.threshold
        strong, weak = test["strong"].to_numpy(float), test["weak"].to_numpy(float)
        quality = np.where(chosen, strong, weak).mean()
        pgr = (quality - weak.mean()) / (strong.mean() - weak.mean())
        print(f"check on test ({len(test)}): {chosen.mean():.1%} strong, PGR {pgr:.3f}")
    return result


def _warn_discrete(achieved: float, target: float, scores) -> None:
    """Say so when ties in the scores keep the share from the target (e.g. kNN with uniform weights)."""
    message = discreteness_warning(achieved, target, scores)
    if message:
        print(f"warning: {message}", file=sys.stderr)


def _warn_router_mismatch(config_path: str, router: str) -> None:
    default = load_config(config_path).router.default_router
    if default != router:
        print(f"note: {config_path} routes with {default!r} by default; this threshold was calibrated for "
              f"{router!r}", file=sys.stderr)


def calibrate_cascade(args) -> int:
    """`tierserve calibrate --cascade`: one tier's confidence threshold, chosen on part of the data and checked
    on the rest."""
    if args.target_strong_share is not None:  # for a cascade the strong share is the escalation rate
        args.target_escalation_rate = args.target_strong_share
    config = None
    if args.config:
        config = load_config(args.config)
    tier = args.tier or (config.tier_names[0] if config else None)
    if args.max_quality_loss is not None:
        return _quality_bound(args, tier, config)
    if args.from_querylog:
        check = _from_querylog(args, tier)
        source = f"query log {args.from_querylog}"
    elif args.dataset:
        check = _from_dataset(args, tier or "cheapest tier")
        source = f"{args.dataset}"
    else:
        raise ValueError("give --dataset (labelled data with --weak-confidence-col) or --from-querylog DIR")
    cal = check.calibration
    print(f"cascade on {check.tier}, {source}: threshold {cal.threshold:.6f} (escalate when confidence < it) → "
          f"{cal.escalation_rate:.1%} escalated on {check.n_calibration} calibration answers"
          + (f", PGR {cal.pgr:.3f}" if cal.pgr is not None else ""))
    if check.warning:
        print(f"warning: {check.warning}", file=sys.stderr)
    if check.n_held_out:
        lo, hi = rate_interval(cal.escalation_rate, check.n_calibration, check.n_held_out)
        print(f"given n, the held-out rate should fall in [{lo:.1%}, {hi:.1%}] (95%: calibration on "
              f"{check.n_calibration} answers, checked on {check.n_held_out})")
    verdict = "within" if check.within_tolerance else "OUTSIDE"
    print(f"held out ({check.n_held_out}): {check.held_out_rate:.1%} escalated, target {check.target_rate:.1%} "
          f"({verdict} ±{TOLERANCE * 100:.0f} points)"
          + (f", PGR {check.held_out_pgr:.3f}" if check.held_out_pgr is not None else ""))
    if args.write:
        if tier is None:
            raise ValueError("--write needs --tier or a --config whose cheapest tier is the one to calibrate")
        write_cascade_threshold(args.config, tier, cal.threshold, check.target_rate)
        print(f"wrote cascade.tier_thresholds[{tier}] = {cal.threshold:.6f} and "
              f"cascade.tier_target_escalation_rates[{tier}] = {check.target_rate:.4f} into {args.config} "
              "(old file: .bak)")
        if config is not None and config.cascade.method != "logprob" and not args.from_querylog:
            print(f"note: {args.config} measures confidence with cascade.method={config.cascade.method!r}; this "
                  "threshold was calibrated on the dataset's answer probabilities", file=sys.stderr)
    return 0


def _quality_bound(args, tier: str | None, config) -> int:
    """`--max-quality-loss`: the cheapest threshold whose quality stays within the bound at 95%, its cost in
    escalations, and what it does on test."""
    if not args.dataset:
        raise ValueError("--max-quality-loss needs labelled data (--dataset with --weak-confidence-col); the query "
                         "log has no correctness labels")
    ds = load_dataset_noting(args)
    if not ds.has_confidence:
        raise ValueError(f"{args.dataset}: --cascade needs the weak model's confidence: pass --weak-confidence-col")
    train, test = ds.train, ds.test
    bound = confidence_threshold_for_quality_loss(train["weak_confidence"].to_numpy(float), *_quality(train),
                                                  args.max_quality_loss)
    print(f"cascade on {tier or 'cheapest tier'}, {args.dataset} train ({len(train)}): threshold {bound.threshold:.6f} "
          f"keeps quality within {bound.max_loss:g} point(s) of the strong model at 95% confidence (loss "
          f"{bound.loss:+.2f}, upper bound {bound.loss_upper:.2f}); it costs {bound.escalation_rate:.1%} escalated"
          + ("" if bound.met else "  (not met even escalating everything: the bound is out of reach)"))
    if len(test):
        strong, weak = _quality(test)
        escalated = test["weak_confidence"].to_numpy(float) < bound.threshold
        loss = (strong.mean() - np.where(escalated, strong, weak).mean()) * 100
        lo, hi = rate_interval(bound.escalation_rate, len(train), len(test))
        print(f"given n, the test escalation rate should fall in [{lo:.1%}, {hi:.1%}] (95%)")
        print(f"test ({len(test)}): {escalated.mean():.1%} escalated, quality {loss:+.2f} points from the strong "
              "model's")
    if args.write:
        if tier is None:
            raise ValueError("--write needs --tier or a --config whose cheapest tier is the one to calibrate")
        write_cascade_threshold(args.config, tier, bound.threshold, bound.escalation_rate,
                                floor_rate=bound.escalation_rate)
        print(f"wrote cascade.tier_thresholds[{tier}] = {bound.threshold:.6f}, and {bound.escalation_rate:.4f} as "
              f"its target and floor escalation rate, into {args.config} (old file: .bak)")
    return 0


def _from_dataset(args, tier: str) -> CascadeCheck:
    ds = load_dataset_noting(args)
    if not ds.has_confidence:
        raise ValueError(f"{args.dataset}: --cascade needs the weak model's confidence: pass --weak-confidence-col")
    train, test = ds.train, ds.test
    return check_labelled(train["weak_confidence"].to_numpy(float), test["weak_confidence"].to_numpy(float),
                          tier=tier, target_rate=args.target_escalation_rate, target_pgr=args.target_pgr,
                          train_quality=_quality(train), test_quality=_quality(test))


def _quality(part) -> tuple[np.ndarray, np.ndarray]:
    return part["strong"].to_numpy(float), part["weak"].to_numpy(float)


def _from_querylog(args, tier: str | None) -> CascadeCheck:
    if args.target_pgr is not None:
        raise ValueError("--target-pgr needs labelled data (--dataset); the query log has no correctness labels")
    records = list(read_records(args.from_querylog, since=parse_since(args.since)))
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


def write_cascade_threshold(config_path: str | Path, tier: str, threshold: float, target_rate: float, *,
                            backup: bool = True, floor_rate: float | None = None) -> dict:
    """Set `cascade.tier_thresholds[tier]` and `cascade.tier_target_escalation_rates[tier]` in a YAML config.

    The file is validated before it is replaced; the old one is kept as `.bak`. Comments are not preserved.
    """
    path = Path(config_path)
    data = yaml.safe_load(path.read_text()) or {}
    names = [t.get("name") for t in data.get("tiers") or [] if isinstance(t, dict)]
    if tier not in names[:-1]:
        raise ValueError(f"{path}: --tier {tier!r} must be a tier below the top one, one of {names[:-1]}")
    cascade = dict(data.get("cascade") or {})
    cascade["tier_thresholds"] = {**(cascade.get("tier_thresholds") or {}), tier: round(float(threshold), 6)}
    cascade["tier_target_escalation_rates"] = {**(cascade.get("tier_target_escalation_rates") or {}),
                                               tier: round(float(target_rate), 4)}
    if floor_rate is not None:
        cascade["tier_min_escalation_rates"] = {**(cascade.get("tier_min_escalation_rates") or {}),
                                                tier: round(float(floor_rate), 4)}
    data["cascade"] = cascade
    parse_config(data, str(path))
    if backup:
        shutil.copyfile(path, path.with_name(path.name + ".bak"))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    logger.info("%s: cascade.tier_thresholds[%s] = %s", path, tier, cascade["tier_thresholds"][tier])
    return data


def write_threshold(config_path: str | Path, threshold: float, *, backup: bool = True) -> dict:
    """Set the boundary into the most expensive tier (`router.thresholds[-1]`) in a YAML config.

    Two tiers: `router.thresholds: [threshold]`. More tiers: lower boundaries are capped at the new one so
    the list stays ascending. The file is validated before it is replaced; the old one is kept as `.bak`.
    Comments in the YAML are not preserved.
    """
    path = Path(config_path)
    data = yaml.safe_load(path.read_text()) or {}
    num_tiers = len(data.get("tiers") or [])
    if num_tiers < 2:
        raise ValueError(f"{path}: needs at least two tiers to route between, found {num_tiers}")
    router = dict(data.get("router") or {})
    current = list(router.get("thresholds") or [i / num_tiers for i in range(1, num_tiers)])
    if len(current) != num_tiers - 1:
        raise ValueError(f"{path}: router.thresholds has {len(current)} values for {num_tiers} tiers; fix it first")
    value = round(float(threshold), 6)
    router["thresholds"] = [min(round(float(t), 6), value) for t in current[:-1]] + [value]
    data["router"] = router
    parse_config(data, str(path))
    if backup:
        shutil.copyfile(path, path.with_name(path.name + ".bak"))
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    logger.info("%s: router.thresholds = %s", path, router["thresholds"])
    return data
