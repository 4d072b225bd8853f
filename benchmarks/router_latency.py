"""Routing-decision latency and throughput: embed + kNN + policy, at 1 and 64 concurrent requests.

Runs in-process: `RouterDeployment` (the class Ray Serve deploys: adaptive batching, one batch at a time in a
worker thread) over an embedded Qdrant store, called by asyncio clients in closed loops. Exemplar vectors
beyond the shipped set are synthetic (random unit vectors, random labels); every query embedding is real (the
bundled MiniLM). Latency is measured around `RouterDeployment.route` (no Ray hop).

    .venv/bin/python benchmarks/router_latency.py                 # 1k and 10k exemplars, c=1 and c=64
    .venv/bin/python benchmarks/router_latency.py --sizes 10000 --requests 300 --threads 1
    .venv/bin/python benchmarks/router_latency.py --sizes 10000 --requests 200 --backend onnx-int8

`--shadow knn@0.3 version heuristic` instead prices `router.shadow`'s candidates: decisions/s with and without
the candidate deciding beside the live router, in alternating rounds on one router (largest size).

With `--backend onnx-int8` (int8 vectors, exact re-check near a boundary) it also prints the share of requests
that needed the re-check and how many concurrency-1 decisions differ from the exact model's (with and without
the re-check).

Prints figures; asserts nothing. Numbers depend on what else runs on the cores (vLLM, other tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from router.config import EmbedderConfig, KnnConfig, RouterConfig  # noqa: E402
from router.deployment import RouterDeployment  # noqa: E402
from router.embed import Embedder, RecheckEmbedder, build_embedder  # noqa: E402
from router.exemplars import load_default_exemplars  # noqa: E402
from router.learn.config import ShadowConfig  # noqa: E402
from router.scoring import KnnRouter, StoreIndex, label_difficulty, tiers_for_scores  # noqa: E402
from router.store import ExemplarStore  # noqa: E402
from router.types import Exemplar, RouteInput  # noqa: E402

TIERS = ["small", "large"]


@dataclass
class Run:
    latencies_ms: list[float]
    embed_ms: list[float]
    batch_sizes: list[int]
    wall_s: float
    tiers: dict[str, int]
    """Tier index decided for each text."""

    def line(self, label: str) -> str:
        lat = np.array(self.latencies_ms)
        emb = np.array(self.embed_ms)
        rest = lat - emb
        return (
            f"{label:<22} n={len(lat):>5}  decision p50 {np.percentile(lat, 50):6.2f} ms  p95 "
            f"{np.percentile(lat, 95):6.2f} ms | embed p50 {np.percentile(emb, 50):6.2f} ms | rest p50 "
            f"{np.percentile(rest, 50):5.2f} ms p95 {np.percentile(rest, 95):5.2f} ms | mean batch "
            f"{statistics.mean(self.batch_sizes):5.1f} | {len(lat) / self.wall_s:7.1f} decisions/s"
        )


def query_texts(n: int) -> list[str]:
    base = [ex.text for ex in load_default_exemplars()]
    rng = np.random.default_rng(1)
    # Real prompts, altered so no query is an exact exemplar (its nearest neighbour is a near-duplicate).
    return [f"{base[i % len(base)]} Please answer for case {rng.integers(1_000_000)}." for i in range(n)]


def fill_store(store: ExemplarStore, embedder: Embedder, size: int) -> None:
    defaults = load_default_exemplars()
    store.upsert(defaults, embedder.embed([ex.text for ex in defaults]))
    rng = np.random.default_rng(0)
    missing = size - len(defaults)
    for start in range(0, missing, 2000):
        count = min(2000, missing - start)
        vectors = rng.normal(size=(count, embedder.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        labels = rng.choice(TIERS, size=count)
        synthetic = [Exemplar(f"synthetic exemplar {start + i}", str(labels[i]), source="bench") for i in range(count)]
        store.upsert(synthetic, vectors)


async def closed_loop(deployment: RouterDeployment, texts: list[str], concurrency: int) -> Run:
    latencies, embeds, sizes, tiers = [], [], [], {}
    pending = iter(texts)

    async def client() -> None:
        for text in pending:
            start = time.perf_counter()
            decision = await deployment.route(RouteInput(text))
            latencies.append((time.perf_counter() - start) * 1000)
            embeds.append(decision.embed_ms)
            sizes.append(decision.batch_size)
            tiers[text] = decision.tier_index

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Run(latencies, embeds, sizes, time.perf_counter() - start, tiers)


async def interleaved_throughput(
    deployment: RouterDeployment, embedder: Embedder, texts: list[str], rounds: int, size: int
) -> tuple[float, float]:
    """(decisions/s, embedder texts/s) from alternating rounds of `size` concurrent decisions and one embed()
    call on `size` texts, so both see the same background load."""
    decide_s = embed_s = 0.0
    for r in range(rounds):
        chunk = [texts[(r * size + i) % len(texts)] for i in range(size)]
        t0 = time.perf_counter()
        embedder.embed(chunk)
        embed_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(*(deployment.route(RouteInput(t)) for t in chunk))
        decide_s += time.perf_counter() - t0
    return rounds * size / decide_s, rounds * size / embed_s


def embedder_figures(embedder: Embedder, texts: list[str], batch: int, repeats: int) -> tuple[float, float]:
    """(single-text p50 ms, texts/s when embedding `batch` texts at a time)."""
    embedder.embed(texts[:batch])
    singles = []
    for text in texts[:repeats]:
        t0 = time.perf_counter()
        embedder.embed([text])
        singles.append((time.perf_counter() - t0) * 1000)
    chunks = [texts[i : i + batch] for i in range(0, min(len(texts), batch * repeats // 4 + batch), batch)]
    t0 = time.perf_counter()
    done = sum(len(embedder.embed(chunk)) for chunk in chunks)
    return float(np.median(singles)), done / (time.perf_counter() - t0)


def knn_figures(store: ExemplarStore, embedder: Embedder, texts: list[str], k: int) -> str:
    single = embedder.embed(texts[:1])
    many = embedder.embed(texts[:64])
    times = {}
    for label, queries, repeats in (("1 query", single, 50), ("64 queries", many, 10)):
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            store.query(queries, k)
            samples.append((time.perf_counter() - t0) * 1000)
        times[label] = float(np.median(samples))
    return ", ".join(f"{label} {ms:.2f} ms" for label, ms in times.items())


def knn_tiers(store: ExemplarStore, vectors: np.ndarray, cfg: RouterConfig) -> np.ndarray:
    """Tier indices the router's kNN scoring gives `vectors` against `store` (default thresholds)."""
    knn = KnnRouter(lambda texts: vectors, StoreIndex(store, lambda tier: label_difficulty(tier, TIERS)), cfg.knn)
    return tiers_for_scores(knn.score_vectors(vectors).values, cfg.thresholds_for(len(TIERS)))


