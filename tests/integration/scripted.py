"""The real Serve app on a scripted engine, for integration tests: a config and a running app."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from serving import launch
from serving.config import parse_config
from serving.engines.scripted import ScriptedEngine


def scripted_config(port: int, *, max_num_seqs: int, deployment: dict | None = None, **sections: object) -> dict:
    """Two scripted tiers (small, large) on a local cluster, HTTP on `port`; `sections` add or replace
    top-level config sections (their `http` is merged with host and port)."""
    tier: dict = {"engine": {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": 256, "max_model_len": 512,
                             "kv_cache_memory_bytes": 1 << 20},
                  "resources": {"num_cpus": 0.1}}
    if deployment:
        tier["deployment"] = deployment
    http = {"host": "127.0.0.1", "port": port, **dict(sections.pop("http", {}))}  # type: ignore[arg-type]
    return {
        "tiers": [{"name": "small", "model": "scripted-small", **tier}, {"name": "large", "model": "scripted-large", **tier}],
        "http": http,
        "ray": {"num_cpus": 4},
        "router": {"default_router": "cheapest"},
        "query_log": {"enabled": False},
        **sections,
    }


@contextmanager
def running_app(raw: dict, engine_cls: type[ScriptedEngine]) -> Iterator[str]:
    """The app started from `raw` with `engine_cls` in every tier replica; its base URL while it runs."""
    url = launch.start(parse_config(raw, "scripted"), wait_s=180, engine_cls=engine_cls)
    try:
        yield url
    finally:
        launch.stop()
