"""Capacity routing vs static routing under a burst on the large tier; streaming vs buffered cascade TTFT.

    .venv/bin/python benchmarks/capacity_cascade.py [--burst 48] [--gap 0.05]

Two runs of the real stack, side by side in one invocation:
  A. capacity routing on (`hard_mode: latency_first`), streaming cascade that holds back K tokens;
  B. static routing (capacity off), buffered cascade (the whole cheap answer before the first byte).
Both runs narrow the large engine (max_num_seqs 4) so the burst saturates it. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import time

import httpx

from benchmarks.stack import cpu_config, pct, post_many, running_stack, summary

HARD = "Compare the enforceability of non-compete clauses across three jurisdictions and advise step by step."


def _config(capacity_on: bool, stream_mode: str) -> dict:
    raw = cpu_config()
    tiers = copy.deepcopy(raw["tiers"])
    tiers[1]["engine"]["max_num_seqs"] = 4
    raw["tiers"] = tiers
    raw["capacity"] = {
        "enabled": capacity_on,
        "hard_mode": "latency_first",
        "poll_interval_s": 0.2,
        "stats_max_age_s": 1.0,
        "defaults": {"max_waiting": 1, "max_inflight": 64},
    }
    raw["cascade"] = {"streaming": {"mode": stream_mode, "holdback_tokens": 16}}
    return raw


def _burst(url: str, n: int, gap_s: float) -> dict:
    body = {"model": "router-knn-0.0", "messages": [{"role": "user", "content": HARD}],
            "max_tokens": 48, "ignore_eos": True}
    results = asyncio.run(post_many(url, [body] * n, gap_s=gap_s))
    ok = [r for r in results if r[0] == 200]
    latencies = [r[1] for r in ok]
    lower = sum(1 for r in ok if r[2]["x-tierserve-tier"] != "large")
    return {"n": n, "ok": len(ok), "latencies": latencies, "lower_share": lower / max(1, len(ok)),
            "statuses": sorted({r[0] for r in results})}


def _ttft(url: str, repeats: int, max_tokens: int) -> list[float]:
    body = {"model": "small", "messages": [{"role": "user", "content": "Summarize: tiers route requests."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "tierserve": {"cascade": True, "cascade_threshold": 0.0}}
    times = []
    with httpx.Client(timeout=300) as client:
        for _ in range(repeats):
            started = time.perf_counter()
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {") and '"content":"' in line:
                        times.append(time.perf_counter() - started)
                        break
                for _ in lines:  # drain the rest of the answer
                    pass
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=48, help="hard requests in the burst")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between burst arrivals")
    parser.add_argument("--ttft-repeats", type=int, default=8)
    parser.add_argument("--ttft-max-tokens", type=int, default=128)
    args = parser.parse_args()

    runs = {}
    for name, capacity_on, mode in (("capacity + streaming cascade", True, "prefix"),
                                    ("static + buffered cascade", False, "buffer")):
        with running_stack(_config(capacity_on, mode)) as (url, _, _):
            _ttft(url, 1, 8)  # warm up
            runs[name] = {"burst": _burst(url, args.burst, args.gap),
                          "ttft": _ttft(url, args.ttft_repeats, args.ttft_max_tokens)}

    print(f"\nBurst of {args.burst} hard requests (routed to large, max_num_seqs 4), one every {args.gap}s")
    for name, r in runs.items():
        b = r["burst"]
        print(f"  {name:<30} answered {b['ok']}/{b['n']}  latency {summary(b['latencies'])}  "
              f"answered by a lower tier: {100 * b['lower_share']:.0f}%  statuses {b['statuses']}")
    a, s = (runs[k]["burst"]["latencies"] for k in runs)
    print(f"  p99 ratio capacity/static: {pct(a, 99) / pct(s, 99):.2f}")
    print(f"\nTime to first token of a cascaded stream ({args.ttft_max_tokens} tokens, hold-back 16)")
    for name, r in runs.items():
        print(f"  {name:<30} {summary(r['ttft'])}")
    t_stream, t_buffer = (pct(runs[k]["ttft"], 50) for k in runs)
    print(f"  p50 ratio buffered/streaming: {t_buffer / t_stream:.1f}x")


if __name__ == "__main__":
    main()
