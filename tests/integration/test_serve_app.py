"""The real Serve app (ingress, wire, tier replicas, Ray Serve) on the scripted engine, over HTTP.

Below the e2e level: no vLLM, so each test knows exactly what the engine will say (its tokens, their
logprobs per tier) and can check routing, the cascade, SSE framing, errors and aborts precisely. The
engine is a real `Engine` subclass bound through `build_app(engine_cls=...)`, as Ray Serve LLM tests do.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import ray.cloudpickle

from serving.bench.load import LoadSpec, run_load
from serving.cli.serve import ensure_tiny_models
from serving.config import load_config
from serving.engines.scripted import ScriptedEngine
from tests.conftest import REPO
from tests.integration.scripted import running_app, scripted_config

PORT = 8766
URL = f"http://127.0.0.1:{PORT}"

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas import this test engine by value


class ScriptedTestEngine(ScriptedEngine):
    """200 steps/s; the small tier is unsure of itself (cascades escalate), the large one sure."""

    tokens_per_s = 200.0
    answer_tokens = 6
    logprob_by_tier = {"small": -2.0, "large": -0.01}


def _config() -> dict:
    return scripted_config(
        PORT, max_num_seqs=16, deployment={"max_ongoing_requests": 64},
        http={"request_timeout_s": 1.5},
        ingress={"num_replicas": 2, "num_cpus": 0.1},  # two replicas behind Ray Serve's HAProxy
        capacity={"enabled": True, "poll_interval_s": 0.1, "stats_max_age_s": 1.0, "defaults": {"max_inflight": 64}},
    )


@pytest.fixture(scope="module")
def app() -> Iterator[str]:
    with running_app(_config(), ScriptedTestEngine) as url:
        yield url


@pytest.fixture()
def client(app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app + "/v1", api_key="unused", max_retries=0, timeout=30)


def _running(tier: str) -> float:
    """The engine's running requests as the ingress reports them in /metrics."""
    for line in httpx.get(URL + "/metrics").text.splitlines():
        if line.startswith(f'tierserve_engine_running_requests{{tier="{tier}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_chat_answer_and_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == "alpha beta gamma "
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    assert raw.headers["x-tierserve-tier"] == "small" and raw.headers["x-tierserve-router"] == "explicit"
    assert reply.model_extra["tierserve"]["tier_chain"] == ["small"]


def test_stream_is_valid_sse_ending_in_done(app: str) -> None:
    body = {"model": "large", "prompt": "one two", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", app + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-tierserve-tier"] == "large"
        raw = b"".join(r.iter_bytes()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    assert raw.count('"tierserve"') == 3  # first, last and usage chunk
    assert '"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}' in raw


def test_engine_side_validation_is_a_400_naming_the_field_without_internals(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            out = client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                                 stop=["fail"], stream=stream)
            list(out) if stream else None
        body = err.value.body
        assert body["param"] == "stop" and "fail" in body["message"]
        assert not any(word in body["message"] for word in ("Ray", "pid=", "actor_id", "Traceback"))


def test_context_limit_and_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="small", prompt="word " * 600, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="medium", prompt="x")


def test_cascade_escalates_an_unsure_small_tier(client: openai.OpenAI) -> None:
    extra = {"tierserve": {"cascade": True, "cascade_threshold": 0.5}}
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=4, extra_body=extra
    )
    assert raw.headers["x-tierserve-tier-chain"] == "small,large"
    assert raw.headers["x-tierserve-escalated"] == "true"
    chunks = list(client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, extra_body=extra, stream=True))
    assert chunks[-1].model_extra["tierserve"]["tier_chain"] == ["small", "large"]
    assert chunks[-1].model_extra["tierserve"]["escalated"] is True


