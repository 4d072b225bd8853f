"""`tierserve bench`: throughput and latency through tierserve, next to bare vLLM, on vLLM's own benchmark."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

DEFAULT_CONFIG = "deploy/cpu.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="serving benchmark (vLLM's benchmark module): tierserve vs bare vLLM, or the plumbing alone",
        description="Runs vLLM's serving benchmark (random dataset, greedy, ignore_eos) against tierserve started "
        "from --config, and with --side-by-side against bare vLLM's OpenAI server started from the same tier config "
        "(same engine arguments, same core binding), one at a time, alternating for --rounds rounds. Writes "
        "results.json, results.md and throughput.png to --out.",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"tierserve YAML (default: {DEFAULT_CONFIG})")
    p.add_argument("--tier", default=None, help="tier to load (default: the cheapest)")
    p.add_argument("--side-by-side", action="store_true", help="also run bare vLLM for the tier and print ratios")
    p.add_argument("--auto", action="store_true",
                   help="also load model=auto (the router decides; at --auto-threshold 1.0 every request stays "
                        "on the cheapest tier, so the difference is the routing decision alone)")
    p.add_argument("--auto-threshold", type=float, default=1.0,
                   help="the threshold model=auto is routed with (default 1.0; a real one, e.g. the config's, "
                        "shows which share the router's own embedder decides near it, and loads both tiers)")
    p.add_argument("--shadow", action="store_true",
                   help="with a config whose router.shadow is enabled: load model=auto twice per server and round, "
                        "with the shadow on every request and on none (tierserve.shadow), back to back on the same "
                        "stack, and print what the shadow cost per round (implies --auto)")
    p.add_argument("--plumbing", action="store_true",
                   help="load tierserve on the scripted engine instead (1,000 tokens/s per stream offered): "
                        "the tokens/s and requests/s the path around an engine can carry")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    p.add_argument("--concurrency", default="32,128", help="comma-separated concurrency levels (default 32,128)")
    p.add_argument("--modes", default="stream,unary", help="stream, unary or both (default both)")
    p.add_argument("--num-prompts", type=int, default=640,
                   help="prompts per run (at least 2x concurrency; the concurrency-1 run sends 48; default 640: about "
                        "10 s of load at 32 concurrent on the CPU box, where 160-prompt runs of 2-4 s swung up to "
                        "2x from round to round)")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--port", type=int, default=8011, help="port for the servers under test (default 8011)")
    p.add_argument("--out", default="benchmarks/out/bench", help="output folder (default benchmarks/out/bench)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from serving.bench import report as report_mod
    from serving.bench.sidebyside import Target, loads_for, run_bench
    from serving.cli.serve import ensure_tiny_models
    from serving.config import load_config, parse_config

    # SIGTERM ends the run like Ctrl-C, so every server under test is stopped (no orphaned engines).
    signal.signal(signal.SIGTERM, _interrupt)
    base = load_config(args.config)
    raw = base.model_dump(mode="json")
    raw["http"] = {**raw["http"], "host": "127.0.0.1", "port": args.port}
    # Everything else as shipped (the query log on, the admission limits as configured): past the limits
    # tierserve answers 503 with Retry-After where bare vLLM queues, and the table counts those as failed.
    config = parse_config(raw, args.config)
    if args.shadow and not config.router.shadow.enabled:
        raise ValueError(f"--shadow compares model=auto with and without router.shadow's candidate, but {args.config} "
                         "has router.shadow.enabled false; enable it (with a candidate) there.")
    ensure_tiny_models(config)
    tier = args.tier or config.tier_names[0]
    if tier not in config.tier_names:
        raise ValueError(f"--tier {tier!r} is not a tier of {args.config}; choose one of {config.tier_names}.")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"stream", "unary"} or not modes:
        raise ValueError(f"--modes {args.modes!r}: use stream, unary or stream,unary.")
    threshold = args.auto_threshold
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--auto-threshold {threshold}: a routing threshold is a difficulty from 0 to 1.")
    if args.plumbing:
        targets = [Target("plumbing", tier)]
    else:
        targets = [Target("tierserve", tier)]
        if args.shadow:
            targets += [Target(name, "auto", {"tierserve": {"threshold": threshold, "shadow": shadow}})
                        for name, shadow in (("tierserve-auto", False), ("tierserve-auto-shadow", True))]
        elif args.auto:
            targets.append(Target("tierserve-auto", "auto", {"tierserve": {"threshold": threshold}}))
        if args.side_by_side:
            targets.insert(0, Target("bare", config.tier(tier).served_model_name or tier))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = loads_for(concurrency, modes, args.num_prompts, args.input_len, args.output_len)
    result = run_bench(config, tier, targets, specs, rounds=args.rounds, port=args.port, log_dir=out)
    print(report_mod.write(result, out, _bench_cost(config, tier)))
    print(f"wrote {out}/results.json, results.md, throughput.png")
    return 0


def _bench_cost(config, tier: str):
    """The tier's GPU share and replica count, to price the measured throughput (autoscaled: min_replicas)."""
    from serving.bench.report import BenchCost
    from serving.plan.cost import tier_costs

    d = config.tier(tier).deployment
    replicas = max(1, d.autoscaling.min_replicas) if d.autoscaling else d.num_replicas
    return BenchCost(tier_costs(config)[tier], replicas)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
