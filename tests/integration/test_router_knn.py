"""kNN routing on real parts: the bundled MiniLM, Qdrant in local mode, the shipped exemplars.

Held-out prompts below were written for this test and are not in router/data/default_exemplars.jsonl.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from router.config import RouterConfig
from router.core import Router
from router.embed import default_embedder
from router.exemplars import load_default_exemplars, read_exemplars
from router.store import ExemplarStore
from router.types import Exemplar, RouteInput
from serving import cli
from tests.routing import route

TIERS = ["small", "large"]

NEAR_SMALL = [
    "Pull the customer's account number out of this support email.",
    "Convert this list of temperatures from Celsius to Fahrenheit: 10, 20, 30.",
    "Is this a valid US social security number format: 123-45-678?",
    "Classify this tweet's sentiment as positive or negative: 'Loving the new update!'",
    "What is the capital city of Canada?",
    "Reformat this phone number with dashes: 2125551234.",
    "Extract all the dollar amounts from this paragraph.",
    "Translate 'see you tomorrow' into Italian.",
]
NEAR_LARGE = [
    "Prove that every finite group of prime order is cyclic, and generalize the argument to groups of order p squared.",
    "Review this employment contract's arbitration clause and analyze whether it is enforceable under federal and "
    "state law, citing the relevant doctrines.",
    "A 58-year-old with atrial fibrillation on apixaban needs emergency surgery; walk through reversal options, "
    "bleeding risk and perioperative management.",
    "Implement a wait-free snapshot object in C++ for concurrent readers and writers and prove its correctness.",
    "Synthesize the findings of these six conflicting studies on minimum wage and employment into one assessment, "
    "weighing their methodology.",
    "We discovered our hiring algorithm rejects older applicants more often; analyze the legal exposure and design a "
    "remediation plan.",
    "Design a sharded, strongly consistent key-value store that survives the loss of a whole region, and explain the "
    "failure handling step by step.",
]


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, embedder):
    """A router over a fresh local store, seeded with the default exemplars at first start."""
    router = Router.build(RouterConfig(), TIERS, tmp_path_factory.mktemp("data"), embedder=embedder)
    yield router
    router.close()


def test_held_out_prompts_are_not_exemplars():
    known = {ex.id for ex in load_default_exemplars()}
    assert not known & {Exemplar(t, "small").id for t in NEAR_SMALL + NEAR_LARGE}


def test_first_start_seeds_the_default_exemplars(seeded):
    defaults = load_default_exemplars()
    assert len(defaults) >= 300
    assert seeded.store.count() == len(defaults)
    assert seeded.store.counts_by_tier() == {
        tier: sum(ex.tier == tier for ex in defaults) for tier in ("large", "medium", "small")
    }


@pytest.mark.parametrize("text", NEAR_SMALL)
def test_routine_prompts_go_to_small(seeded, text):
    [decision] = route(seeded, [text])
    assert decision.router == "knn" and not decision.fallback
    assert decision.tier == "small", decision.reason
    assert decision.score < 0.5
    assert decision.neighbors[0].tier == "small"


@pytest.mark.parametrize("text", NEAR_LARGE)
def test_hard_prompts_go_to_large(seeded, text):
    [decision] = route(seeded, [text])
    assert decision.tier == "large", decision.reason
    assert decision.score >= 0.5


def test_batch_matches_single_decisions_and_keeps_order(seeded):
    texts = NEAR_SMALL + NEAR_LARGE
    batch = route(seeded, texts)
    assert [d.tier for d in batch] == ["small"] * len(NEAR_SMALL) + ["large"] * len(NEAR_LARGE)
    assert all(d.batch_size == len(texts) and d.overhead_ms >= d.embed_ms > 0 for d in batch)
    single = [route(seeded, [t])[0].score for t in texts]
    np.testing.assert_allclose([d.score for d in batch], single, atol=1e-5)


def test_per_request_threshold_and_router(seeded):
    hard = NEAR_LARGE[1]
    [default] = route(seeded, [hard])
    [strict] = route(seeded, [hard], threshold=min(1.0, default.score + 0.01))
    assert strict.tier == "small" and strict.thresholds == (min(1.0, default.score + 0.01),)
    [cheap] = route(seeded, [hard], router_kind="cheapest")
    assert cheap.tier == "small" and cheap.router == "cheapest"
    [heur] = route(seeded, [hard], router_kind="heuristic")
    assert heur.router == "heuristic" and not heur.fallback and heur.reason.startswith("heuristic:")


def test_import_and_reimport_never_duplicates(tmp_path, embedder):
    path = tmp_path / "ex.jsonl"
    rows = [
        {"prompt": "Alphabetize these five city names.", "label": "easy"},
        {"prompt": "Derive the optimal stopping rule for the secretary problem.", "label": "hard"},
        {"prompt": "alphabetize   these five CITY names.", "label": "easy"},  # same text, normalized
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exemplars = read_exemplars(
        path, text_column="prompt", tier_column="label", label_map={"easy": "small", "hard": "large"}
    )
    store = ExemplarStore(collection="imp", dim=embedder.dim, path=tmp_path / "q")
    router = Router(RouterConfig(seed_default_exemplars=False), TIERS, embedder=embedder, store=store)
    router.add_exemplars(exemplars)
    assert store.count() == 2
    router.add_exemplars(exemplars)
    assert store.count() == 2
    listed = {item.exemplar.text: item.exemplar.tier for item in store.list()}
    assert set(listed.values()) == {"small", "large"}
    assert all(item.exemplar.source == "ex.jsonl" for item in store.list())
    [decision] = route(router, ["Derive the optimal stopping rule for the secretary problem."])
    assert decision.tier == "large" and decision.neighbors[0].similarity == pytest.approx(1.0, abs=1e-4)
    assert store.delete(tier="small") == 1 and store.count() == 1
    store.close()


def test_matrix_search_agrees_with_qdrant_search(tmp_path, embedder):
    exemplars = load_default_exemplars()[:120]
    vectors = embedder.embed([ex.text for ex in exemplars])
    queries = embedder.embed(NEAR_SMALL + NEAR_LARGE)
    results = {}
    for mode in ("matrix", "qdrant"):
        store = ExemplarStore(collection="c", dim=embedder.dim, path=tmp_path / "q", local_search=mode)
        if mode == "matrix":
            store.upsert(exemplars, vectors)
        results[mode] = store.query(queries, 5)
        store.close()
    for got, want in zip(results["matrix"], results["qdrant"]):
        assert [n.id for n in got] == [n.id for n in want]
        np.testing.assert_allclose([n.similarity for n in got], [n.similarity for n in want], atol=1e-5)


def test_store_failure_falls_back_to_heuristic_and_is_counted(tmp_path, embedder):
    causes = []
    store = ExemplarStore(collection="c", dim=embedder.dim, path=tmp_path / "q")
    router = Router(RouterConfig(), TIERS, embedder=embedder, store=store, on_fallback=causes.append)
    router.add_exemplars(load_default_exemplars()[:50])
    store.close()  # Qdrant goes away under the router: every query now raises
    decisions = route(router, [NEAR_LARGE[1], NEAR_SMALL[0]])
    assert [d.router for d in decisions] == ["heuristic", "heuristic"]
    assert all(d.fallback for d in decisions)
    assert "knn unavailable (store)" in decisions[0].reason
    assert router.fallbacks["store"] == 2 and causes == ["store", "store"]
    assert decisions[0].tier == "large"  # the heuristic sees legal + analysis keywords
    [later] = route(router, [NEAR_SMALL[0]])
    assert later.fallback and router.fallbacks["store_unavailable"] == 1


def test_router_reopens_a_lost_store_and_recovers(tmp_path, embedder):
    router = Router.build(
        RouterConfig(seed_default_exemplars=False), TIERS, tmp_path, embedder=embedder, store_retry_s=0.0
    )
    router.add_exemplars(load_default_exemplars()[:60])
    router.store.close()
    [lost] = route(router, [NEAR_SMALL[0]])
    assert lost.fallback and router.fallbacks == {"store": 1}
    [back] = route(router, [NEAR_SMALL[0]])  # reopened from disk, exemplars intact
    assert back.router == "knn" and not back.fallback and back.tier == "small"
    assert router.store.count() == 60
    router.close()


def test_empty_store_falls_back_with_its_own_cause(tmp_path, embedder):
    cfg = RouterConfig(seed_default_exemplars=False)
    router = Router.build(cfg, TIERS, tmp_path, embedder=embedder)
    [decision] = route(router, [NEAR_SMALL[0]])
    assert decision.fallback and router.fallbacks == {"no_exemplars": 1}
    router.close()


def test_cli_import_count_and_locked_folder(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("TIERSERVE_DATA_DIR", str(data))
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"data_dir: {data}\n"
        "tiers:\n"
        "  - {name: small, model: m, engine: {kv_cache_memory_bytes: 268435456}}\n"
        "  - {name: large, model: l, engine: {kv_cache_memory_bytes: 268435456}}\n"
    )
    csv_file = tmp_path / "bench.csv"
    csv_file.write_text("question,weak_correct\nWhat is 2+2?,1\nProve the four colour theorem.,0\n")
    args = ["exemplars", "import", str(csv_file), "--text-column", "question", "--tier-column", "weak_correct",
            "--label-map", "1=small", "0=large", "--config", str(config)]
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(["exemplars", "count", "--config", str(config)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["total"] == 2 and counts["by_tier"] == {"large": 1, "small": 1}
    assert counts["store"] == str(data / "qdrant")

    held = ExemplarStore(collection="tierserve_exemplars", dim=384, path=data / "qdrant")
    try:
        assert cli.main(["exemplars", "count", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert "in use by another process" in err and "router.store.url" in err
    finally:
        held.close()


def test_deployment_class_batches_concurrent_requests_in_process(tmp_path, embedder):
    import asyncio

    from router.deployment import RouterDeployment

    # No busy answer: this test is about batching, and a loaded machine must not turn the last ones into heuristics.
    deployment = RouterDeployment(RouterConfig(max_queue_wait_s=None), TIERS, str(tmp_path), embedder=embedder)
    texts = NEAR_SMALL + NEAR_LARGE

    async def main():
        return await asyncio.gather(*(deployment.route(RouteInput(t)) for t in texts))

    try:
        decisions = asyncio.run(main())
    finally:
        deployment.close()
    assert [d.tier for d in decisions] == ["small"] * len(NEAR_SMALL) + ["large"] * len(NEAR_LARGE)
    # All are queued in one event-loop tick, before the batch worker first runs: one embedding pass serves all.
    assert {d.batch_size for d in decisions} == {len(texts)}


def test_embedder_change_is_refused_and_releases_the_folder(tmp_path, embedder):
    from router.errors import StoreError

    ExemplarStore(collection="c", dim=embedder.dim, path=tmp_path / "q").close()
    with pytest.raises(StoreError, match=r"holds 384-d vectors but the embedder makes 1024-d"):
        ExemplarStore(collection="c", dim=1024, path=tmp_path / "q")
    ExemplarStore(collection="c", dim=embedder.dim, path=tmp_path / "q").close()  # not left locked


def test_a_busy_router_answers_the_overflow_with_the_heuristic_at_once(tmp_path, embedder):
    """A burst beyond `max_queue_wait_s` of work, the first one after start: the first requests are embedded,
    the rest get the heuristic's decision without queueing; every request is answered, the busy ones counted."""
    import asyncio
    import time

    from router.deployment import RouterDeployment

    embedder.embed(NEAR_SMALL[:1])
    timings = []
    for text in NEAR_SMALL[1:4]:
        started = time.perf_counter()
        embedder.embed([text])
        timings.append(time.perf_counter() - started)
    one_s = sorted(timings)[1]
    causes = []
    # Room for about eight decisions, whatever this machine's speed: a burst of 128 must overflow it.
    deployment = RouterDeployment(RouterConfig(max_queue_wait_s=8 * one_s, batch_max_size=8), TIERS, str(tmp_path),
                                  embedder=embedder, on_fallback=causes.append)
    texts = (NEAR_SMALL + NEAR_LARGE) * 8

    async def burst():  # right after start: the deployment timed its embedder before serving
        return await asyncio.gather(*(deployment.route(RouteInput(t)) for t in texts))

    try:
        decisions = asyncio.run(burst())
    finally:
        deployment.close()
    busy = [d for d in decisions if d.fallback]
    embedded = [d for d in decisions if not d.fallback]
    assert len(decisions) == len(texts)
    assert busy and embedded and all(d.router == "knn" for d in embedded)
    assert all(d.router == "heuristic" and "router busy" in d.reason for d in busy)
    assert all(d.busy for d in busy) and not any(d.busy for d in embedded)  # what the ingress counts
    assert causes == ["busy"] * len(busy)
    # The busy ones did not queue: each took less than any embedded decision, which includes an embedding.
    assert max(d.overhead_ms for d in busy) < min(d.overhead_ms for d in embedded)
    # Each answer reports the queue a request arriving then would wait: past the limit when it answered the busy
    # fallback (the ingress then answers it itself until that runs down: serving.ingress.plan.RouterQueue).
    limit = 8 * one_s
    assert all(d.queue is not None for d in decisions) and all(d.queue.wait_s > limit for d in busy)
    assert min(d.queue.wait_s for d in embedded) < limit  # the last batch's answers came once the queue had drained
    assert all(0 < d.queue.item_s < d.queue.wait_s for d in busy)  # a request's share of a full batch


