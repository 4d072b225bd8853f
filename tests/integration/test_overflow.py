"""The static overflow (`router.overflow`): what the router is too busy to embed is decided by kNN over the same
exemplars on the static embedder's vectors, not by the heuristic; the index follows the store; the ingress's copy
travels by pickle (the real MiniLM, its real static embedder from the test data dir, embedded Qdrant)."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from router.config import EmbedderConfig, KnnConfig, RouterConfig, StoreConfig
from router.embed import build_embedder, default_embedder
from router.embed.static import StaticEmbedder
from router.overflow import PREVIOUS, OverflowBuilder, scores_without_self, static_margin
from router.scoring import Decider, label_difficulty
from router.store import ExemplarStore
from router.types import Exemplar, Neighbor, QueueReport, RouteDecision, RouteInput
from serving.channel.channel import TierChannel
from serving.config import parse_config
from serving.ingress.plan import Planner, router_label
from serving.ingress.protocol import TierserveOptions
from serving.metrics import Metrics
from tests.integration.test_router_knn import NEAR_LARGE, NEAR_SMALL, TIERS


@pytest.fixture(scope="module")
def static() -> StaticEmbedder:
    """The router's own: distilled and fitted on the shipped exemplars once into the test data dir."""
    return build_embedder(EmbedderConfig(backend="static"), Path(os.environ["TIERSERVE_DATA_DIR"]).expanduser())


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


def test_the_default_overflow_is_static_where_the_embedder_is_minilm_on_cpu():
    assert RouterConfig().resolved_overflow == "static"
    assert RouterConfig(overflow="heuristic").resolved_overflow == "heuristic"
    bge = {"kind": "bge-m3", "model_path": "/models/bge-m3"}
    assert RouterConfig(embedder=bge).resolved_overflow == "heuristic"  # distilling it on CPU takes most of an hour
    assert RouterConfig(embedder=bge, overflow="static").resolved_overflow == "static"
    assert RouterConfig(embedder={"backend": "static"}).resolved_overflow == "heuristic"  # already that fast
    # The first pass is on where its quality was measured (MiniLM), and needs the static overflow's index.
    assert RouterConfig().resolved_static_first and not RouterConfig(static_first=False).resolved_static_first
    assert not RouterConfig(static_first=True, overflow="heuristic").resolved_static_first
    assert not RouterConfig(embedder=bge, overflow="static").resolved_static_first
    assert RouterConfig(embedder=bge, overflow="static", static_first=True).resolved_static_first


def test_a_burst_past_the_router_is_decided_by_knn_on_static_vectors(tmp_path, embedder, static):
    """Past `max_queue_wait_s` the router answers at once, as the heuristic did, but by kNN over its exemplars:
    a hard text goes to the large tier, a routine one stays small, and nothing is counted as a fallback."""
    from router.deployment import RouterDeployment

    embedder.embed(NEAR_SMALL[:1])
    started = time.perf_counter()
    embedder.embed(NEAR_SMALL[1:2])
    one_s = time.perf_counter() - started
    causes = []
    deployment = RouterDeployment(RouterConfig(max_queue_wait_s=4 * one_s, batch_max_size=4), TIERS,
                                  str(tmp_path), embedder=embedder, on_fallback=causes.append,
                                  overflow=lambda: static)
    assert deployment._router.overflow.wait(60) is not None  # built in the background from the seeded store
    texts = (NEAR_SMALL + NEAR_LARGE) * 8
    want = {t: "small" for t in NEAR_SMALL} | {t: "large" for t in NEAR_LARGE}

    async def burst():
        return await asyncio.gather(*(deployment.route(RouteInput(t)) for t in texts))

    try:
        decisions = asyncio.run(burst())
    finally:
        deployment.close()
    overflowed = [(t, d) for t, d in zip(texts, decisions) if d.overflow]
    assert overflowed and len(overflowed) < len(texts)  # some embedded by MiniLM, the rest by the overflow
    assert causes == [] and not any(d.fallback for d in decisions)
    for text, d in overflowed:
        assert d.router == "knn" and d.overflow and d.reason.startswith("knn-static: knn")
        assert "decisions were queued" in d.reason and d.neighbors and d.score is not None
    right = sum(d.tier == want[t] for t, d in overflowed)
    assert right >= 0.8 * len(overflowed), [(t[:30], d.tier) for t, d in overflowed]
    # The overflow's decisions are not cached: a repeat the router has time for is embedded by MiniLM.
    assert all(not d.cached for _, d in overflowed)


