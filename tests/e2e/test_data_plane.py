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
def bare_url(stack: dict):
    with bare_vllm(stack["config"], "small", 8767) as url:
        yield url


def _stream(url: str, body: dict, headers: dict | None = None) -> tuple[str, list[float]]:
    """A completion stream's text and token logprobs, joined from its events."""
    raw = httpx.post(url + "/v1/completions", json={**body, "stream": True}, headers=headers, timeout=60).text
    text, logprobs = "", []
    for event in raw.split("\n\n"):
        data = event.removeprefix("data: ")
        if not data or data == "[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            text += choice["text"]
            logprobs += choice["logprobs"]["token_logprobs"]
    return text, logprobs


def test_greedy_output_is_token_for_token_bare_vllms(base_url: str, bare_url: str) -> None:
    for prompt in PROMPTS:
        body = {"model": "small", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1}
        bare = httpx.post(bare_url + "/v1/completions", json=body, timeout=60).json()
        ours = httpx.post(base_url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()
        assert ours["choices"][0]["text"] == bare["choices"][0]["text"]
        assert ours["choices"][0]["logprobs"]["tokens"] == bare["choices"][0]["logprobs"]["tokens"]
        assert ours["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            bare["choices"][0]["logprobs"]["token_logprobs"], abs=1e-3
        )
        usage = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert ours["usage"] == {k: bare["usage"][k] for k in usage}
        # Streamed, through the tier replica's own encoder: the same events' text and logprobs as vLLM's stream.
        ours_text, ours_lps = _stream(base_url, body, AUTH)
        bare_text, bare_lps = _stream(bare_url, body)
        assert ours_text == bare_text and len(ours_lps) == 24
        assert ours_lps == pytest.approx(bare_lps, abs=1e-3)


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


def test_auto_runs_report_their_routing_decisions_apart(base_url: str, stack: dict, monkeypatch) -> None:
    """What `tierserve bench --auto` prints beside the throughput: the decisions taken during the run."""
    from serving.bench.sidebyside import decision_figures, overhead_snapshot

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    tokenizer = str(stack["config"].model_path(stack["config"].tier("small")))
    before = overhead_snapshot(base_url)
    result = run_load(base_url, "auto", tokenizer, LoadSpec(concurrency=4, num_prompts=8, input_len=16, output_len=8))
    decisions = decision_figures(before, overhead_snapshot(base_url))
    assert (result.completed, result.failed) == (8, 0)
    assert decisions is not None and decisions.count == 8 + 4  # the timed requests and one warm-up wave
    assert sum(decisions.by_router.values()) == decisions.count  # each decision counted once, by who took it
    assert 0 < decisions.p50_ms <= decisions.p99_ms < 2000


def test_the_serving_processes_run_at_bare_vllms_priority(stack: dict) -> None:
    """The ingress, the tier replicas and their engines run at nice 0, as bare vLLM does, not at the nice 15 Ray
    gives its workers: there every nice-0 process on the node (Ray's own daemons, a client) took the core first."""
    import psutil

    serving = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith(("ray::ServeReplica:tierserve:ingress", "ray::ServeReplica:tierserve:tier-")):
            serving[title.split()[0]] = proc
            for child in proc.children(recursive=True):  # the engine's scheduler and workers
                serving[f"{title.split()[0]} > {child.name()}:{child.pid}"] = child
    assert any("tier-small >" in name for name in serving), sorted(serving)  # the engine's processes were found
    assert {name: proc.nice() for name, proc in serving.items() if proc.nice() != 0} == {}
