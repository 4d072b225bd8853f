"""Learning, rollback and a switch made by another process, under concurrent routing on the router itself
(the deployment class in-process, the bundled MiniLM, embedded Qdrant): a cascade's escalations become
exemplars and a similar prompt's decision changes; a rollback restores it; the CLI's rollback is served
after the router reopens its store; no routing call fails meanwhile. Prints the seconds each switch took to
show (`benchmarks/store_switch.py` measures them apart; none is asserted)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from router.config import RouterConfig
from router.deployment import RouterDeployment
from router.learn import RequestOutcome
from router.store import ExemplarStore
from router.types import RouteInput
from serving import cli
from tests.inprocess import PROBE, TAUGHT

TIERS = ["small", "large"]
LOAD = ["Translate 'good morning' to French.", "Prove that there are infinitely many primes.",
        "Extract the dates from: we met on 3 May and 9 June.", PROBE]


async def _load(deployment: RouterDeployment, stop: asyncio.Event, log: list) -> None:
    i = 0
    while not stop.is_set():
        text = LOAD[i % len(LOAD)]
        i += 1
        try:
            decision = await deployment.route(RouteInput(text))
            log.append((time.monotonic(), text, decision))
            await asyncio.sleep(0.001)  # a client does I/O between calls; 8 tight loops starved the flush thread
        except Exception as exc:  # a failed routing call is what the test counts
            log.append((time.monotonic(), text, exc))


async def _until(deployment: RouterDeployment, tier: str, deadline_s: float = 60.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        decision = await deployment.route(RouteInput(PROBE))
        if decision.tier == tier and not decision.fallback:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"the probe was not routed to {tier} within {deadline_s} s")


def test_learning_and_rollbacks_switch_under_load_without_a_failed_call(tmp_path, embedder) -> None:
    cfg = RouterConfig(learn={"enabled": True, "flush_interval_s": 0.5}, store={"refresh_s": 0.5},
                       max_queue_wait_s=None)
    deployment = RouterDeployment(cfg, TIERS, str(tmp_path), embedder=embedder, retention_s=86_400)

    async def main() -> dict:
        log: list = []
        stop = asyncio.Event()
        workers = [asyncio.create_task(_load(deployment, stop, log)) for _ in range(8)]
        figures = {}
        before = await deployment.route(RouteInput(PROBE))
        assert before.tier == "small", before.reason
        seeded = await deployment.active_version()
        for i, text in enumerate(TAUGHT):  # the small tier's answers escalated: these need the large tier
            result = await deployment.observe(RequestOutcome(f"r{i}", text, ("small", "large"), confidence=0.1,
                                                             threshold=0.8, api_key_id=f"key{i}"))
            assert result.learned, result.verdict
        figures["learned_s"] = await _until(deployment, "large")  # flushed by the maintenance loop
        learned = await deployment.active_version()
        versions = await deployment.versions()
        assert [v.kind for v in versions][-1] == "learn" and learned > seeded
        t0 = time.monotonic()
        await deployment.rollback(seeded)
        figures["rollback_s"] = await _until(deployment, "small") + (time.monotonic() - t0)
        # another process (the CLI) switches the store: the router lends it its folder, then reopens
        await deployment.release_store(0.5)
        other = ExemplarStore(collection=cfg.store.collection, dim=embedder.dim, path=tmp_path / "qdrant")
        try:
            other.rollback(learned)
        finally:
            other.close()
        t0 = time.monotonic()
        figures["cli_rollback_s"] = await _until(deployment, "large")
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*workers)
        figures["calls"] = len(log)
        figures["failed"] = [repr(e) for _, _, e in log if isinstance(e, Exception)]
        figures["fallbacks"] = sum(1 for _, _, d in log if not isinstance(d, Exception) and d.fallback)
        figures["reasons"] = sorted({d.reason.split(";")[0] for _, _, d in log if not isinstance(d, Exception) and d.fallback})
        return figures

    try:
        figures = asyncio.run(main())
    finally:
        deployment.close()
    print(json.dumps(figures))
    assert figures["failed"] == [] and figures["calls"] > 50


def test_cli_lists_versions_and_rolls_back(tmp_path, capsys, monkeypatch) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("TIERSERVE_DATA_DIR", str(data))
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data_dir: {data}\ntiers:\n"
                      "  - {name: small, model: m, engine: {kv_cache_memory_bytes: 268435456}}\n"
                      "  - {name: large, model: l, engine: {kv_cache_memory_bytes: 268435456}}\n")
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("text,tier\nWhat is 2+2?,small\nProve the four colour theorem.,large\n")
    second.write_text("text,tier\nWhat is 2+2?,large\n")
    for f in (first, second):
        assert cli.main(["exemplars", "import", str(f), "--config", str(config)]) == 0
    capsys.readouterr()
    assert cli.main(["exemplars", "versions", "--json", "--config", str(config)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["kind"], r["size"], r["active"]) for r in rows] == [
        (1, "import", 2, False), (2, "import", 2, True)]
    assert cli.main(["exemplars", "rollback", "1", "--config", str(config)]) == 0
    assert "version 3 now serves what version 1 held (2 exemplars)" in capsys.readouterr().out
    assert cli.main(["exemplars", "list", "--config", str(config)]) == 0
    listed = {json.loads(line)["text"]: json.loads(line)["tier"] for line in capsys.readouterr().out.splitlines()}
    assert listed == {"What is 2+2?": "small", "Prove the four colour theorem.": "large"}
    assert cli.main(["exemplars", "rollback", "7", "--config", str(config)]) == 2
    assert "version 7 does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def embedder():
    from router.embed import default_embedder

    return default_embedder()


def test_a_release_waits_for_an_open_in_progress_and_keeps_the_store_closed(tmp_path, embedder) -> None:
    """`tierserve exemplars import` asks the router to let go of embedded Qdrant's folder: a batch that was opening
    the store at that moment must not hold it open again, or the CLI cannot take the folder."""
    import threading

    from router.config import StoreConfig
    from router.core import Router

    opening, go = threading.Event(), threading.Event()

    def open_store() -> ExemplarStore:
        opening.set()
        go.wait(10)
        return ExemplarStore.open(StoreConfig(), dim=embedder.dim, data_dir=tmp_path)

    router = Router(RouterConfig(seed_default_exemplars=False), TIERS, embedder=embedder, open_store=open_store)
    batch = threading.Thread(target=router._current_store)
    batch.start()
    assert opening.wait(10)
    release = threading.Thread(target=router.release_store, args=(60.0,))
    release.start()
    time.sleep(0.2)
    go.set()
    batch.join(10)
    release.join(10)
    assert router.store is None and router._current_store() is None  # released, not reopened within the 60 s
    ExemplarStore.open(StoreConfig(), dim=embedder.dim, data_dir=tmp_path).close()  # the folder is free