def test_the_index_follows_the_store_and_travels_without_its_embedder(tmp_path, static):
    store = ExemplarStore.open(StoreConfig(), dim=static.dim, data_dir=tmp_path)
    first = [Exemplar(t, "small") for t in NEAR_SMALL] + [Exemplar(t, "large") for t in NEAR_LARGE[:2]]
    version = store.begin("import")
    store.upsert(first, static.embed([e.text for e in first]), version=version)
    store.commit(version)
    builder = OverflowBuilder(lambda: static, RouterConfig().knn, lambda tier: label_difficulty(tier, TIERS),
                              min_rebuild_s=0.0)
    try:
        assert builder.current(store, generation=0) is None  # building
        index = builder.wait(60)
        assert len(index) == store.count() == len(first)
        assert builder.current(store, generation=0) is index  # unchanged: no build
        more = [Exemplar(t, "large") for t in NEAR_LARGE[2:]]
        version = store.begin("import")
        store.upsert(more, static.embed([e.text for e in more]), version=version)
        store.commit(version)
        # The previous index serves (marked so) while the new one is made, then the new one holds every exemplar.
        assert builder.current(store, generation=1) == replace(index, previous=True)
        newer = builder.wait(60)
        assert newer is not index and len(newer) == len(first) + len(more)
        assert builder.current(store, generation=1) is newer
    finally:
        store.close()
    assert builder.current(store, generation=1) is None  # a closed store: the heuristic decides

    # What the ingress receives: the whole index once, then the exemplars alone; both decide as the original.
    decider = Decider(RouterConfig(), TIERS)
    whole = pickle.loads(pickle.dumps(newer))
    light = pickle.loads(pickle.dumps(replace(newer, embedder=None)))
    assert light.embedder is None and len(pickle.dumps(replace(newer, embedder=None))) < len(pickle.dumps(newer)) / 10
    light = replace(light, embedder=whole.embedder)
    for text in NEAR_SMALL + NEAR_LARGE:
        original = newer.decide(RouteInput(text), decider, "test")
        for copy in (whole, light):
            again = copy.decide(RouteInput(text), decider, "test")
            assert (again.tier, again.score, again.overflow) == (original.tier, pytest.approx(original.score), True)


def test_expired_exemplars_leave_the_index_and_the_cache(tmp_path, embedder, static):
    """A learned exemplar whose retention ran out is dropped from the store, and nothing decided on it is served:
    the decision cache empties and the overflow indexes the exemplars again."""
    from router.deployment import RouterDeployment

    deployment = RouterDeployment(RouterConfig(), TIERS, str(tmp_path), embedder=embedder, overflow=lambda: static)
    router = deployment._router
    router.overflow._min_rebuild_s = 0.0
    try:
        seeded = len(router.overflow.wait(60))
        text = "A learned prompt about tidal energy whose retention has run out."
        learned = Exemplar(text, "large", source="learned", created_at=time.time() - 10, expires_at=time.time() - 1)
        router.store.upsert([learned], embedder.embed([text]))
        router.overflow_index()  # a new active version: indexed again
        assert len(router.overflow.wait(60)) == seeded + 1
        asyncio.run(deployment.route(RouteInput(text)))
        generation = router.decisions.generation
        assert router.decisions.get(RouteInput(text), "knn") is not None

        assert asyncio.run(deployment.expire_exemplars()) == 1
        assert router.store.count() == seeded
        assert router.decisions.generation > generation and router.decisions.get(RouteInput(text), "knn") is None
        router.overflow_index()
        index = router.overflow.wait(60)
        assert len(index) == seeded and index.key.split("|")[2] == str(router.decisions.generation)
        assert asyncio.run(deployment.expire_exemplars()) == 0
    finally:
        deployment.close()


