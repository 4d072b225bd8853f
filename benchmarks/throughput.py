"""Serving throughput on the real stack: cold start, memory, output tokens/s at 1 and 32 concurrent.

    .venv/bin/python benchmarks/throughput.py [--max-tokens 64] [--concurrency 1,32]

Continuous batching shows as the ratio of tokens/s at 32 concurrent to tokens/s at 1, measured side by
side in one run. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from benchmarks.stack import cpu_config, post_many, running_stack, stack_rss_bytes


async def _measure(url: str, tier: str, concurrency: int, max_tokens: int) -> tuple[float, float]:
    body = {
        "model": tier,
        "prompt": "The quick brown fox jumps over the lazy dog.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.8,
    }
    await post_many(url, [body], path="/v1/completions")  # warm this tier
    started = time.perf_counter()
    results = await post_many(url, [body] * concurrency, path="/v1/completions")
    elapsed = time.perf_counter() - started
    assert all(r[0] == 200 for r in results), [r[3] for r in results if r[0] != 200][:1]
    tokens = sum(r[3]["usage"]["completion_tokens"] for r in results)
    return tokens / elapsed, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,32")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with running_stack(cpu_config()) as (url, config, cold_start):
        print(f"cold start (Ray + {len(config.tiers)} vLLM engines + router + ingress): {cold_start:.1f} s")
        print(f"resident memory of the running stack: {stack_rss_bytes() / 2**30:.2f} GiB")
        print(f"\n{'tier':<8}{'concurrency':>12}{'tokens/s':>12}{'seconds':>10}{'vs c=1':>9}")
        for tier in config.tier_names:
            base = None
            for c in levels:
                tps, secs = asyncio.run(_measure(url, tier, c, args.max_tokens))
                base = base or tps
                print(f"{tier:<8}{c:>12}{tps:>12.1f}{secs:>10.2f}{tps / base:>8.1f}x")
        print(f"\nresident memory after the load: {stack_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
