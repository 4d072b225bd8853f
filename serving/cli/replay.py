"""`tierserve replay`: stream a labelled set's train split through the router's online learning, in order
(learning only from the weak model's confidence), then judge the learned pre-router plus cascade on test
against the calibrated plain cascade at the same quality (`router.eval.replay`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from serving.cli.data import dataset_args, embedding_cache, load_dataset_noting


def register(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("replay", help="replay a labelled set through online learning; pre-routing vs the cascade")
    dataset_args(rp)
    rp.add_argument("--target-escalation-rate", type=float, default=0.3,
                    help="the plain cascade's calibrated escalation rate on train (0.3)")
    rp.add_argument("--stream-tau", type=float, default=0.7,
                    help="pre-route threshold deployed while learning (kNN share of `large` neighbours)")
    rp.add_argument("--explore-rate", type=float, default=0.05, help="exploration share while learning")
    rp.add_argument("--flush-every", type=int, default=100, help="rows between two store writes")
    rp.add_argument("--out", help="write replay.json here")
    rp.set_defaults(func=_replay)


def _replay(args) -> int:
    from router.config import KnnConfig
    from router.eval.replay import (
        TAUS,
        calibrated_threshold,
        matched,
        operate,
        recalibration_check,
        stream,
    )
    from router.learn import LearnConfig

    ds = load_dataset_noting(args)
    if not ds.has_confidence:
        raise ValueError(f"{args.dataset}: replay needs the weak model's confidence: pass --weak-confidence-col")
    ratio = args.cost_ratio if args.cost_ratio is not None else 1 / 8.75
    train, test = ds.train, ds.test
    cache = embedding_cache(args)
    tr_vec = cache.embed(train["prompt"].tolist(), progress=not args.quiet)
    te_vec = cache.embed(test["prompt"].tolist(), progress=not args.quiet)
    tr_conf, te_conf = train["weak_confidence"].to_numpy(float), test["weak_confidence"].to_numpy(float)
    t0 = calibrated_threshold(tr_conf, args.target_escalation_rate)
    learn = LearnConfig(enabled=True, sample_accepted=1.0, explore_rate=args.explore_rate, max_per_label=10**7,
                        max_per_key=10**7, max_key_share=1.0)
    run = stream(train["prompt"].tolist(), tr_vec, tr_conf, threshold=t0, tau=args.stream_tau, learn=learn,
                 knn=KnnConfig(k=20, weighting="similarity"), flush_every=args.flush_every)
    te_scores = np.nan_to_num(_scores(run, te_vec))
    strong, weak = test["strong"].to_numpy(float), test["weak"].to_numpy(float)
    base = operate(None, None, t0, te_conf, strong, weak, ratio)
    half = len(train) // 2  # choose the operating point on the stream's out-of-sample second half
    s_tr, w_tr = train["strong"].to_numpy(float)[half:], train["weak"].to_numpy(float)[half:]
    base_tr = operate(None, None, t0, tr_conf[half:], s_tr, w_tr, ratio)
    curve, chosen = [], None
    for tau in TAUS:
        on_train = matched(run.scores[half:], tau, tr_conf[half:], s_tr, w_tr, ratio, base_tr.quality)
        if on_train and on_train.cost <= base_tr.cost and (chosen is None or on_train.wasted < chosen.wasted):
            chosen = on_train
        curve.append(matched(te_scores, tau, te_conf, strong, weak, ratio, base.quality))
    applied = operate(te_scores, chosen.tau, chosen.threshold, te_conf, strong, weak, ratio) if chosen else None
    report = {"dataset": ds.name, "cost_ratio": ratio, "cascade": asdict(base),
              "chosen_on_train": asdict(chosen) if chosen else None, "applied_on_test": asdict(applied) if applied else None,
              "matched_on_test": [asdict(p) for p in curve if p], "learner": run.learned,
              "recalibration": recalibration_check(np.r_[tr_conf, te_conf], args.target_escalation_rate, t0)}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "replay.json").write_text(json.dumps(report, indent=2))
    run.store.close()
    return 0


def _scores(run, vectors: np.ndarray) -> np.ndarray:
    from router.config import KnnConfig
    from router.eval.replay import TIERS
    from router.scoring import KnnRouter, StoreIndex, label_difficulty

    index = StoreIndex(run.store, lambda label: label_difficulty(label, TIERS))
    return KnnRouter(None, index, KnnConfig(k=20, weighting="similarity")).score_vectors(vectors).values
