"""`tierserve bench`: tierserve and bare vLLM under vLLM's own serving benchmark, side by side.

One target runs at a time (they would share the cores); the order alternates every round, and the
report keeps every round's figures plus the median per (target, load), so a ratio never rests on one
lucky run.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from serving.bench import cpu
from serving.bench.bare import bare_vllm
from serving.bench.load import LoadResult, LoadSpec, run_load
from serving.config import AppConfig


@dataclass(frozen=True)
class Target:
    """Something to load: bare vLLM for a tier, tierserve with `model`, or tierserve on the scripted engine."""

    name: str
    """'bare', 'tierserve', 'tierserve-auto', 'tierserve-auto-shadow' or 'plumbing'."""
    model: str
    extra_body: dict[str, Any] | None = None


@dataclass(frozen=True)
class Decisions:
    """The routing decisions taken during one `model="auto"` run, from the ingress's own histogram
    (`tierserve_routing_overhead_seconds`: what `x-tierserve-overhead-ms` reports per request)."""

    count: int
    p50_ms: float
    p99_ms: float
    by_router: dict[str, int] = field(default_factory=dict)
    """How many each router decided: `knn`, or `heuristic` where it fell back (a busy router, a timeout)."""
    cached: int = 0
    """How many of them the router's decision cache answered (a text decided moments ago)."""