def test_the_margin_is_a_quantile_of_the_static_score_error_each_exemplar_left_out():
    assert static_margin(np.array([0.1, 0.2, 0.3, np.nan]), np.array([0.1, 0.3, 0.0, 0.5]), 1.0) == pytest.approx(0.3)
    assert static_margin(np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.3, 0.0]), 0.5) == pytest.approx(0.1)
    assert static_margin(np.array([np.nan]), np.array([0.2])) == float("inf")  # nothing measured: nothing is fast
    found = [[Neighbor("a", "large", 1.0), Neighbor("b", "small", 0.9)], [Neighbor("a", "large", 0.8),
                                                                          Neighbor("b", "small", 1.0)]]
    knn = KnnConfig(k=1, weighting="uniform")
    difficulty = {"small": 0.0, "large": 1.0}.get
    assert scores_without_self(found, ["a", "b"], knn, difficulty).tolist() == [0.0, 1.0]  # the other one votes


def test_the_first_pass_decides_far_from_a_boundary_as_the_router_would(tmp_path, embedder, static):
    """The margin is measured against the router's own embedder at the first build; beyond it the static pass
    picks the router's tier, and at a boundary (a per-request threshold at the static score) it leaves the
    decision to the router."""
    from router.deployment import RouterDeployment

    deployment = RouterDeployment(RouterConfig(static_first=True), TIERS, str(tmp_path), embedder=embedder,
                                  overflow=lambda: static)
    texts = NEAR_SMALL + NEAR_LARGE
    try:
        index = deployment._router.overflow.wait(60)
        assert index.margin is not None and 0.0 < index.margin < 0.5

        async def exact():
            return [await deployment.route(RouteInput(t)) for t in texts]

        routed = asyncio.run(exact())  # the router itself embeds with MiniLM: the first pass runs in the ingress
    finally:
        deployment.close()
    decider = deployment._router.decider
    fast = [index.first(RouteInput(t), decider) for t in texts]
    assert sum(d is not None for d in fast) >= len(texts) // 2
    for text, first, own in zip(texts, fast, routed):
        assert not own.fast and own.router == "knn"
        if first is not None:
            assert first.fast and first.router == "knn" and router_label(first) == "knn-fast" and first.tier == own.tier
            assert min(abs(first.score - t) for t in first.thresholds) >= index.margin
            assert first.reason.startswith("knn-fast: knn") and first.neighbors
        at = index.decide(RouteInput(text), decider, "probe").score
        assert index.first(RouteInput(text, threshold=at), decider) is None


def _static_index(tmp_path, static, exemplars):
    """The static overflow's index of `exemplars`, built from a store of their own (closed afterwards)."""
    store = ExemplarStore.open(StoreConfig(), dim=static.dim, data_dir=tmp_path)
    version = store.begin("import")
    store.upsert(exemplars, static.embed([e.text for e in exemplars]), version=version)
    store.commit(version)
    builder = OverflowBuilder(lambda: static, RouterConfig().knn, lambda tier: label_difficulty(tier, TIERS))
    try:
        builder.current(store, generation=0)
        return builder.wait(60)
    finally:
        store.close()


class OverflowRouter:
    """The router deployment as the ingress sees it (`RouterCalls`' two calls used here): decisions that take
    `delay_s` and report a queue of `queue_s`, and its static overflow's index."""

    def __init__(self, index, *, delay_s: float = 0.0, queue_s: float = 0.0) -> None:
        self.index, self.delay_s, self.queue_s = index, delay_s, queue_s
        self.sent_embedder = 0
        self.routed = 0
        self.previous = False
        """Its index is of the exemplars before their last change (the new one is being built)."""

    async def route(self, request: RouteInput) -> RouteDecision:
        self.routed += 1
        await asyncio.sleep(self.delay_s)
        return RouteDecision("small", 0, "knn", 0.1, (0.5,), "test", queue=QueueReport(self.queue_s, 0.1))

    async def overflow_index(self, have=None, embedder=None):
        key = self.index.key + PREVIOUS if self.previous else self.index.key
        if have == self.index.key:
            return key, None
        self.sent_embedder += embedder != self.index.embedder.name
        return key, self.index if embedder != self.index.embedder.name else replace(self.index, embedder=None)


