"""The OpenAI-compatible API over HTTP, with the unchanged `openai` SDK, against the real stack."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY

pytestmark = pytest.mark.e2e
USER = [{"role": "user", "content": "Extract the date from: the meeting is on 3 May."}]


def _assert_logprobs_consistent(tokens: list, completion_tokens: int) -> None:
    assert len(tokens) == completion_tokens
    for t in tokens:
        assert t.logprob <= 0.0 and math.isfinite(t.logprob)


def test_models_lists_auto_and_every_tier(client: openai.OpenAI, stack: dict) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["auto", *stack["config"].tier_names]


def test_health_is_ready_with_every_tier_behind_rays_haproxy_ingress(base_url: str) -> None:
    r = httpx.get(f"{base_url}/health")
    assert r.status_code == 200
    # the one serving mode: `tierserve up`, the e2e stack and the Helm chart all run Ray Serve's HAProxy ingress
    assert r.json() == {"status": "ready", "tiers": {"small": True, "large": True}, "ingress": "haproxy"}


@pytest.mark.parametrize("tier", ["small", "large"])
def test_chat_completion_with_logprobs(client: openai.OpenAI, tier: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=tier, messages=USER, max_tokens=12, logprobs=True, top_logprobs=3, temperature=0.0
    )
    assert raw.headers["x-tierserve-tier"] == tier
    r = raw.parse()
    choice = r.choices[0]
    assert r.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= r.usage.completion_tokens <= 12
    _assert_logprobs_consistent(choice.logprobs.content, r.usage.completion_tokens)
    for t in choice.logprobs.content:
        assert len(t.top_logprobs) == 3
        best = t.top_logprobs[0].logprob
        assert all(best >= alt.logprob for alt in t.top_logprobs)
        assert t.logprob <= best + 1e-5  # greedy or not, nothing beats the top-1
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert r.model_extra["tierserve"]["tier"] == tier


def test_greedy_is_deterministic_and_matches_streaming(client: openai.OpenAI) -> None:
    kwargs = dict(model="small", messages=USER, max_tokens=10, temperature=0.0)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
    )
    assert a == b == streamed


def test_chat_streaming_with_usage_and_logprobs(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="large", messages=USER, max_tokens=9, stream=True, logprobs=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    tokens = [t for c in content_chunks for t in (c.choices[0].logprobs.content or [])]
    _assert_logprobs_consistent(tokens, usage.completion_tokens)
    # The decision rides on the first and the last chunks (the headers carry it from the start).
    assert chunks[0].model_extra["tierserve"]["tier"] == chunks[-1].model_extra["tierserve"]["tier"] == "large"


def test_completions_non_streaming_and_streaming(client: openai.OpenAI) -> None:
    r = client.completions.create(model="small", prompt="Once upon a time", max_tokens=7, logprobs=2, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion"
    assert len(choice.logprobs.token_logprobs) == r.usage.completion_tokens == 7  # random weights: EOS is rare
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="small", prompt="Once upon a time", max_tokens=7, temperature=0, stream=True)
    )
    assert streamed == choice.text


def test_32_concurrent_requests_all_succeed() -> None:
    async def main(base_url: str) -> list:
        async with openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=300) as c:
            calls = [
                c.chat.completions.create(
                    model=("small", "large")[i % 2], messages=[{"role": "user", "content": f"request {i}"}],
                    max_tokens=16, extra_body={"ignore_eos": True},
                )
                for i in range(32)
            ]
            return await asyncio.gather(*calls)

    from tests.e2e.conftest import PORT

    results = asyncio.run(main(f"http://127.0.0.1:{PORT}/v1"))
    assert len(results) == 32
    assert all(r.usage.completion_tokens == 16 for r in results)
    assert {r.model_extra["tierserve"]["tier"] for r in results} == {"small", "large"}


def test_vllm_engine_metrics_reach_rays_metrics_port(client: openai.OpenAI) -> None:
    """The small tier sets engine.vllm_metrics; the large one does not."""
    import ray

    if not ray.is_initialized():
        pytest.skip("the stack runs in another process (TIERSERVE_TEST_URL)")
    client.chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        series = [line for line in text.splitlines() if line.startswith("ray_vllm_prompt_tokens_total{")]
        if any('model_name="small"' in line for line in series) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert any('model_name="small"' in line for line in series), "no vLLM engine metrics for the small tier"
    assert not any('model_name="large"' in line for line in series)
