"""The router learns from the live stack's own traffic (`router.learn`, `router.shadow` in e2e_config_dict):
a cascade's outcome becomes an exemplar and moves a similar prompt's next decision, a rollback restores the
old decision, the shadow's decision is logged beside the live one, and feedback needs a key and refuses
another key's response id. Only the LEARN_KEYS teach; the test rolls the store back to where it found it."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from router.learn import key_id
from serving.querylog import read_records
from tests.e2e.conftest import ADMIN_KEY, API_KEY, LEARN_KEYS
from tests.inprocess import PROBE, TAUGHT

pytestmark = pytest.mark.e2e
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TEACHER, OTHER = ({"Authorization": f"Bearer {k}"} for k in LEARN_KEYS)
# PROBE and TAUGHT (tests/inprocess.py): the shipped exemplars call such requests routine.


def _route(base_url: str, text: str) -> dict:
    r = httpx.post(base_url + "/v1/route", json={"model": "auto", "messages": [{"role": "user", "content": text}]},
                   headers=TEACHER, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _chat(base_url: str, text: str, key: str, cascade_threshold: float) -> dict:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": text}], max_tokens=4,
        extra_body={"tierserve": {"cascade": True, "cascade_threshold": cascade_threshold}})
    return {"id": reply.id, **reply.model_extra["tierserve"]}


def _until(predicate, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not (got := predicate()):
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(0.25)
    return got


def test_cascade_outcomes_teach_the_router_and_a_rollback_undoes_it(base_url: str) -> None:
    start = httpx.get(base_url + "/admin/exemplars/versions", headers=ADMIN, timeout=30).json()["active"]
    before = _route(base_url, PROBE)
    assert before["tier"] == "small" and before["router"] == "knn", before["reason"]
    try:
        # Threshold 1: the small tier's answer is never confident enough, so each escalates. Sent at once, so all
        # are routed before any outcome is learned: one after another, a flush (every second) between two of them
        # could already send the later, similar ones to the large tier.
        with ThreadPoolExecutor(len(TAUGHT)) as pool:
            metas = list(pool.map(lambda text: _chat(base_url, text, LEARN_KEYS[0], cascade_threshold=1.0), TAUGHT))
        for meta in metas:
            assert meta["routed_tier"] == "small" and meta["tier_chain"] == ["small", "large"], meta
        after = _until(lambda: (d := _route(base_url, PROBE))["tier"] == "large" and d,
                       "the probe routed to the large tier after the escalations were learned")
        assert after["router"] == "knn" and "large" in after["reason"]
        learned = httpx.get(base_url + "/admin/exemplars", params={"source": "learned", "limit": 1000},
                            headers=ADMIN, timeout=30).json()["data"]
        taught = {e["text"]: e for e in learned if e["text"] in TAUGHT}
        assert set(taught) == set(TAUGHT)
        assert {(e["tier"], e["provenance"], e["key_id"]) for e in taught.values()} == {
            ("large", "cascade", key_id(LEARN_KEYS[0]))}
        versions = httpx.get(base_url + "/admin/exemplars/versions", headers=ADMIN, timeout=30).json()
        assert versions["active"] > start and versions["data"][-1]["kind"] == "learn"
    finally:
        rolled = httpx.post(base_url + "/admin/exemplars/rollback", json={"version": start}, headers=ADMIN,
                            timeout=60)
    assert rolled.status_code == 200 and rolled.json()["kind"] == "rollback", rolled.text
    assert _route(base_url, PROBE)["tier"] == "small"  # the old decision, with no restart


def test_the_shadow_decision_is_logged_beside_the_live_one(base_url: str) -> None:
    meta = _chat(base_url, "Say hello to the team.", API_KEY, cascade_threshold=0.0)  # a key that never teaches
    log = Path(os.environ["TIERSERVE_DATA_DIR"]) / "querylog"

    def record():
        return next((r for r in read_records(log) if r.request_id == meta["id"]), None)

    logged = _until(record, "the query record")
    assert (logged.routed_tier, logged.router) == (meta["routed_tier"], "knn")
    assert logged.shadow_router == "knn@0.3" and logged.shadow_tier in ("small", "large")
    assert logged.shadow_score == pytest.approx(meta["score"], abs=1e-6)  # the same neighbours, another boundary


def test_feedback_needs_a_key_and_refuses_another_keys_response(base_url: str) -> None:
    start = httpx.get(base_url + "/admin/exemplars/versions", headers=ADMIN, timeout=30).json()["active"]
    # Kept on the small tier (threshold 0: always confident enough): an answer open for feedback.
    meta = _chat(base_url, "Say hello to the team.", LEARN_KEYS[0], cascade_threshold=0.0)
    assert meta["tier_chain"] == ["small"], meta
    body = {"response_id": meta["id"], "score": 1.0}
    url = base_url + "/v1/feedback"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    foreign = httpx.post(url, json=body, headers=OTHER, timeout=30)
    unknown = httpx.post(url, json={**body, "response_id": "chatcmpl-0"}, headers=OTHER, timeout=30)
    assert foreign.status_code == unknown.status_code == 404, foreign.text
    assert foreign.json()["error"]["code"] == unknown.json()["error"]["code"] == "response_not_found"
    opted_out = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert opted_out.status_code == 403 and opted_out.json()["error"]["code"] == "opted_out"
    own = httpx.post(url, json=body, headers=TEACHER, timeout=30)
    assert own.status_code == 200, own.text
    assert own.json()["verdict"] == "learned" and own.json()["label"] == "small"  # a good answer: its tier
    assert httpx.post(url, json=body, headers=TEACHER, timeout=30).status_code == 404  # one score per answer
    # Leave the store as it was: once the exemplars learned here (the feedback's, and maybe the cascade's
    # own `kept`) are written, roll them back.
    _until(lambda: httpx.get(base_url + "/admin/exemplars/versions", headers=ADMIN, timeout=30).json()["active"]
           != start, "the learned exemplar written")
    time.sleep(2.5)  # the next flush, for an exemplar learned after the first
    rolled = httpx.post(base_url + "/admin/exemplars/rollback", json={"version": start}, headers=ADMIN, timeout=60)
    assert rolled.status_code == 200, rolled.text
