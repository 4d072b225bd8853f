"""Soak: mixed load with injected faults for N minutes; nothing may be lost and memory must stay flat.

    .venv/bin/python -m benchmarks.soak --minutes 5                  # starts the CPU stack itself
    .venv/bin/python -m benchmarks.soak --minutes 30 --url http://127.0.0.1:8000 --admin-key sk-admin

Load: closed-loop clients sending a mix (chat streaming and not, to `auto` and to each tier; completions;
invalid bodies; streams dropped after the first bytes). Faults, one every `--fault-every` seconds in turn:
SIGKILL a tier replica, close the router's exemplar store for 5 s (admin API), SIGKILL the router replica.
Prints a line per interval and a summary: sent / 2xx / 4xx / 429-503 / 5xx / lost (no response at all), the
stack's resident memory over time, and writes a plot. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from benchmarks.stack import cpu_config, running_stack, stack_rss_bytes

ADMIN_KEY = "sk-soak-admin"
PROMPTS = ["Say hello.", "Extract the number from: INV-2231.",
           "Compare two sorting algorithms step by step and prove the bound of the faster one.",
           "Summarize: tiers route requests by difficulty."]


def _request(i: int) -> tuple[str, dict | bytes, bool]:
    """(path, body, abandon) for the i-th request of the mix."""
    kind = i % 10
    prompt = PROMPTS[i % len(PROMPTS)]
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24}
    if kind in (0, 1, 2):
        return "/v1/chat/completions", {**chat, "model": "auto", "stream": kind == 0}, False
    if kind in (3, 4):
        return "/v1/chat/completions", {**chat, "model": ("small", "large")[kind - 3], "stream": True}, False
    if kind == 5:
        return "/v1/completions", {"model": "small", "prompt": prompt, "max_tokens": 16}, False
    if kind == 6:
        return "/v1/chat/completions", {**chat, "model": "small", "temperature": 9}, False  # 400
    if kind == 7:
        return "/v1/chat/completions", b"{not json", False  # 400
    if kind == 8:
        return "/v1/chat/completions", {**chat, "model": "auto", "stream": True, "max_tokens": 200}, True
    return "/v1/chat/completions", {**chat, "model": "large"}, False


async def _client(client: httpx.AsyncClient, counter: itertools.count, stop_at: float, tally: Counter) -> None:
    while time.monotonic() < stop_at:
        i = next(counter)
        path, body, abandon = _request(i)
        kwargs = {"content": body, "headers": {**client.headers, "content-type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body}
        tally["sent"] += 1
        try:
            async with client.stream("POST", path, **kwargs) as r:
                if abandon and r.status_code == 200:
                    async for _ in r.aiter_bytes():
                        break
                    tally["abandoned"] += 1
                    continue
                text = (await r.aread()).decode(errors="replace")
            status = r.status_code
            if status == 200 and text.startswith("data:") and '"error"' in text:
                tally["stream error event"] += 1
            bucket = "2xx" if status < 300 else "429/503" if status in (429, 503) else "4xx" if status < 500 else "5xx"
            tally[bucket] += 1
            if status in (429, 503):
                await asyncio.sleep(min(2.0, float(r.headers.get("retry-after", "1"))))
        except (httpx.TransportError, httpx.TimeoutException):
            tally["lost"] += 1


def _kill_replica(deployment: str) -> str:
    for proc in psutil.process_iter(["cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith(f"ray::ServeReplica:tierserve:{deployment}"):
            proc.kill()
            return f"SIGKILL {deployment} replica (pid {proc.pid})"
    return f"no {deployment} replica found"


async def _faults(url: str, every_s: float, stop_at: float, admin_key: str, log: list[tuple[float, str]]) -> None:
    faults = itertools.cycle(["tier-small", "store", "tier-large", "router"])
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() + every_s < stop_at:
            await asyncio.sleep(every_s)
            fault = next(faults)
            if fault == "store":
                r = await client.post("/admin/router/release-store", json={"seconds": 5},
                                      headers={"Authorization": f"Bearer {admin_key}"})
                what = f"release the exemplar store for 5 s -> {r.status_code}"
            else:
                what = _kill_replica(fault)
            log.append((time.monotonic() - start, what))
            print(f"  t={time.monotonic() - start:6.1f}s fault: {what}", flush=True)


async def soak(url: str, minutes: float, concurrency: int, fault_every_s: float, admin_key: str,
               api_key: str | None) -> dict:
    stop_at = time.monotonic() + minutes * 60
    tally: Counter = Counter()
    faults: list[tuple[float, str]] = []
    samples: list[tuple[float, float, dict]] = []
    counter = itertools.count()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        async def sample() -> None:
            while time.monotonic() < stop_at:
                samples.append((time.monotonic() - start, stack_rss_bytes() / 2**20, dict(tally)))
                t, rss, c = samples[-1]
                print(f"  t={t:6.1f}s rss {rss:7.0f} MiB  " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())),
                      flush=True)
                await asyncio.sleep(10)

        tasks = [asyncio.create_task(_client(client, counter, stop_at, tally)) for _ in range(concurrency)]
        side = [asyncio.create_task(sample()), asyncio.create_task(_faults(url, fault_every_s, stop_at, admin_key,
                                                                            faults))]
        await asyncio.gather(*tasks)
        for task in side:
            task.cancel()
    samples.append((time.monotonic() - start, stack_rss_bytes() / 2**20, dict(tally)))
    return {"tally": dict(tally), "faults": faults, "samples": samples}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in result["samples"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(t, [s[1] for s in result["samples"]])
    top.set_ylabel("stack RSS (MiB)")
    for key in ("2xx", "4xx", "429/503", "5xx", "lost"):
        bottom.plot(t, [s[2].get(key, 0) for s in result["samples"]], label=key)
    for at, _ in result["faults"]:
        for ax in (top, bottom):
            ax.axvline(at / 60, color="grey", linestyle=":", linewidth=0.8)
    bottom.set_ylabel("requests (cumulative)")
    bottom.set_xlabel("minutes (dotted: injected faults)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fault-every", type=float, default=45.0, help="seconds between injected faults")
    parser.add_argument("--url", help="a running stack (default: start the CPU stack here)")
    parser.add_argument("--admin-key", default=ADMIN_KEY, help="admin key of the running stack (--url)")
    parser.add_argument("--api-key", help="data-plane key of the running stack (--url), if it has keys")
    parser.add_argument("--out", default="benchmarks/out/soak", help="folder for soak.json and soak.png")
    args = parser.parse_args()
    random.seed(0)

    def run(url: str) -> dict:
        return asyncio.run(soak(url, args.minutes, args.concurrency, args.fault_every, args.admin_key, args.api_key))

    if args.url:
        result = run(args.url)
    else:
        raw = cpu_config()
        raw["http"]["admin_keys"] = [args.admin_key]
        with running_stack(raw) as (url, _, cold_start):
            print(f"stack up in {cold_start:.0f} s at {url}")
            result = run(url)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / "soak.png")
    tally, samples = result["tally"], result["samples"]
    answered = sum(tally.get(k, 0) for k in ("2xx", "4xx", "429/503", "5xx")) + tally.get("abandoned", 0)
    print(f"\nsoak {args.minutes:g} min, {len(result['faults'])} faults: sent {tally.get('sent', 0)}, "
          f"2xx {tally.get('2xx', 0)}, 4xx {tally.get('4xx', 0)}, 429/503 {tally.get('429/503', 0)}, "
          f"5xx {tally.get('5xx', 0)}, lost {tally.get('lost', 0)}, abandoned on purpose "
          f"{tally.get('abandoned', 0)}, streams ended by an error event {tally.get('stream error event', 0)}; "
          f"answered {answered} of {tally.get('sent', 0)}")
    print(f"stack RSS: {samples[0][1]:.0f} MiB at start, {max(s[1] for s in samples):.0f} max, "
          f"{samples[-1][1]:.0f} at the end; plot {out / 'soak.png'}")


if __name__ == "__main__":
    main()
