"""Nothing lost on the faster path: tierserve's answers are bare vLLM's, and vLLM's benchmark runs on it."""

from __future__ import annotations

import json

import httpx
import pytest

from serving.bench.bare import bare_vllm
from serving.bench.load import LoadSpec, run_load

from tests.e2e.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far"]


@pytest.fixture(scope="module")
def bare_url(stack: dict):  # noqa: ANN201
    with bare_vllm(stack["config"], "small", 8767) as url:
        yield url


def _tokens(stream_body: str) -> list[tuple[str, float]]:
    out = []
    for event in stream_body.split("\n\n"):
        data = event.removeprefix("data: ")
        if not data or data == "[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            lp = choice["logprobs"]
            out += list(zip(lp["tokens"], lp["token_logprobs"], strict=True))
    return out


def test_greedy_output_is_token_for_token_bare_vllms(base_url: str, bare_url: str) -> None:
    for prompt in PROMPTS:
        body = {"model": "small", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1}
        bare_body = httpx.post(bare_url + "/v1/completions", json=body, timeout=60).json()
        bare = bare_body["choices"][0]
        ours = httpx.post(base_url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
        assert ours["choices"][0]["text"] == bare["text"]
        assert ours["choices"][0]["logprobs"]["tokens"] == bare["logprobs"]["tokens"]
        assert ours["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            bare["logprobs"]["token_logprobs"], abs=1e-3
        )
        assert ours["usage"] == {k: bare_body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        # The stream, encoded by the tier replica, carries the same tokens and logprobs.
        streamed = httpx.post(base_url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                              timeout=60).text
        assert "".join(t for t, _ in _tokens(streamed)) == bare["text"]
        assert [lp for _, lp in _tokens(streamed)] == pytest.approx(bare["logprobs"]["token_logprobs"], abs=1e-3)


def test_greedy_chat_matches_bare_vllm(base_url: str, bare_url: str) -> None:
    body = {"model": "small", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Name three colours."}],
            "max_tokens": 20, "temperature": 0}
    bare = httpx.post(bare_url + "/v1/chat/completions", json=body, timeout=60).json()
    ours = httpx.post(base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60).json()
    assert ours["choices"][0]["message"]["content"] == bare["choices"][0]["message"]["content"]
    assert ours["usage"] == {k: bare["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


@pytest.mark.parametrize("stream", [True, False])
def test_vllm_benchmark_smoke_on_the_live_stack(base_url: str, stack: dict, stream: bool, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # vLLM's benchmark sends it as the bearer key
    tokenizer = str(stack["config"].model_path(stack["config"].tier("small")))
    result = run_load(base_url, "small", tokenizer,
                      LoadSpec(concurrency=4, num_prompts=8, input_len=16, output_len=8, stream=stream))
    assert (result.completed, result.failed) == (8, 0)
    assert result.output_tok_s > 0 and result.request_s > 0 and result.duration_s > 0
    assert 0 < result.ttft_p50_ms <= result.ttft_p99_ms
    assert result.ttft_p50_ms <= result.e2el_p99_ms
    if stream:  # time per output token and inter-token latency exist only for streams
        assert 0 < result.tpot_p50_ms <= result.tpot_p99_ms and result.itl_p50_ms > 0
