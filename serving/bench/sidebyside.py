"""`tierserve bench`: tierserve and bare vLLM under vLLM's own serving benchmark, side by side.

One target runs at a time (they would share the cores); the order alternates every round, and the
report keeps every round's figures plus the median per (target, load), so a ratio never rests on one
lucky run.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from serving.bench.bare import bare_vllm
from serving.bench.load import LoadResult, LoadSpec, run_load
from serving.config import AppConfig


@dataclass(frozen=True)
class Target:
    """Something to load: bare vLLM for a tier, tierserve with `model`, or tierserve on the scripted engine."""

    name: str
    """'bare', 'tierserve', 'tierserve-auto' or 'plumbing'."""
    model: str
    extra_body: dict[str, Any] | None = None


@dataclass
class Run:
    target: str
    round: int
    spec: LoadSpec
    result: LoadResult


@dataclass
class BenchReport:
    tier: str
    runs: list[Run] = field(default_factory=list)

    def median(self, target: str, spec: LoadSpec, metric: str) -> float | None:
        values = [getattr(r.result, metric) for r in self.runs if r.target == target and r.spec == spec]
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        return {"tier": self.tier, "runs": [{"target": r.target, "round": r.round, "spec": asdict(r.spec),
                                             "result": asdict(r.result)} for r in self.runs]}


def loads_for(concurrency: list[int], modes: list[str], num_prompts: int, input_len: int, output_len: int
              ) -> list[LoadSpec]:
    """The load shapes of one round: every (mode, concurrency), plus concurrency 1 for TTFT overhead."""
    specs = []
    for stream in [m == "stream" for m in modes]:
        for c in concurrency:
            specs.append(LoadSpec(concurrency=c, num_prompts=max(num_prompts, c * 2), input_len=input_len,
                                  output_len=output_len, stream=stream))
    specs.append(LoadSpec(concurrency=1, num_prompts=24, input_len=input_len, output_len=output_len, stream=True))
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
    try:
        yield url
    finally:
        launch.stop()


def run_bench(
    config: AppConfig, tier: str, targets: list[Target], specs: list[LoadSpec], *, rounds: int, port: int,
    log_dir: Path,
) -> BenchReport:
    """Every target under every load, `rounds` times, alternating which target goes first."""
    report = BenchReport(tier=tier)
    tokenizer = str(config.model_path(config.tier(tier)))
    servers = _server_groups(targets)
    total = rounds * sum(len(group) for group in servers) * len(specs)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for rnd in range(rounds):
            order = servers if rnd % 2 == 0 else list(reversed(servers))
            for group in order:
                with _serving(group[0], config, tier, port, log_dir) as url:
                    for spec in specs:
                        for target in group:
                            bar.set_postfix_str(f"{target.name} c={spec.concurrency} "
                                                f"{'stream' if spec.stream else 'unary'}")
                            run_spec = spec if target.extra_body is None else _with_body(spec, target.extra_body)
                            result = run_load(url, target.model, tokenizer, run_spec)
                            report.runs.append(Run(target.name, rnd, spec, result))
                            bar.update(1)
    return report


def _with_body(spec: LoadSpec, body: dict[str, Any]) -> LoadSpec:
    from dataclasses import replace

    return replace(spec, extra_body=body)


def _server_groups(targets: list[Target]) -> list[list[Target]]:
    """Targets that share one server process (tierserve by tier and through the router) run together."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        key = "bare" if t.name == "bare" else ("plumbing" if t.name == "plumbing" else "tierserve")
        groups.setdefault(key, []).append(t)
    return list(groups.values())