@pytest.mark.parametrize("candidate", [{"candidate": "knn", "threshold": 0.99}, {"candidate": "version", "version": 1}])
def test_the_shadow_decides_beside_the_live_router_in_the_same_call(tmp_path, embedder, candidate):
    """`router.shadow`: a request that asks for it gets the candidate's decision with the live one, cache hits
    included; one that does not ask gets none. `knn` with another threshold decides from the live score;
    `version` searches the seeded version (the live one here, so it agrees)."""
    import asyncio

    from router.deployment import RouterDeployment

    cfg = RouterConfig(max_queue_wait_s=None, shadow={"enabled": True, "max_queue_wait_s": 10.0, **candidate})
    deployment = RouterDeployment(cfg, TIERS, str(tmp_path), embedder=embedder)

    async def main():
        fresh = await asyncio.gather(*(deployment.route(RouteInput(t, shadow=True)) for t in NEAR_LARGE[:3]))
        again = await deployment.route(RouteInput(NEAR_LARGE[0], shadow=True))
        unasked = await deployment.route(RouteInput(NEAR_LARGE[3]))
        return fresh, again, unasked

    try:
        fresh, again, unasked = asyncio.run(main())
    finally:
        deployment.close()
    assert unasked.shadow is None and unasked.tier == "large"
    assert again.cached and again.shadow is not None
    for live in [*fresh, again]:
        assert live.tier == "large" and live.shadow is not None and live.shadow.router == "knn"
        assert live.shadow.score == pytest.approx(live.score, abs=1e-6)  # the same neighbours
        if candidate["candidate"] == "knn":  # below 0.99, the candidate keeps it on the small tier
            assert live.shadow.thresholds == (0.99,)
            assert live.shadow.tier == ("large" if live.score >= 0.99 else "small")
        else:
            assert live.shadow.tier == live.tier