def test_client_disconnect_aborts_the_engine_request(app: str) -> None:
    body = {"model": "small", "prompt": "go", "max_tokens": 400, "ignore_eos": True}  # 2 s of tokens

    async def running_soon() -> bool:
        for _ in range(30):
            if await asyncio.to_thread(_running, "small") >= 1:
                return True
            await asyncio.sleep(0.05)
        return False

    async def hang_up(stream: bool, url: str) -> float:
        """Start a long request, see it running in the engine, drop the connection; when did it stop?"""
        async with httpx.AsyncClient(timeout=30) as c:
            if stream:
                async with c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                    async for _ in r.aiter_bytes():
                        assert await running_soon()
                        break
            else:
                call = asyncio.ensure_future(c.post(url + "/v1/completions", json=body))
                assert await running_soon()
                call.cancel()
        left = time.monotonic()
        zeros = 0
        while zeros < 4 and time.monotonic() - left < 5:  # both ingress replicas' views agree
            zeros = zeros + 1 if await asyncio.to_thread(_running, "small") == 0 else 0
            await asyncio.sleep(0.05)
        return time.monotonic() - left

    # Through Ray Serve's HAProxy a stream's abort arrives at once (its writes fail). A whole answer sends nothing
    # until it is done, and HAProxy did not always pass the client's close on while it waited (`CD--` in its
    # log): that case is bounded by http.request_timeout_s, so here it is checked on the replica's own port.
    assert asyncio.run(hang_up(True, app)) < 1.5  # aborted, not run to the end (that takes 2 s)
    assert asyncio.run(hang_up(False, ingress_replica_url())) < 1.5


def ingress_replica_url() -> str:
    """An ingress replica's own HTTP server (Ray's direct ingress), as HAProxy's config on this node lists it."""
    import glob
    import os
    import re

    newest = max(glob.glob("/tmp/haproxy-serve/*/haproxy.cfg"), key=os.path.getmtime)
    match = re.search(r"server SERVE_REPLICA_tierserve-ingress\S* (\S+:\d+)", open(newest).read())
    assert match, "no ingress replica in HAProxy's config"
    return f"http://{match.group(1)}"


def test_two_ingress_replicas_share_the_port(app: str) -> None:
    async def burst() -> list[int]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as c:
            rs = await asyncio.gather(*(c.post(app + "/v1/completions", json={"model": "small", "prompt": "x",
                                                                                "max_tokens": 2})
                                        for _ in range(40)))
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 40
    totals = set()
    for _ in range(30):  # new connection each time: the kernel spreads them over both replicas
        metrics = httpx.get(URL + "/metrics", headers={"connection": "close"}).text
        served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith('tierserve_requests_total{endpoint="completions"'))
        totals.add(served)
    assert len(totals) >= 2  # two registries, i.e. two replicas answered


def test_request_timeout_is_a_504_and_stops_the_engine_work(app: str) -> None:
    body = {"model": "small", "prompt": "go", "max_tokens": 480, "ignore_eos": True}  # 2.4 s of tokens
    r = httpx.post(app + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 504 and "request_timeout_s" in r.json()["error"]["message"]
    with httpx.stream("POST", app + "/v1/completions", json={**body, "stream": True}, timeout=30) as s:
        assert s.status_code == 200
        raw = b"".join(s.iter_bytes()).decode()
    assert '"type":"timeout_error"' in raw and raw.endswith("data: [DONE]\n\n")
    # The gauge is each ingress replica's polled copy of the engine's load (two replicas here, either may answer
    # /metrics): it can lag the engine by a poll or a replica's start-up, hence the wait.
    deadline = time.monotonic() + 10
    while _running("small") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running("small") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_the_benchmark_keeps_why_requests_failed(app: str, stream: bool) -> None:
    """`tierserve bench` lists each failure's reason: 200 concurrent half-second requests overflow the two ingress
    replicas' admission limit (64 in flight each), and the refusals reach the result with their reasons."""
    config = load_config(REPO / "deploy" / "cpu.yaml")
    ensure_tiny_models(config)  # vLLM's random dataset needs a tokenizer
    tokenizer = str(config.model_path(config.tier("small")))
    spec = LoadSpec(concurrency=200, num_prompts=400, input_len=8, output_len=100, stream=stream)
    result = run_load(app, "small", tokenizer, spec)
    assert result.failed > 0 and result.completed + result.failed == 400
    assert sum(result.errors.values()) == result.failed
    # a stream's failure is the status line's reason (vLLM's request function), a unary one the error's body;
    # on a busy machine a queued unary request may also hit the app's 1.5 s request timeout
    refused = ("Too Many Requests", "Service Unavailable") if stream else ("requests in flight",)
    timed_out = ("Gateway Timeout", "request_timeout_s")
    assert any(any(r in e for r in refused) for e in result.errors), result.errors
    assert all(any(r in e for r in refused + timed_out) for e in result.errors), result.errors
