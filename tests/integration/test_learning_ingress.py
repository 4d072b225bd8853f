"""The ingress's learning hooks on the real parts, without Ray: the ingress replica's parts built as
`Ingress.__init__` builds them, the router in its process (`router.placement: ingress`, the bundled MiniLM,
embedded Qdrant), scripted tiers behind real wire servers, HTTP through the ingress's own ASGI app.

A cascade's escalations become exemplars (provenance `cascade`) and move a similar prompt's decision;
exploration starts requests routed up on the cheap tier and logs it; the shadow's decision is logged beside
the live one; feedback needs a key and only the key that got an answer may score it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.learn import key_id
from serving.config import parse_config
from serving.engines.scripted import ScriptedEngine
from serving.ingress.app import _Asgi
from serving.querylog import read_records
from tests.inprocess import PROBE, TAUGHT, build_ingress, serve_tiers

KEY_A, KEY_B, ADMIN = "sk-learn-a", "sk-learn-b", "sk-learn-admin"
HARD = "Prove that every bounded monotone sequence of real numbers converges, citing the completeness axiom."


class Tier(ScriptedEngine):
    tokens_per_s = 1000.0
    answer_tokens = 8
    logprob_by_tier = {"small": -2.0, "large": -0.01}  # the small tier is unsure: confidence e^-2 = 0.14


def _ingress(data_dir: Path) -> Any:
    tier = {"engine": {"kv_cache_memory_bytes": 1 << 20}}
    config = parse_config({
        "data_dir": str(data_dir),
        "tiers": [{"name": "small", "model": "s", **tier}, {"name": "large", "model": "l", **tier}],
        "http": {"api_keys": [KEY_A, KEY_B], "admin_keys": [ADMIN]},
        "cascade": {"enabled": True, "threshold": 0.5},
        "sessions": {"enabled": False},
        "query_log": {"path": str(data_dir / "querylog")},  # TIERSERVE_DATA_DIR (the tests' cache) wins over
        "router": {"placement": "ingress", "default_router": "knn", "max_queue_wait_s": None,  # data_dir
                   "store": {"refresh_s": 0.5, "path": str(data_dir / "qdrant")},
                   "learn": {"enabled": True, "flush_interval_s": 0.3, "explore_rate": 0.5},
                   "shadow": {"enabled": True, "candidate": "knn", "threshold": 0.3, "max_queue_wait_s": 5.0}},
    }, "learning")
    return build_ingress(config)




def _chat(text: str, **tierserve: object) -> dict:
    return {"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": text}],
            **({"tierserve": tierserve} if tierserve else {})}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """Runs one coroutine against the ingress (a client on its ASGI app, the tiers served), in one event loop."""
    ingress = _ingress(tmp_path_factory.mktemp("learning"))
    loop = asyncio.new_event_loop()
    servers = loop.run_until_complete(serve_tiers(ingress, Tier))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=_Asgi(ingress)), base_url="http://ingress",
                               timeout=60)
    yield lambda scenario: loop.run_until_complete(scenario(client, ingress))
    loop.run_until_complete(client.aclose())
    for server in servers:
        server.close()
    ingress.recorder.close()
    ingress.router.close()
    loop.run_until_complete(asyncio.sleep(0.1))  # let the cancelled tasks finish
    loop.close()


async def _route(client: httpx.AsyncClient, text: str) -> dict:
    r = await client.post("/v1/route", json=_chat(text), headers=_auth(KEY_A))
    assert r.status_code == 200, r.text
    return r.json()


def test_escalations_become_exemplars_and_move_a_similar_prompts_decision(run) -> None:
    async def scenario(client: httpx.AsyncClient, ingress: Any) -> None:
        before = await _route(client, PROBE)
        assert before["tier"] == "small" and before["router"] == "knn", (before["reason"], before["score"])
        seeded = (await client.get("/admin/exemplars/versions", headers=_auth(ADMIN))).json()["active"]
        for text in TAUGHT:  # routed to small; the unsure small answer escalates
            r = await client.post("/v1/chat/completions", json=_chat(text), headers=_auth(KEY_A))
            assert r.status_code == 200, r.text
            meta = r.json()["tierserve"]
            assert meta["routed_tier"] == "small" and meta["tier_chain"] == ["small", "large"], meta
        deadline = time.monotonic() + 30
        while (after := await _route(client, PROBE))["tier"] != "large":
            assert time.monotonic() < deadline, f"the probe still routes to {after['tier']}: {after['reason']}"
            await asyncio.sleep(0.2)
        learned = (await client.get("/admin/exemplars?source=learned&limit=50", headers=_auth(ADMIN))).json()["data"]
        taught = {e["text"]: e for e in learned}
        assert set(TAUGHT) <= set(taught)
        assert {(taught[t]["tier"], taught[t]["provenance"], taught[t]["key_id"]) for t in TAUGHT} == {
            ("large", "cascade", key_id(KEY_A))}
        versions = (await client.get("/admin/exemplars/versions", headers=_auth(ADMIN))).json()
        assert versions["data"][-1]["kind"] == "learn" and versions["active"] == versions["data"][-1]["version"]
        assert ingress.metrics.registry.get_sample_value(
            "tierserve_learn_verdicts_total", {"kind": "observe", "verdict": "learned"}) >= len(TAUGHT)
        assert versions["active"] > seeded
        rolled = await client.post("/admin/exemplars/rollback", json={"version": seeded}, headers=_auth(ADMIN))
        assert rolled.status_code == 200 and rolled.json()["kind"] == "rollback", rolled.text
        assert (await _route(client, PROBE))["tier"] == "small"  # the old decision, at once
        missing = await client.post("/admin/exemplars/rollback", json={"version": 10_000}, headers=_auth(ADMIN))
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "version"
        denied = await client.post("/admin/exemplars/rollback", json={"version": seeded}, headers=_auth(KEY_A))
        assert denied.status_code == 403

    run(scenario)


def test_exploration_and_the_shadow_are_logged_beside_the_live_decision(run) -> None:
    async def scenario(client: httpx.AsyncClient, ingress: Any) -> dict:
        ids = []
        for _ in range(12):  # routed up; each explores with probability 1/2 (by its id)
            r = await client.post("/v1/chat/completions", json=_chat(HARD), headers=_auth(KEY_B))
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        ingress.recorder.query_log.flush()
        records = {r.request_id: r for r in read_records(ingress.recorder.query_log.directory)}
        mine = [records[i] for i in ids]
        assert {r.routed_tier for r in mine} == {"large"}
        explored = [r for r in mine if r.explored]
        assert explored and len(explored) < len(mine)
        assert {r.tier_chain[0] for r in explored} == {"small"}  # started on the cheap tier, judged by the cascade
        assert {r.tier_chain for r in mine if not r.explored} == {("large",)}
        # The candidate: the same neighbours against a lower boundary, so it sends these up too.
        assert all(r.shadow_router == "knn@0.3" and r.shadow_tier == "large" for r in mine), mine[0]
        assert all(0.3 <= r.shadow_score <= 1 for r in mine)

    run(scenario)


def test_feedback_needs_a_key_and_only_the_key_that_got_the_answer_may_score_it(run) -> None:
    async def scenario(client: httpx.AsyncClient, ingress: Any) -> None:
        # Kept on the small tier (a low cascade threshold for this request): an answer open for feedback.
        r = await client.post("/v1/chat/completions", json=_chat("Say hello.", cascade_threshold=0.05),
                              headers=_auth(KEY_A))
        assert r.json()["tierserve"]["tier_chain"] == ["small"], r.json()["tierserve"]
        answer = r.json()["id"]
        body = {"response_id": answer, "score": 0.1}
        assert (await client.post("/v1/feedback", json=body)).status_code == 401
        foreign = await client.post("/v1/feedback", json=body, headers=_auth(KEY_B))
        unknown = await client.post("/v1/feedback", json={**body, "response_id": "chatcmpl-nope"},
                                    headers=_auth(KEY_B))
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.json()["error"]["message"].replace(answer, "X") == \
            unknown.json()["error"]["message"].replace("chatcmpl-nope", "X")  # nothing tells them apart
        bad = await client.post("/v1/feedback", json={**body, "score": 1.5}, headers=_auth(KEY_A))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "score"
        ok = await client.post("/v1/feedback", json=body, headers=_auth(KEY_A))
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"object": "tierserve.feedback", "response_id": answer, "verdict": "learned",
                             "learned": True, "label": "large"}  # a bad score: the tier above should answer
        again = await client.post("/v1/feedback", json=body, headers=_auth(KEY_A))
        assert again.status_code == 404  # one score per answer

    run(scenario)
