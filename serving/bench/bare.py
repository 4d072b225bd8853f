"""Bare vLLM's own OpenAI server, started from a tier's config: the yardstick for `tierserve bench`.

Same engine arguments (`serving.engines.vllm.engine_kwargs`) and the same environment (core binding included,
`serving.engines.vllm.engine_env`) as the tier's engine inside tierserve, so a side-by-side run compares only
what tierserve puts around the engine. Stats logging is on in both, vLLM's default; bare vLLM then runs vLLM's
own Prometheus and console stat loggers, which tierserve replaces with a lighter load tracker (part of what it
puts around the engine). The server's own processes stay where the OS puts them, as a user runs it: with
its server and scheduler pinned off the engine's core (tierserve's placement then), bare vLLM carried
1,064-2,697 tok/s instead of 3,369-4,614 at 32 and 128 concurrent streams on the 2-core CPU box, and with
`--disable-log-stats` also held each stream's tokens back and sent them in one burst (TTFT 146-216 ms at
concurrency 1, 8 ms unpinned).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from serving.config import AppConfig
from serving.engines.vllm import engine_env, engine_kwargs
from serving.launch import StartupError


def server_args(kwargs: dict[str, Any]) -> list[str]:
    """vLLM engine kwargs -> `vllm.entrypoints.openai.api_server` flags (booleans as --x / --no-x)."""
    args: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if key == "disable_log_stats":
            if value:
                args.append(flag)
        elif isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            args += [flag, str(value)]
    return args


@contextmanager
def bare_vllm(config: AppConfig, tier_name: str, port: int, *, wait_s: float = 300.0,
              log_path: Path | None = None) -> Iterator[str]:
    """Run bare vLLM's OpenAI server for one tier on 127.0.0.1:port; yields its base URL."""
    tier = next(t for t in config.tiers if t.name == tier_name)
    kwargs = engine_kwargs(tier, config.model_path(tier), config.device)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--disable-uvicorn-access-log", *server_args(kwargs)]
    env = {**os.environ, **engine_env(tier, config.device)}
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, wait_s)
        yield url
    finally:
        _stop(proc)
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartupError(f"bare vLLM server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise StartupError(f"bare vLLM server not ready within {wait_s:.0f} s at {url}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group and wait, so its EngineCore exits with it."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
