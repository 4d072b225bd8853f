"""`model="auto"` goes through the router deployment (real MiniLM + Qdrant local mode + shipped exemplars)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
import ray

from tests.e2e.conftest import ADMIN_KEY, API_KEY

pytestmark = pytest.mark.e2e
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}

# Written for this test, not taken from the shipped exemplars.
ROUTINE = [
    "Pull the phone number out of this line: 'Call Dana at 555-0142 after lunch.'",
    "Is 'jane.doe@@example.org' a valid email address? Answer yes or no.",
    "Convert 'twelve thousand five hundred' to digits.",
]
HARD = [
    "A patient on warfarin starts amiodarone and has a new INR of 5.8 with mild gum bleeding; weigh the options "
    "for reversal against thrombotic risk and justify a management plan step by step.",
    "Compare the enforceability of a non-compete clause under California, New York and German law for a remote "
    "engineer, and advise the employer on drafting risks.",
    "Design and implement a lock-free multi-producer multi-consumer queue in C++ with hazard-pointer memory "
    "reclamation, then prove it is linearizable.",
]


def _route(base_url: str, body: dict) -> dict:
    r = httpx.post(base_url + "/v1/route", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize(("prompt", "tier"), [(p, "small") for p in ROUTINE] + [(p, "large") for p in HARD])
def test_auto_routes_by_difficulty_with_visible_decision(client: openai.OpenAI, prompt: str, tier: str) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=3
    )
    if "x-tierserve-capacity" not in raw.headers:  # load may move it; the router's pick is in routed_tier
        assert raw.headers["x-tierserve-tier"] == tier
    assert raw.headers["x-tierserve-router"] == "knn"
    score = float(raw.headers["x-tierserve-score"])
    assert (score >= 0.5) == (tier == "large")
    assert float(raw.headers["x-tierserve-overhead-ms"]) > 0
    meta = raw.parse().model_extra["tierserve"]
    assert meta["routed_tier"] == tier and meta["router"] == "knn" and not meta["fallback"]
    assert meta["score"] == pytest.approx(score, abs=1e-4)


def test_first_and_last_sse_chunk_carry_the_decision(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": HARD[0]}], max_tokens=5, stream=True
    )
    assert raw.headers["x-tierserve-tier"] == "large"
    chunks = list(raw.parse())
    assert len(chunks) >= 3
    for edge in (chunks[0], chunks[-1]):
        assert edge.model_extra["tierserve"]["tier"] == "large"
        assert edge.model_extra["tierserve"]["router"] == "knn"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all("tierserve" not in c.model_extra for c in chunks[1:-1])  # not repeated on every token


def test_threshold_in_model_name_moves_the_boundary(base_url: str) -> None:
    msg = [{"role": "user", "content": HARD[1]}]
    assert _route(base_url, {"model": "auto", "messages": msg})["tier"] == "large"
    lenient = _route(base_url, {"model": "router-knn-1.0", "messages": msg})
    assert lenient["tier"] == "small" and lenient["thresholds"] == [1.0]
    strict = _route(base_url, {"model": "router-knn-0.0", "messages": [{"role": "user", "content": ROUTINE[0]}]})
    assert strict["tier"] == "large"
    heuristic = _route(base_url, {"model": "router-heuristic", "messages": msg})
    assert heuristic["router"] == "heuristic" and heuristic["fallback"] is False
    cheapest = _route(base_url, {"model": "router-cheapest", "messages": msg})
    assert (cheapest["tier"], cheapest["router"], cheapest["fallback"]) == ("small", "cheapest", False)


def test_body_knobs_force_a_tier_or_skip_routing(client: openai.OpenAI, base_url: str) -> None:
    msg = [{"role": "user", "content": HARD[2]}]
    r = client.chat.completions.create(model="auto", messages=msg, max_tokens=2, extra_body={"tierserve": {"tier": "small"}})
    assert r.model_extra["tierserve"]["tier"] == "small" and r.model_extra["tierserve"]["router"] == "forced"
    r = client.chat.completions.create(model="auto", messages=msg, max_tokens=2, extra_body={"tierserve": {"routing": False}})
    assert r.model_extra["tierserve"]["router"] == "cheapest"
    bad = httpx.post(base_url + "/v1/route", headers=AUTH,
                     json={"model": "auto", "messages": msg, "tierserve": {"tier": "huge"}})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "tierserve.tier"
    bad = httpx.post(base_url + "/v1/route", headers=AUTH, json={"model": "router-knn-7", "messages": msg})
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"


def test_far_from_a_boundary_the_ingress_decides_as_the_router_would(client: openai.OpenAI, base_url: str) -> None:
    """The static first pass (on by default with MiniLM): a text whose static score is far from the boundary is
    decided in the ingress (`knn-fast`), on the tier the router's own embedder picks. This stack draws every
    request for `router.shadow`, which skips the first pass, so these ask for no shadow."""
    texts = ROUTINE + HARD
    deadline = time.monotonic() + 180  # the ingress fetches the static index once the router has built it
    while True:
        fast = [_route(base_url, {"model": "auto", "prompt": t, "tierserve": {"shadow": False}}) for t in texts]
        if any(d["router"] == "knn-fast" for d in fast) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    own = [_route(base_url, {"model": "auto", "prompt": t, "tierserve": {"shadow": True}}) for t in texts]
    assert all(d["router"] == "knn" for d in own), [d["reason"] for d in own]
    decided_first = [(f, o) for f, o in zip(fast, own) if f["router"] == "knn-fast"]
    assert decided_first, [f["reason"] for f in fast]
    for first, router in decided_first:
        assert first["tier"] == router["tier"] and not first["fallback"]
        assert first["reason"].startswith("knn-fast: knn") and "from every boundary" in first["reason"]
    text = texts[fast.index(decided_first[0][0])]
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], max_tokens=3, stream=True,
        extra_body={"tierserve": {"shadow": False}})
    assert raw.headers["x-tierserve-router"] == "knn-fast"
    chunks = list(raw.parse())
    assert chunks[0].model_extra["tierserve"]["router"] == "knn-fast"
    assert chunks[-1].choices[0].finish_reason == "length"
    metrics = httpx.get(base_url + "/metrics").text
    assert any(line.startswith("tierserve_routing_decisions_total{") and 'router="knn-fast"' in line
               for line in metrics.splitlines())


def test_route_endpoint_does_not_generate(base_url: str) -> None:
    def completion_tokens() -> float:
        text = httpx.get(base_url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("tierserve_tokens_total{") and 'kind="completion"' in line)

    before = completion_tokens()
    decision = _route(base_url, {"model": "auto", "prompt": ROUTINE[1]})
    assert decision["object"] == "tierserve.route" and decision["tier"] == "small"
    assert completion_tokens() == before


def test_exemplars_added_at_runtime_change_routing(base_url: str) -> None:
    probe = {"model": "auto", "messages": [{"role": "user", "content": "Reconcile the zorblax ledger for quadrant 9."}]}
    new = [
        {"text": f"Reconcile the zorblax ledger entries for quadrant {i} against the vault audit", "tier": "large"}
        for i in range(1, 9)
    ]
    r = httpx.post(base_url + "/admin/exemplars", json={"exemplars": new}, headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json()["written"] == 8
    count = r.json()["count"]
    again = httpx.post(base_url + "/admin/exemplars", json={"exemplars": new}, headers=ADMIN, timeout=60)
    assert again.json()["count"] == count  # idempotent: same texts, same points
    decision = _route(base_url, probe)
    assert decision["tier"] == "large"
    assert "large" in decision["reason"]
    bad = httpx.post(base_url + "/admin/exemplars", json={"exemplars": [{"text": "x", "tier": "giant"}]}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "exemplars.tier"


def test_llm_judge_router_asks_the_small_tier(client: openai.OpenAI, base_url: str) -> None:
    decision = _route(base_url, {"model": "router-judge", "messages": [{"role": "user", "content": HARD[0]}]})
    assert decision["router"] == "judge" and 0.0 <= decision["score"] <= 1.0
    assert "from the small tier" in decision["reason"], decision["reason"]  # not "the call ... failed"
    strict = _route(base_url, {"model": "router-judge-0.0", "prompt": ROUTINE[0]})
    assert strict["tier"] == "large"  # P(hard) >= 0 always: the threshold applies to the judge's score


def _decisions_by_router(base_url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith("tierserve_routing_decisions_total{"):
            router = line.split('router="')[1].split('"')[0]
            counts[router] = counts.get(router, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _overflow_exemplars(base_url: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith("tierserve_router_overflow_exemplars "):
            return float(line.split()[1])
    return 0.0


def test_a_burst_past_the_router_is_decided_by_knn_on_static_vectors(base_url: str) -> None:
    """`router.overflow: static` (the default with MiniLM): a burst the router cannot embed within
    `max_queue_wait_s` is decided by kNN on the static embedder's vectors, in the router and in the ingress's
    copy of its index, never by the heuristic; hard texts still go to the large tier."""
    import asyncio

    _route(base_url, {"model": "auto", "prompt": ROUTINE[0]})  # the ingress follows the overflow from now on
    deadline = time.monotonic() + 120  # made in the background at the router's start (the fit is cached)
    while _overflow_exemplars(base_url) == 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert _overflow_exemplars(base_url) > 0, "the ingress never received the router's overflow index"
    # Distinct texts (the decision cache answers none of them), the hard ones long: a full embedding for MiniLM.
    filler = " ".join(HARD)
    texts = [f"Request {i}: {filler}" if i % 2 else f"Request {i}: {ROUTINE[i % 3]}" for i in range(160)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(base_url + "/v1/route", headers=AUTH,
                                                    json={"model": "auto", "prompt": t}) for t in texts))

    before = _decisions_by_router(base_url)
    answers = asyncio.run(burst())
    after = _decisions_by_router(base_url)
    assert all(a.status_code == 200 for a in answers)
    decided = {k: after[k] - before.get(k, 0.0) for k in after if after[k] > before.get(k, 0.0)}
    assert decided.get("knn-static", 0) > 0, decided
    # None was left to the busy heuristic (a call that timed out on the way may still fall back: another cause).
    others = [a.json()["reason"] for a in answers if a.headers["x-tierserve-router"] not in ("knn", "knn-static")]
    assert not any("router busy" in reason for reason in others), others
    assert len(others) <= 0.05 * len(texts), others
    static = [(i, a.json()) for i, a in enumerate(answers) if a.headers["x-tierserve-router"] == "knn-static"]
    assert static and all(d["fallback"] is False and d["reason"].startswith("knn-static: knn") for _, d in static)
    right = sum(d["routed_tier"] == ("large" if i % 2 else "small") for i, d in static)
    assert right >= 0.8 * len(static), [(i, d["routed_tier"]) for i, d in static]
    # The router works through what it took before the next test routes (MiniLM decides a fresh text again).
    deadline, i = time.monotonic() + 60, 0
    while _route(base_url, {"model": "auto", "prompt": f"Drain check {i}: {ROUTINE[1]}"})["router"] != "knn":
        assert time.monotonic() < deadline, "the router did not drain within 60 s"
        i += 1
        time.sleep(0.5)


def test_qdrant_unavailable_mid_run_falls_back_then_recovers(client: openai.OpenAI, base_url: str) -> None:
    """The exemplar store closes (as a Qdrant outage would): 200s via the heuristic, then kNN again."""
    r = httpx.post(base_url + "/admin/router/release-store", json={"seconds": 4}, headers=ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["released_for_s"] == 4
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": HARD[1]}], max_tokens=2
    )
    assert raw.status_code == 200
    meta = raw.parse().model_extra["tierserve"]
    assert raw.headers["x-tierserve-router"] == "heuristic-fallback", meta
    assert meta["fallback"] is True and "store" in meta["reason"]
    time.sleep(4.5)
    # The store reopens on the first decision due after the release; that decision may still time out in the
    # ingress while the store loads (the heuristic answers it), the ones after it are kNN's again.
    deadline, decision = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        decision = _route(base_url, {"model": "auto", "prompt": HARD[1]})
        if decision["router"] == "knn":
            break
        time.sleep(0.5)
    assert decision["router"] == "knn", decision["reason"]
    bad = httpx.post(base_url + "/admin/router/release-store", json={"seconds": -1}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "seconds"


def test_router_down_falls_back_to_heuristic_and_recovers(client: openai.OpenAI, base_url: str) -> None:
    """Kill the router replica mid-run (embedder + Qdrant gone): requests still answer 200, decided by the heuristic
    or the ingress's copy of the static overflow."""
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "router" in a["name"] and "REPLICA" in a["name"]]
    assert names, "router replica actor not found"
    for actor in names:
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        ray.kill(handle, no_restart=True)
        with pytest.raises(ray.exceptions.RayActorError):  # the kill has taken effect before the request below
            ray.get(handle.__ray_ready__.remote(), timeout=30)

    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": ROUTINE[2]}], max_tokens=2
    )
    assert raw.status_code == 200
    # The call fails at once (the heuristic decides), or waits past ingress.router_timeout_s while Serve replaces
    # the replica (the ingress's copy of the static overflow decides: kNN on static vectors).
    meta, router = raw.parse().model_extra["tierserve"], raw.headers["x-tierserve-router"]
    assert router in ("heuristic-fallback", "knn-static"), meta
    assert (meta["fallback"] is True) if router == "heuristic-fallback" else ("router_timeout_s" in meta["reason"])
    assert "tierserve_router_fallbacks_total" in httpx.get(base_url + "/metrics").text

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # Ray Serve replaces the replica; kNN routing resumes
        if _route(base_url, {"model": "auto", "prompt": ROUTINE[0]})["router"] == "knn":
            break
        time.sleep(2)
    else:
        pytest.fail("router did not recover within 180 s")
