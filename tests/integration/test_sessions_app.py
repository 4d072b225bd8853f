"""Sticky sessions through the real Serve app on the scripted engine: a conversation keeps its tier.

The router is `cheapest` (every fresh request starts on small) and the scripted small tier is unsure of
its answers, so a cascade escalates it to large: a session that escalated must stay on large, one that did
not on small, and a named tier must still win. One ingress replica: each replica holds its own map.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import openai
import pytest
import ray.cloudpickle

from serving.engines.scripted import ScriptedEngine
from tests.integration.scripted import running_app, scripted_config

PORT = 8772
ESCALATE = {"tierserve": {"cascade": True, "cascade_threshold": 0.5}}

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SessionTestEngine(ScriptedEngine):
    """Fast; the small tier's answers score e^-2 (below 0.5: the cascade escalates), the large one's ~1."""

    tokens_per_s = 500.0
    answer_tokens = 4
    logprob_by_tier = {"small": -2.0, "large": -0.01}


def _config() -> dict:
    return scripted_config(
        PORT, max_num_seqs=8, ingress={"num_replicas": 1, "num_cpus": 0.1},
        sessions={"enabled": True, "ttl_s": 600, "max_entries": 100},
    )


@pytest.fixture(scope="module")
def app() -> Iterator[str]:
    with running_app(_config(), SessionTestEngine) as url:
        yield url


@pytest.fixture()
def client(app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=app + "/v1", api_key="unused", max_retries=0, timeout=30)


def _turns(opening: str, later: int) -> list[dict]:
    """A chat opening with `opening`, then `later` more (assistant, user) exchanges."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": opening}]
    for i in range(later):
        messages += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"more {i}"}]
    return messages


def _ask(client: openai.OpenAI, messages: list[dict], model: str = "auto", **kw: object) -> tuple[dict, dict]:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=3, **kw)
    return raw.parse().model_extra["tierserve"], dict(raw.headers)


def test_an_escalated_conversation_stays_on_the_large_tier(client: openai.OpenAI) -> None:
    meta, _ = _ask(client, _turns("escalate me", 0), extra_body=ESCALATE)
    assert meta["router"] == "cheapest" and meta["tier_chain"] == ["small", "large"]
    for later in (1, 2):
        meta, headers = _ask(client, _turns("escalate me", later))
        assert headers["x-tierserve-router"] == "session" and headers["x-tierserve-tier"] == "large"
        assert meta["routed_tier"] == "large" and meta["tier_chain"] == ["large"]
        assert "stays on large" in meta["reason"] and "conversation" in meta["reason"]


def test_a_conversation_that_was_not_escalated_stays_small_and_others_route_afresh(client: openai.OpenAI) -> None:
    assert _ask(client, _turns("stay small", 0))[0]["tier"] == "small"
    meta, _ = _ask(client, _turns("stay small", 1), extra_body=ESCALATE)
    assert meta["router"] == "session" and meta["tier_chain"] == ["small", "large"]  # escalates this turn...
    meta, _ = _ask(client, _turns("stay small", 2))
    assert meta["router"] == "session" and meta["tier"] == "large"  # ...and the session moved with it
    never_seen = _ask(client, _turns("a thread this replica never answered", 3))[0]
    assert never_seen["router"] == "cheapest" and never_seen["tier"] == "small"


def test_a_new_chat_with_a_known_opening_is_routed_on_its_own(client: openai.OpenAI) -> None:
    _ask(client, _turns("same opener", 0), extra_body=ESCALATE)
    assert _ask(client, _turns("same opener", 1))[0]["tier"] == "large"
    fresh = _ask(client, _turns("same opener", 0))[0]  # a first turn restarts the session
    assert fresh["router"] == "cheapest" and fresh["tier"] == "small"
    assert _ask(client, _turns("same opener", 1))[0]["tier"] == "small"


def test_a_named_tier_wins_and_leaves_the_session_alone(client: openai.OpenAI) -> None:
    _ask(client, _turns("pinned", 0), extra_body=ESCALATE)
    meta, _ = _ask(client, _turns("pinned", 1), model="small")
    assert meta["router"] == "explicit" and meta["tier"] == "small"
    meta, _ = _ask(client, _turns("pinned", 1), extra_body={"tierserve": {"tier": "small"}})
    assert meta["router"] == "forced" and meta["tier"] == "small"
    assert _ask(client, _turns("pinned", 2))[0]["tier"] == "large"


def test_the_header_keys_a_session_for_completions_and_streams(app: str) -> None:
    def complete(session: str, stream: bool = False, **extra: object) -> tuple[str, str]:
        body = {"model": "auto", "prompt": f"prompt {stream}", "max_tokens": 3, "stream": stream, **extra}
        r = httpx.post(app + "/v1/completions", json=body, headers={"x-tierserve-session": session}, timeout=30)
        assert r.status_code == 200, r.text
        return r.headers["x-tierserve-router"], r.headers["x-tierserve-tier"]

    assert complete("h-1") == ("cheapest", "small")
    assert complete("h-1") == ("session", "small")
    assert complete("h-1", stream=True, **ESCALATE) == ("session", "large")  # a cascade stream is judged first
    assert complete("h-1") == ("session", "large")
    assert complete("h-2") == ("cheapest", "small")
    bad = httpx.post(app + "/v1/completions", json={"model": "auto", "prompt": "x"},
                     headers={"x-tierserve-session": "x" * 300}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-tierserve-session"


def test_the_route_preview_shows_the_sticky_decision(app: str, client: openai.OpenAI) -> None:
    _ask(client, _turns("preview", 0), extra_body=ESCALATE)
    r = httpx.post(app + "/v1/route", json={"model": "auto", "messages": _turns("preview", 1)}, timeout=30)
    assert r.status_code == 200 and r.json()["router"] == "session" and r.json()["tier"] == "large"