def test_the_ingress_decides_with_its_copy_when_the_router_is_busy_or_slow(tmp_path, static):
    """What the ingress decides itself (the router's last report over `max_queue_wait_s`), and a call that runs
    past `ingress.router_timeout_s`, get kNN on its copy of the router's index, not the heuristic."""
    exemplars = [Exemplar(t, "small") for t in NEAR_SMALL] + [Exemplar(t, "large") for t in NEAR_LARGE]
    index = _static_index(tmp_path, static, exemplars)
    cfg = parse_config({
        "tiers": [{"name": n, "model": f"m{i}", "engine": {"kv_cache_memory_bytes": 1 << 20}}
                  for i, n in enumerate(TIERS)],
        "query_log": {"path": str(tmp_path / "querylog")},
        "router": {"max_queue_wait_s": 0.1}, "ingress": {"router_timeout_s": 0.3},
    }, "test")
    router, metrics = OverflowRouter(index, delay_s=1.0), Metrics()
    planner = Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), metrics, router, None)

    def plan(text: str) -> RouteDecision:
        return asyncio.run(planner.plan("auto", text, TierserveOptions(), None, "r")).decision

    slow = plan(NEAR_LARGE[0])  # the copy arrives while the call waits; the call times out
    assert slow.overflow and slow.router == "knn" and slow.tier == "large" and not slow.fallback
    assert "router_timeout_s" in slow.reason and router.sent_embedder == 1
    assert metrics.registry.get_sample_value("tierserve_router_overflow_exemplars") == len(exemplars)
    router.delay_s, router.queue_s = 0.0, 5.0
    answered = plan(NEAR_SMALL[0])  # by the router, reporting a 5 s queue
    assert answered.router == "knn" and not answered.overflow
    busy = [plan(t) for t in (NEAR_SMALL[1], NEAR_LARGE[1])]  # decided here without a call
    assert [d.tier for d in busy] == ["small", "large"] and all(d.overflow and not d.busy for d in busy)
    assert "decisions were queued" in busy[0].reason
    assert metrics.registry.get_sample_value("tierserve_router_busy_fallbacks_total") in (None, 0.0)
    assert metrics.registry.get_sample_value("tierserve_routing_decisions_total",
                                             {"router": "knn-static", "tier": "large"}) == 2
    assert router.sent_embedder == 1  # the embedder travelled once
    # A request for another router than kNN is not the overflow's to decide: the heuristic answers it busy.
    classifier = asyncio.run(planner.plan("router-classifier", NEAR_LARGE[2], TierserveOptions(), None, "r"))
    assert classifier.decision.busy and not classifier.decision.overflow


def test_the_ingress_decides_far_from_a_boundary_without_asking_the_router(tmp_path, static):
    """With the first pass (`router.static_first`) a request whose static score is far from every
    boundary is decided in the ingress on its copy of the index; one near a boundary goes to the router."""
    index = replace(_static_index(tmp_path, static, [Exemplar(t, "small") for t in NEAR_SMALL]
                                  + [Exemplar(t, "large") for t in NEAR_LARGE]), margin=0.05)
    cfg = parse_config({
        "tiers": [{"name": n, "model": f"m{i}", "engine": {"kv_cache_memory_bytes": 1 << 20}}
                  for i, n in enumerate(TIERS)],
        "query_log": {"path": str(tmp_path / "querylog")},
        "router": {"max_queue_wait_s": None, "static_first": True},
    }, "test")
    router, metrics = OverflowRouter(index, delay_s=0.5), Metrics()
    planner = Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), metrics, router, None)

    def plan(text: str, threshold: float | None = None) -> RouteDecision:
        options = TierserveOptions(threshold=threshold)
        return asyncio.run(planner.plan("auto", text, options, None, "r")).decision

    assert not plan(NEAR_LARGE[0]).fast and router.routed == 1  # the copy arrives while the router decides
    router.delay_s = 0.0
    far = [plan(t) for t in (NEAR_SMALL[1], NEAR_LARGE[1])]
    assert [d.tier for d in far] == ["small", "large"] and all(d.fast and not d.overflow for d in far)
    assert router.routed == 1  # decided here
    assert metrics.registry.get_sample_value("tierserve_routing_decisions_total",
                                             {"router": "knn-fast", "tier": "large"}) == 1
    near = plan(NEAR_LARGE[1], threshold=far[1].score)  # at the boundary: the router's own embedder decides
    assert not near.fast and router.routed == 2

    # An import or a rollback through this ingress: the router decides until its index of the new exemplars
    # arrives, while the router still reports the previous one, and once more until the copy is fetched.
    router.previous = True
    planner.exemplars_changed()
    assert not any(plan(NEAR_SMALL[1]).fast for _ in range(2)) and router.routed == 4
    router.previous = False
    assert not plan(NEAR_SMALL[1]).fast and router.routed == 5
    assert plan(NEAR_SMALL[1]).fast and router.routed == 5


