"""Shared by the serving benchmarks: start the real stack with a config, measure, stop it."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import yaml

from serving import launch
from serving.config import AppConfig, parse_config
from serving.models.tiny import generate_tiny_models

REPO = Path(__file__).resolve().parent.parent


def cpu_config(**overrides: object) -> dict:
    """deploy/cpu.yaml as a dict, with top-level sections replaced by `overrides`."""
    cfg = yaml.safe_load((REPO / "deploy" / "cpu.yaml").read_text())
    cfg["http"] = {"host": "127.0.0.1", "port": 8790}
    cfg["query_log"] = {"enabled": False}
    cfg.update(overrides)
    return cfg


@contextmanager
def running_stack(raw: dict) -> Iterator[tuple[str, AppConfig, float]]:
    """(base URL, config, cold-start seconds) while the stack runs."""
    config = parse_config(raw, "benchmark")
    generate_tiny_models(config.resolved_data_dir() / "models")
    started = time.perf_counter()
    url = launch.start(config)
    cold_start = time.perf_counter() - started
    try:
        yield url, config, cold_start
    finally:
        launch.stop()


def stack_rss_bytes() -> int:
    """Resident memory of this process and every Ray / vLLM process on the machine."""
    total = psutil.Process().memory_info().rss
    for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and ("ray::" in cmd or "VLLM" in cmd or "raylet" in cmd or "gcs_server" in cmd
                                     or (p.info["name"] or "").startswith(("VLLM", "ray::", "raylet", "gcs_server"))):
            total += p.info["memory_info"].rss if p.info["memory_info"] else 0
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    return f"p50 {pct(values, 50):.3f}s  p99 {pct(values, 99):.3f}s  mean {statistics.fmean(values):.3f}s  n={len(values)}"


async def post_many(url: str, bodies: list[dict], gap_s: float = 0.0, path: str = "/v1/chat/completions") -> list:
    """POST every body (staggered by gap_s); returns (status, seconds, headers, json) per request."""

    async def one(client: httpx.AsyncClient, i: int, body: dict) -> tuple:
        await asyncio.sleep(i * gap_s)
        t = time.perf_counter()
        r = await client.post(url + path, json=body, timeout=600)
        return r.status_code, time.perf_counter() - t, r.headers, r.json()

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=512)) as client:
        return await asyncio.gather(*(one(client, i, b) for i, b in enumerate(bodies)))