def bench_config(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        knn=KnnConfig(k=args.k),
        embedder=EmbedderConfig(num_threads=args.threads),
        batch_max_size=args.batch_max,
        batch_wait_timeout_s=args.wait_ms / 1000,
        max_queue_wait_s=None,  # measure every decision the kNN router takes, not the busy fallback
    )


async def bench_size(args: argparse.Namespace, embedder: Embedder, size: int, texts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        cfg = bench_config(args)
        path = Path(data_dir) / "qdrant"
        store = ExemplarStore(collection=cfg.store.collection, dim=embedder.dim, path=path,
                              search=embedder.neighbor_search())  # the router's own kNN
        t0 = time.perf_counter()
        fill_store(store, embedder, size)
        print(f"\n== {store.count()} exemplars (filled in {time.perf_counter() - t0:.1f} s)")
        print(f"kNN alone, the router's matrix search: {knn_figures(store, embedder, texts, args.k)}")
        c1_texts = texts[: args.requests]
        if isinstance(embedder, RecheckEmbedder):
            exact_tiers = knn_tiers(store, embedder.exact.embed(c1_texts), cfg)
            fast_tiers = knn_tiers(store, embedder.fast.embed(c1_texts), cfg)
        store.close()
        if args.qdrant_knn:
            store = ExemplarStore(collection=cfg.store.collection, dim=embedder.dim, path=path, local_search="qdrant")
            print(f"kNN alone, qdrant-client local search: {knn_figures(store, embedder, texts, args.k)}")
            store.close()

        deployment = RouterDeployment(cfg, TIERS, data_dir, embedder=embedder)
        try:
            await closed_loop(deployment, texts[:16], 1)  # warm-up
            counts = recheck_counts(embedder)
            one = await closed_loop(deployment, c1_texts, 1)
            print(one.line("concurrency 1"))
            c1_counts = recheck_counts(embedder)
            many = await closed_loop(deployment, texts[: args.requests * 4], 64)
            print(many.line("concurrency 64"))
            if isinstance(embedder, RecheckEmbedder):
                served = np.array([one.tiers[t] for t in c1_texts])
                print(
                    f"re-check (band +-{embedder.margin:.3f}): {recheck_share(counts, c1_counts)} of concurrency-1 "
                    f"requests, {recheck_share(c1_counts, recheck_counts(embedder))} at 64; decisions differing "
                    f"from the exact model's at concurrency 1: {int(np.sum(served != exact_tiers))} of "
                    f"{len(c1_texts)} (int8 alone: {int(np.sum(fast_tiers != exact_tiers))})"
                )
            decide_tput, embed_tput = await interleaved_throughput(deployment, embedder, texts, args.rounds, 64)
            fallbacks = await deployment.fallbacks()
            assert not fallbacks, fallbacks
        finally:
            deployment.close()
        print(
            f"64 concurrent, interleaved x{args.rounds}: {decide_tput:.1f} decisions/s vs embedder alone "
            f"{embed_tput:.1f} texts/s (embed() on 64 texts) -> {100 * decide_tput / embed_tput:.0f}%"
        )


def shadow_config(spec: str, active_version: int) -> ShadowConfig:
    """`knn@0.3` -> kNN at another threshold; `version` -> the store's active version (a real search);
    `heuristic`, `classifier` as named."""
    kind, _, threshold = spec.partition("@")
    return ShadowConfig(enabled=True, candidate=kind, threshold=float(threshold) if threshold else None,
                        version=active_version if kind == "version" else None, max_queue_wait_s=10.0)


async def bench_shadow(args: argparse.Namespace, embedder: Embedder, size: int) -> None:
    """Decisions/s of 64 concurrent fresh texts with and without the candidate, alternating which goes first."""
    texts = query_texts(args.rounds * 128 + 16)
    with tempfile.TemporaryDirectory() as data_dir:
        cfg = bench_config(args)
        store = ExemplarStore(collection=cfg.store.collection, dim=embedder.dim, path=Path(data_dir) / "qdrant",
                              search=embedder.neighbor_search())
        fill_store(store, embedder, size)
        active = store.active
        store.close()
        print(f"\n== router.shadow's cost, {size} exemplars, 64 concurrent fresh texts, {args.rounds} rounds each")
        for spec in args.shadow:
            deployment = RouterDeployment(cfg.model_copy(update={"shadow": shadow_config(spec, active)}), TIERS,
                                          data_dir, embedder=embedder)
            seconds = {False: 0.0, True: 0.0}
            try:
                await closed_loop(deployment, texts[-16:], 1)  # warm-up
                for r in range(args.rounds):
                    for j, shadow in enumerate((False, True) if r % 2 == 0 else (True, False)):
                        chunk = texts[(2 * r + j) * 64:(2 * r + j + 1) * 64]  # fresh: no cache hits
                        t0 = time.perf_counter()
                        decided = await asyncio.gather(*(deployment.route(RouteInput(t, shadow=shadow))
                                                         for t in chunk))
                        seconds[shadow] += time.perf_counter() - t0
                        assert all((d.shadow is not None) == shadow for d in decided), spec
            finally:
                deployment.close()
            plain, shadowed = (args.rounds * 64 / seconds[s] for s in (False, True))
            print(f"shadow {spec:12s}: {plain:6.1f} decisions/s without, {shadowed:6.1f} with -> "
                  f"{100 * (1 - shadowed / plain):+.1f}% of the router's throughput")


def recheck_counts(embedder: Embedder) -> tuple[int, int]:
    """(texts embedded fast, texts re-checked) so far; zeros for an embedder without a re-check."""
    if isinstance(embedder, RecheckEmbedder):
        return embedder.fast_texts, embedder.rechecked_texts
    return 0, 0


def recheck_share(before: tuple[int, int], after: tuple[int, int]) -> str:
    fast, rechecked = after[0] - before[0], after[1] - before[1]
    return f"{rechecked}/{fast} ({100 * rechecked / max(fast, 1):.1f}%)"


async def bench_serve(args: argparse.Namespace, embedder: Embedder, size: int, texts: list[str]) -> None:
    """The same deployment behind a real local Ray Serve, called through a DeploymentHandle (adds the Ray hop)."""
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as data_dir:
        cfg = bench_config(args)
        store = ExemplarStore(collection=cfg.store.collection, dim=embedder.dim, path=Path(data_dir) / "qdrant")
        fill_store(store, embedder, size)
        store.close()
        env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            serve.start(proxy_location="Disabled")
            app = serve.deployment(RouterDeployment, max_ongoing_requests=256).bind(cfg, TIERS, data_dir)
            handle = serve.run(app, name="router-bench", route_prefix=None)

            async def call(text: str) -> tuple[float, float, float, int]:
                start = time.perf_counter()
                decision = await handle.route.remote(RouteInput(text))
                total = (time.perf_counter() - start) * 1000
                return total, decision.overhead_ms, decision.embed_ms, decision.batch_size

            for text in texts[:16]:
                await call(text)
            print(f"\n== Ray Serve, {size} exemplars (caller-side latency; in-replica part; Ray hop = the rest)")
            for concurrency, count in ((1, args.requests), (64, args.requests * 4)):
                pending, results = iter(texts[:count]), []

                async def client() -> None:
                    for text in pending:
                        results.append(await call(text))

                t0 = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(concurrency)))
                wall = time.perf_counter() - t0
                total, inside, embed, batch = (np.array(col) for col in zip(*results))
                print(
                    f"concurrency {concurrency:<3} n={len(total):>5}  caller p50 {np.percentile(total, 50):7.2f} ms "
                    f"p95 {np.percentile(total, 95):7.2f} | in replica p50 {np.percentile(inside, 50):7.2f} | embed "
                    f"p50 {np.percentile(embed, 50):7.2f} | hop p50 {np.percentile(total - inside, 50):5.2f} ms | "
                    f"mean batch {batch.mean():5.1f} | {len(total) / wall:6.1f} decisions/s"
                )
        finally:
            serve.shutdown()
            ray.shutdown()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--requests", type=int, default=200, help="requests at concurrency 1 (x4 at 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the embedder")
    parser.add_argument("--batch-max", type=int, default=64)
    parser.add_argument("--wait-ms", type=float, default=RouterConfig().batch_wait_timeout_s * 1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved throughput rounds of 64")
    parser.add_argument("--serve", action="store_true", help="also run through a local Ray Serve (largest size)")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "onnx-int8"],
                        help="embedder backend (router.embedder.backend)")
    parser.add_argument("--qdrant-knn", action="store_true", help="also time qdrant-client's own local search")
    parser.add_argument("--shadow", nargs="+", metavar="CANDIDATE",
                        help="only price router.shadow candidates: knn@<threshold>, version, heuristic")
    args = parser.parse_args()

    cache = Path(tempfile.gettempdir()) / "tierserve-bench"
    embedder = build_embedder(EmbedderConfig(num_threads=args.threads, backend=args.backend), cache)
    if isinstance(embedder, RecheckEmbedder):
        for check_file in sorted((cache / "onnx").glob("*/check-int8.json")):
            check = json.loads(check_file.read_text())
            print(f"int8 check ({check_file.parent.name}): min cosine {check['min_cosine']:.4f}; on the {check['n']} "
                  f"shipped exemplars {100 * check['recheck_share']:.1f}% fall in the re-check band "
                  f"+-{check['recheck_margin']:.3f}; flips without re-check "
                  f"{round(check['n'] * (1 - check['same_decisions']))} ({check['clear_flips']} clear), "
                  f"with it {check['flips_after_recheck']}")
    if args.shadow:
        await bench_shadow(args, embedder, max(args.sizes))
        return
    texts = query_texts(max(args.requests * 4, 256))
    if isinstance(embedder, RecheckEmbedder):
        fast_ms, fast_tput = embedder_figures(embedder.fast, texts, args.batch_max, 32)
        print(f"int8 embedder alone: single text p50 {fast_ms:.2f} ms; batched {fast_tput:.1f} texts/s; the exact one "
              "(re-checks, exemplars) below")
    single_ms, tput = embedder_figures(embedder, texts, args.batch_max, 32)
    print(
        f"embedder {embedder.name}, {args.threads} thread(s): single text p50 {single_ms:.2f} ms; "
        f"batched {tput:.1f} texts/s (batches of {args.batch_max}); "
        f"batch wait {args.wait_ms:.1f} ms; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    for size in args.sizes:
        await bench_size(args, embedder, size, texts)
    if args.serve:
        await bench_serve(args, embedder, max(args.sizes), texts)


if __name__ == "__main__":
    asyncio.run(main())
