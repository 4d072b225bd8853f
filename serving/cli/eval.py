"""`tierserve eval / train-router / report`: routing quality on labelled data, the classifier router, and what
the query log says about live traffic (`calibrate` is `serving.cli.calibrate`)."""

from __future__ import annotations

import argparse
import os

from serving.cli.data import (
    ROUTER_CHOICES,
    dataset_args,
    embedding_cache,
    load_dataset_noting,
    parse_since,
    querylog_dir,
)

EVAL_CHOICES = (*ROUTER_CHOICES, "judge")
CASCADE_CHOICES = ("cascade", *(f"cascade+{r}" for r in ROUTER_CHOICES if r != "random"), "cascade-learned")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the `tierserve` parser."""
    ev = sub.add_parser("eval", help="score routers on labelled data with RouteLLM's metrics")
    dataset_args(ev)
    ev.add_argument("--routers", default="random,heuristic,knn,classifier",
                    help="comma-separated, from: " + ", ".join(EVAL_CHOICES) + "; with --weak-confidence-col also "
                         + ", ".join(CASCADE_CHOICES) + " (cascades: the weak call first, escalated below a "
                         "confidence threshold)")
    ev.add_argument("--judge-url", help="judge: OpenAI-compatible server of the small tier, e.g. http://127.0.0.1:8000")
    ev.add_argument("--judge-model", help="judge: model name to send (the small tier's name)")
    ev.add_argument("--out", required=True, help="folder for results.json and cost_quality.png")
    ev.add_argument("--no-tune", action="store_true", help="skip cross-validated tuning on train (fast, worse)")
    ev.add_argument("--classifier-models", default="logreg", help="models the classifier tuning tries: logreg,mlp")
    ev.set_defaults(func=_eval)

    tr = sub.add_parser("train-router", help="train the classifier router and save it")
    dataset_args(tr, required=False)
    tr.add_argument("--from-querylog", metavar="DIR", help="train on labelled query-log rows instead")
    tr.add_argument("--since", help="query-log window start: 24h, 7d or an ISO date")
    tr.add_argument("--save", required=True, metavar="DIR", help="folder to write model.joblib + manifest.json")
    tr.add_argument("--model", default="logreg", choices=("logreg", "mlp"))
    tr.add_argument("--c", type=float, help="inverse regularization; default: tuned by 5-fold CV on train")
    tr.add_argument("--no-text-features", action="store_true", help="embeddings only")
    tr.set_defaults(func=_train_router)

    rep = sub.add_parser("report", help="routing and escalation over time from the query log")
    rep.add_argument("--querylog", metavar="DIR", help="query-log folder (default: from --config's data_dir)")
    rep.add_argument("--config", default=os.environ.get("TIERSERVE_CONFIG"), help="tierserve YAML config")
    rep.add_argument("--since", help="window start: 24h, 7d or an ISO date")
    rep.add_argument("--bucket", default="1h", help="pandas frequency of a row: 15min, 1h, 1D (default 1h)")
    rep.add_argument("--png", help="also write a plot here")
    rep.add_argument("--tier", help="cascade section: the tier whose answers are scored (default: the most frequent)")
    rep.add_argument("--target", type=float,
                     help="cascade section: escalation-rate target (default: cascade.target_escalation_rate from "
                          "--config)")
    rep.set_defaults(func=_report)


def _eval(args) -> int:
    from router.eval.report import format_table, write_report
    from router.eval.runner import evaluate as run_eval

    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    bad = [n for n in names if n not in EVAL_CHOICES and n not in CASCADE_CHOICES]
    if bad:
        raise ValueError(f"--routers: unknown {bad}; choose from {', '.join(EVAL_CHOICES + CASCADE_CHOICES)}")
    extra = {}
    if "judge" in names:
        if not (args.judge_url and args.judge_model):
            raise ValueError("--routers judge needs --judge-url and --judge-model (a served small tier)")
        from router.eval.routers import JudgeEvalRouter, openai_complete

        extra["judge"] = JudgeEvalRouter(openai_complete(args.judge_url, args.judge_model,
                                                         api_key=os.environ.get("TIERSERVE_API_KEY")))
    ds = load_dataset_noting(args)
    cascades = [n for n in names if n in CASCADE_CHOICES]
    if cascades and not ds.has_confidence:
        raise ValueError(f"--routers {','.join(cascades)} needs the weak model's confidence per query: "
                         "pass --weak-confidence-col COLUMN (and --weak-confidence-kind prob|logprob)")
    embedded = {"knn", "classifier", "cascade+knn", "cascade+classifier", "cascade-learned"}
    cache = embedding_cache(args) if embedded & set(names) else None
    models = [m.strip() for m in args.classifier_models.split(",") if m.strip()]
    report = run_eval(ds, names, cache, tune=not args.no_tune, progress=not args.quiet, classifier_models=models,
                      extra=extra, cost_ratio=args.cost_ratio)
    if args.config:  # GPU time beside the API-price view: the cheapest tier as weak, the last as strong
        from serving.config import load_config
        from serving.plan.cost import tier_costs, with_self_hosted

        app = load_config(args.config)
        costs = tier_costs(app)
        report = with_self_hosted(report, costs[app.tier_names[0]], costs[app.tier_names[-1]])
    json_path, png_path = write_report(report, args.out)
    print(format_table(report))
    if report.self_hosted:
        from serving.plan.cost import format_self_hosted

        print("\n".join(format_self_hosted(report.self_hosted)))
    print(f"\nwrote {json_path} and {png_path}")
    return 0


def _train_router(args) -> int:
    import numpy as np

    from router.classifier import DifficultyClassifier
    from router.eval.datasets import difficulty_label

    cache = embedding_cache(args)
    if args.from_querylog:
        from serving.querylog import read_records
        from serving.querylog.report import labelled_rows

        prompts, labels = labelled_rows(list(read_records(args.from_querylog, since=parse_since(args.since))))
        source = f"querylog:{args.from_querylog}"
        strong = weak = None
    elif args.dataset:
        train = load_dataset_noting(args).train
        prompts, labels = train["prompt"].tolist(), difficulty_label(train)
        strong, weak = train["strong"].to_numpy(float), train["weak"].to_numpy(float)
        source = f"{args.dataset}:train"
    else:
        raise ValueError("give --dataset (its train split is used) or --from-querylog DIR")
    if len(prompts) < 20:
        raise ValueError(f"only {len(prompts)} labelled rows; need at least 20 (query log: enable store_prompts)")
    vectors = cache.embed(prompts, progress=not args.quiet)
    texts = None if args.no_text_features else prompts
    c = args.c
    if c is None:
        from router.eval.tuning import tune_classifier

        if strong is None:  # log labels: the gain is the label itself
            strong, weak = labels, np.zeros_like(labels)
        fit_kw, tuned = tune_classifier(vectors, labels, strong, weak, prompts, embedder=cache.name,
                                        models=(args.model,), text_features=(texts is not None,),
                                        progress=not args.quiet)
        c = fit_kw["c"]
        print(f"chose C={c} (5-fold APGR on train {tuned.cv_apgr:.3f})")
    clf = DifficultyClassifier.fit(vectors, labels, embedder=cache.name, texts=texts, model=args.model, c=c,
                                   trained_on=source)
    path = clf.save(args.save)
    print(f"saved classifier ({len(prompts)} rows from {source}, embedder {cache.name}) to {path}")
    return 0


def _report(args) -> int:
    from router.eval.plot import plot_report
    from serving.querylog import read_records
    from serving.querylog.report import (
        cascade_over_time,
        format_cascade,
        format_report,
        routing_over_time,
    )

    directory = args.querylog or querylog_dir(args.config)
    records = list(read_records(directory, since=parse_since(args.since)))
    table = routing_over_time(records, args.bucket)
    print(f"{len(records)} requests in {directory}")
    print(format_report(table))
    target = args.target
    cascade = cascade_over_time(records, args.bucket, tier=args.tier)
    if target is None and args.config and not cascade.empty:
        from serving.config import load_config

        target = load_config(args.config).cascade.target_rate_for(cascade.attrs["tier"])
    cascade = cascade_over_time(records, args.bucket, tier=args.tier, target=target)
    print()
    print(format_cascade(cascade))
    print()
    print(_report_cost(records, args.config))
    print()
    print(_report_shadow(records, args.config))
    if args.png and not table.empty:
        print(f"wrote {plot_report(table, args.png, cascade=cascade)}")
    return 0


def _report_shadow(records, config: str | None) -> str:
    """The shadow section: agreement of the candidate router with the live one, its estimated cost and share
    of top-tier answers (`serving.querylog.shadow`)."""
    from serving.querylog.shadow import format_shadow, summarize_shadow

    tiers, ratio, basis = None, 1 / 8.75, "no --config: 8B vs 70B parameters assumed"
    if config:
        from serving.config import load_config
        from serving.plan.cost import tier_costs

        app = load_config(config)
        tiers = app.tier_names
        costs = tier_costs(app)
        small, large = costs[tiers[0]].gpu_s_per_1k, costs[tiers[-1]].gpu_s_per_1k
        if small and large:
            ratio, basis = small / large, "GPU-seconds per 1k tokens from the config's cost.*"
    if tiers is None:
        chains = [r.tier_chain for r in records if len(r.tier_chain) > 1]
        tiers = list(chains[0]) if chains else sorted({r.tier for r in records})
    if len(tiers) < 2:
        return "shadow: give --config to name the tiers"
    return format_shadow(summarize_shadow(records, tiers, ratio), ratio, basis)


def _report_cost(records, config: str | None) -> str:
    """The self-hosted cost section of `tierserve report` (GPU-seconds; needs the tiers' GPU shares)."""
    if not config:
        return "self-hosted cost: give --config for GPU-seconds per tier (resources.num_gpus, cost.*)"
    from serving.config import load_config
    from serving.plan.cost import tier_costs
    from serving.querylog.report import format_cost

    app = load_config(config)
    return format_cost(records, tier_costs(app), baseline=app.tier_names[-1])