@dataclass
class Run:
    target: str
    round: int
    spec: LoadSpec
    result: LoadResult
    decisions: Decisions | None = None
    cpu_ms_per_1k_tok: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per 1,000 output tokens by process role, over the whole machine (`serving.bench.cpu`)."""


@dataclass
class BenchReport:
    tier: str
    runs: list[Run] = field(default_factory=list)

    def median(self, target: str, spec: LoadSpec, metric: str) -> float | None:
        values = [getattr(r.result, metric) for r in self.runs if r.target == target and r.spec == spec]
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "runs": [{"target": r.target, "round": r.round, "spec": asdict(r.spec),
                                             "result": asdict(r.result),
                                             "decisions": asdict(r.decisions) if r.decisions else None,
                                             "cpu_ms_per_1k_tok": r.cpu_ms_per_1k_tok}
                                            for r in self.runs]}


def loads_for(concurrency: list[int], modes: list[str], num_prompts: int, input_len: int, output_len: int
              ) -> list[LoadSpec]:
    """The load shapes of one round: every (mode, concurrency), plus concurrency 1 for TTFT overhead."""
    specs = []
    for stream in [m == "stream" for m in modes]:
        for c in concurrency:
            specs.append(LoadSpec(concurrency=c, num_prompts=max(num_prompts, c * 2), input_len=input_len,
                                  output_len=output_len, stream=stream))
    specs.append(LoadSpec(concurrency=1, num_prompts=48, input_len=input_len, output_len=output_len, stream=True))
    return specs


@contextmanager
def _serving(target: Target, config: AppConfig, tier: str, port: int, log_dir: Path) -> Iterator[str]:
    if target.name == "bare":
        with bare_vllm(config, tier, port, log_path=log_dir / "bare-vllm.log") as url:
            yield url
        return
    from serving import launch

    engine_cls = None
    if target.name == "plumbing":
        from serving.bench.scripted import PlumbingEngine

        engine_cls = PlumbingEngine
    url = launch.start(config, engine_cls=engine_cls)
    mode = httpx.get(url + "/health", timeout=10).json().get("ingress")
    tqdm.write(f"{target.name} serving at {url} (ingress: {mode})")
    try:
        yield url
    finally:
        launch.stop()


def run_bench(
    config: AppConfig, tier: str, targets: list[Target], specs: list[LoadSpec], *, rounds: int, port: int,
    log_dir: Path,
) -> BenchReport:
    """Every target under every load, `rounds` times, alternating which target goes first.

    Every run sends prompts of its own (vLLM's random dataset, seeded per run): a prompt seen by an earlier run
    would be answered from the engine's prefix cache, and for `model="auto"` from the router's decision cache,
    so a later run (a second target on the same stack, the next load) would measure caches instead of work."""
    report = BenchReport(tier=tier)
    tokenizer = str(config.model_path(config.tier(tier)))
    servers = _server_groups(targets)
    total = rounds * sum(len(group) for group in servers) * len(specs)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for rnd in range(rounds):
            order = servers if rnd % 2 == 0 else list(reversed(servers))
            for group in order:
                with _serving(group[0], config, tier, port, log_dir) as url:
                    for s, spec in enumerate(specs):
                        for target in group if rnd % 2 == 0 else reversed(group):  # who goes first alternates
                            bar.set_postfix_str(f"{target.name} c={spec.concurrency} "
                                                f"{'stream' if spec.stream else 'unary'}")
                            seed = prompt_seed(rnd, s, targets.index(target), n_specs=len(specs), n_targets=len(targets))
                            run_spec = replace(spec, seed=seed, extra_body=target.extra_body or spec.extra_body)
                            routed = target.model == "auto"
                            before = overhead_snapshot(url) if routed else None
                            cpu_before = cpu.snapshot()
                            result = run_load(url, target.model, tokenizer, run_spec)
                            spent = cpu.cpu_by_role(cpu_before, cpu.snapshot())
                            decisions = decision_figures(before, overhead_snapshot(url)) if before else None
                            tokens = result.output_tok_s * result.duration_s
                            report.runs.append(Run(target.name, rnd, spec, result, decisions,
                                                   cpu.per_1k_tokens(spent, tokens)))
                            bar.update(1)
    return report


def prompt_seed(rnd: int, spec_index: int, target_index: int, *, n_specs: int, n_targets: int) -> int:
    """The random dataset's seed of one run: a different one for every (round, load, target) of a bench."""
    return 1 + (rnd * n_specs + spec_index) * n_targets + target_index


_OVERHEAD_BUCKET = "tierserve_routing_overhead_seconds_bucket"
_OVERHEAD_COUNT = "tierserve_routing_overhead_seconds_count"
_CACHED_TOTAL = "tierserve_router_cached_decisions_total"


@dataclass(frozen=True)
class OverheadSnapshot:
    """The ingress's routing-overhead histogram at one moment."""

    buckets: dict[float, float]
    """Cumulative count per upper bound (s), all routers summed."""
    by_router: dict[str, float]
    """Decisions so far per router that took them (`knn`, `heuristic`, ...)."""
    cached: float = 0.0
    """Decisions so far that the router's decision cache answered."""


def overhead_snapshot(url: str) -> OverheadSnapshot:
    """Scrape the ingress's `tierserve_routing_overhead_seconds` once."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    buckets: dict[float, float] = {}
    by_router: dict[str, float] = {}
    cached = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == _OVERHEAD_BUCKET:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == _OVERHEAD_COUNT:
                router = sample.labels.get("router", "")
                by_router[router] = by_router.get(router, 0.0) + sample.value
            elif sample.name == _CACHED_TOTAL:
                cached += sample.value
    return OverheadSnapshot(buckets, by_router, cached)


def decision_figures(before: OverheadSnapshot, after: OverheadSnapshot) -> Decisions | None:
    """p50/p99 of the decisions between two scrapes, interpolated within buckets as Prometheus's
    `histogram_quantile` does, and who decided them (None if there were none)."""
    bounds = sorted(after.buckets)
    counts = [after.buckets[b] - before.buckets.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None

    def quantile(q: float) -> float:
        rank, lower, below = q * total, 0.0, 0.0
        for bound, cumulative in zip(bounds, counts):
            if cumulative >= rank:
                if bound == float("inf"):
                    return lower * 1000  # past the last finite bucket: its bound, as Prometheus reports
                share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                return (lower + (bound - lower) * share) * 1000
            lower, below = bound, cumulative
        return lower * 1000

    by_router = {router: int(n - before.by_router.get(router, 0.0)) for router, n in sorted(after.by_router.items())
                 if n > before.by_router.get(router, 0.0)}
    return Decisions(count=int(total), p50_ms=quantile(0.5), p99_ms=quantile(0.99), by_router=by_router,
                     cached=int(after.cached - before.cached))


def _server_groups(targets: list[Target]) -> list[list[Target]]:
    """Targets that share one server process (tierserve by tier and through the router) run together."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        key = "bare" if t.name == "bare" else ("plumbing" if t.name == "plumbing" else "tierserve")
        groups.setdefault(key, []).append(t)
    return list(groups.values())