def test_near_a_boundary_with_the_router_busy_the_text_is_embedded_statically_once(tmp_path, static, monkeypatch):
    """The first pass's static scores serve the busy overflow's decision: one static embedding per request."""
    index = replace(_static_index(tmp_path, static, [Exemplar(t, "small") for t in NEAR_SMALL]
                                  + [Exemplar(t, "large") for t in NEAR_LARGE]), margin=0.05)
    cfg = parse_config({
        "tiers": [{"name": n, "model": f"m{i}", "engine": {"kv_cache_memory_bytes": 1 << 20}}
                  for i, n in enumerate(TIERS)],
        "query_log": {"path": str(tmp_path / "querylog")},
        "router": {"max_queue_wait_s": 0.1, "static_first": True},
    }, "test")
    router = OverflowRouter(index, queue_s=5.0)
    planner = Planner(cfg, TierChannel(TIERS, cfg.capacity, token="t" * 32), Metrics(), router, None)

    def plan(text: str, threshold: float | None = None) -> RouteDecision:
        options = TierserveOptions(threshold=threshold)
        return asyncio.run(planner.plan("auto", text, options, None, "r")).decision

    plan(NEAR_SMALL[0])  # the router answers, reporting a 5 s queue; the copy arrives meanwhile
    boundary = index.decide(RouteInput(NEAR_LARGE[2]), planner.local, "probe").score  # its own static score
    texts: list[str] = []
    embed = StaticEmbedder.embed
    monkeypatch.setattr(StaticEmbedder, "embed", lambda self, batch: texts.extend(batch) or embed(self, batch))
    far = plan(NEAR_LARGE[1])
    assert far.fast and texts == [NEAR_LARGE[1]]
    near = plan(NEAR_LARGE[2], threshold=boundary)
    assert near.overflow and not near.fast and router.routed == 1  # decided here, on the busy overflow
    assert texts == [NEAR_LARGE[1], NEAR_LARGE[2]]  # embedded once for both the first pass and the overflow


def test_the_router_reports_an_index_of_its_previous_exemplars_as_such(tmp_path, embedder, static):
    """Until the index of changed exemplars is built, the router's key for the ingress ends in `PREVIOUS`: busy
    decisions may use that index, the first pass may not."""
    from router.deployment import RouterDeployment

    deployment = RouterDeployment(RouterConfig(), TIERS, str(tmp_path), embedder=embedder, overflow=lambda: static)
    builder = deployment._router.overflow
    try:
        held = builder.wait(60)
        assert held.margin is not None and not held.previous  # MiniLM: the first pass is on by default
        key, index = asyncio.run(deployment.overflow_index(held.key, static.name))
        assert (key, index) == (held.key, None)
        builder._min_rebuild_s = 3600.0  # the new index waits
        asyncio.run(deployment.add_exemplars([Exemplar("A new prompt about tidal energy.", "large")]))
        key, index = asyncio.run(deployment.overflow_index(held.key, static.name))
        assert key == held.key + PREVIOUS and index is None
        key, index = asyncio.run(deployment.overflow_index(None, static.name))  # a new ingress gets it marked
        assert index.previous and index.first(RouteInput(NEAR_LARGE[0]), deployment._router.decider) is None
        builder._min_rebuild_s = 0.0
        deployment._router.overflow_index()
        fresh = builder.wait(60)
        key, index = asyncio.run(deployment.overflow_index(held.key, static.name))
        assert key == fresh.key != held.key and len(index) == len(held) + 1 and not index.previous
    finally:
        deployment.close()
