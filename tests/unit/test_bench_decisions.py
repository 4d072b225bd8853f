"""The bench's routing-decision figures: quantiles of the ingress's overhead histogram between two scrapes."""

from __future__ import annotations

import pytest

from serving.bench.load import LoadResult, LoadSpec, error_summary
from serving.bench.report import markdown, round_ratios
from serving.bench.sidebyside import (
    BenchReport,
    Decisions,
    OverheadSnapshot,
    Run,
    decision_figures,
    prompt_seed,
)

BOUNDS = (0.005, 0.008, 0.01, 0.05, 0.1, float("inf"))


def cumulative(per_bucket: list[int], by_router: dict[str, float] | None = None, cached: float = 0.0
               ) -> OverheadSnapshot:
    total, out = 0, {}
    for bound, n in zip(BOUNDS, per_bucket, strict=True):
        total += n
        out[bound] = float(total)
    return OverheadSnapshot(out, by_router or {}, cached)


def test_quantiles_interpolate_within_the_bucket_and_ignore_earlier_decisions() -> None:
    before = cumulative([7, 3, 0, 0, 0, 0])  # decisions before the run must not count
    after = cumulative([7, 63, 39, 0, 1, 0])  # the run: 60 in (5, 8] ms, 39 in (8, 10], 1 in (50, 100]
    got = decision_figures(before, after)
    assert got is not None and got.count == 100
    assert got.p50_ms == pytest.approx(5 + 3 * 50 / 60)
    assert got.p99_ms == pytest.approx(10.0)


def test_no_decisions_no_figures_and_overflow_reports_the_last_bound() -> None:
    assert decision_figures(cumulative([1, 0, 0, 0, 0, 0]), cumulative([1, 0, 0, 0, 0, 0])) is None
    assert decision_figures(OverheadSnapshot({}, {}), cumulative([0, 0, 0, 0, 0, 5])).p99_ms == pytest.approx(100.0)


def test_the_markdown_lists_the_decisions_per_load() -> None:
    spec = LoadSpec(concurrency=32)
    result = LoadResult(output_tok_s=1000, request_s=10, completed=160, failed=0, ttft_p50_ms=50, ttft_p99_ms=90,
                        tpot_p50_ms=5, tpot_p99_ms=9, itl_p50_ms=5, e2el_p50_ms=400, e2el_p99_ms=600, duration_s=10)
    report = BenchReport(tier="small", runs=[
        Run("tierserve", 0, spec, result),
        Run("tierserve-auto", 0, spec, result,
            Decisions(count=160, p50_ms=9.5, p99_ms=31.0, by_router={"knn": 120, "heuristic": 40}, cached=8)),
    ])
    table = markdown(report)
    assert "| 64/64 tok, c=32, stream | 160 | knn 75%, heuristic 25% | 5% | 9.5 | 31.0 |" in table


def test_decisions_count_who_decided_during_the_run_only() -> None:
    got = decision_figures(cumulative([0, 0, 0, 0, 0, 0], {"knn": 50.0, "heuristic": 3.0}, cached=40.0),
                           cumulative([0, 60, 30, 0, 10, 0], {"knn": 130.0, "heuristic": 23.0, "session": 0.0},
                                      cached=45.0))
    assert got.by_router == {"heuristic": 20, "knn": 80}
    assert got.cached == 5  # the cache's answers before the run are not this run's


def test_every_run_of_a_bench_sends_prompts_of_its_own() -> None:
    """A prompt an earlier run sent would hit the engine's prefix cache and the router's decision cache."""
    n_specs, n_targets = 4, 3
    seeds = [prompt_seed(r, s, t, n_specs=n_specs, n_targets=n_targets)
             for r in range(3) for s in range(n_specs) for t in range(n_targets)]
    assert len(set(seeds)) == len(seeds)


def steady(tok_s: float) -> LoadResult:
    """A run whose figures differ from another's by tok/s alone."""
    return LoadResult(output_tok_s=tok_s, request_s=10, completed=640, failed=0, ttft_p50_ms=50, ttft_p99_ms=90,
                      tpot_p50_ms=5, tpot_p99_ms=9, itl_p50_ms=5, e2el_p50_ms=400, e2el_p99_ms=600, duration_s=10)


def test_the_ratio_shows_its_spread_over_rounds() -> None:
    spec = LoadSpec(concurrency=128)

    report = BenchReport(tier="small", runs=[
        Run("bare", 0, spec, steady(4000)), Run("tierserve", 0, spec, steady(3000)),
        Run("tierserve", 1, spec, steady(4400)), Run("bare", 1, spec, steady(4000)),
        Run("bare", 2, spec, steady(2000)),  # a round tierserve did not finish has no ratio
    ])
    assert round_ratios(report, "tierserve", spec) == pytest.approx([0.75, 1.1])
    assert "| 3,700 | 0.93x (rounds 0.75-1.10x) |" in markdown(report)
    single = BenchReport(tier="small", runs=report.runs[:2])
    assert "| 3,000 | 0.75x |" in markdown(single)


def test_the_shadow_cost_is_the_shadowed_auto_over_the_plain_auto_of_the_same_round() -> None:
    spec = LoadSpec(concurrency=32)

    report = BenchReport(tier="small", runs=[
        Run("tierserve-auto", 0, spec, steady(2000)), Run("tierserve-auto-shadow", 0, spec, steady(1900)),
        Run("tierserve-auto-shadow", 1, spec, steady(3030)), Run("tierserve-auto", 1, spec, steady(3000)),
        Run("tierserve-auto", 2, spec, steady(2500)),  # no shadowed run this round: no ratio
    ])
    assert round_ratios(report, "tierserve-auto-shadow", spec, against="tierserve-auto") == pytest.approx([0.95, 1.01])
    table = markdown(report)
    assert "Shadow cost:" in table and "- 64/64 tok, c=32, stream: 0.980x (rounds 0.950, 1.010)" in table
    assert "Shadow cost:" not in markdown(BenchReport(tier="small", runs=report.runs[:1]))


def test_bench_shadow_refuses_a_config_without_a_shadow_router(tmp_path, capsys) -> None:
    from serving.cli import main
    from tests.conftest import REPO

    assert main(["bench", "--shadow", "--config", str(REPO / "deploy/cpu.yaml"), "--out", str(tmp_path)]) == 2
    assert "router.shadow.enabled false" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything started


def test_a_burst_from_bare_is_compared_by_the_whole_answers_latency() -> None:
    spec = LoadSpec(concurrency=1, num_prompts=48)

    def result(ttft: float, tpot: float, e2el: float) -> LoadResult:
        return LoadResult(output_tok_s=600, request_s=9, completed=48, failed=0, ttft_p50_ms=ttft, ttft_p99_ms=ttft,
                          tpot_p50_ms=tpot, tpot_p99_ms=tpot, itl_p50_ms=tpot, e2el_p50_ms=e2el, e2el_p99_ms=e2el,
                          duration_s=5)

    # bare vLLM held every token back and sent the answer at once: TPOT 0, TTFT = the whole answer.
    report = BenchReport(tier="small", runs=[Run("bare", 0, spec, result(90.0, 0.0, 91.0)),
                                             Run("tierserve", 0, spec, result(8.5, 1.5, 100.1))])
    row = next(line for line in markdown(report).splitlines() if "| tierserve |" in line)
    assert "(TTFT -81.5 ms)" in row and "bare sent its tokens in one burst; whole answer p50 1.10x" in row


def test_failed_requests_are_listed_with_their_reasons() -> None:
    spec = LoadSpec(concurrency=128, stream=False)

    def result(failed: int, errors: dict[str, int]) -> LoadResult:
        return LoadResult(output_tok_s=1000, request_s=10, completed=640 - failed, failed=failed, ttft_p50_ms=50,
                          ttft_p99_ms=90, tpot_p50_ms=0, tpot_p99_ms=0, itl_p50_ms=0, e2el_p50_ms=400,
                          e2el_p99_ms=600, duration_s=10, errors=errors)

    report = BenchReport(tier="small", runs=[
        Run("bare", 0, spec, result(3, {"ServerDisconnectedError()": 3})),
        Run("bare", 1, spec, result(5, {"ServerDisconnectedError()": 4, "timeout": 1})),
        Run("tierserve", 0, spec, result(0, {})),
    ])
    table = markdown(report)
    assert "- 64/64 tok, c=128, unary, bare: 7 x `ServerDisconnectedError()`; 1 x `timeout`" in table
    assert "tierserve:" not in table.split("Failed requests:")[1]


def test_a_benchmark_result_keeps_each_distinct_error_once_with_its_count() -> None:
    raw = {"output_throughput": 1.0, "request_throughput": 1.0, "completed": 1, "failed": 3, "median_ttft_ms": 1,
           "p99_ttft_ms": 1, "median_tpot_ms": 1, "p99_tpot_ms": 1, "median_itl_ms": 1, "median_e2el_ms": 1,
           "p99_e2el_ms": 1, "duration": 1.0, "errors": ["", "boom", "boom", "x" * 300]}
    assert LoadResult.from_vllm(raw).errors == {"boom": 2, "x" * 160: 1}


def test_a_failed_requests_traceback_is_counted_by_its_exception() -> None:
    """vLLM's benchmark stores a failed request's whole traceback; the report names the exception, which the
    traceback's first line does not."""
    traceback = ('Traceback (most recent call last):\n  File "/x/vllm/benchmarks/lib/endpoint_request_func.py", '
                 'line 120, in f\n    async with session.post(url) as response:\n'
                 "aiohttp.client_exceptions.ServerDisconnectedError: Server disconnected\n")
    assert error_summary(traceback) == "aiohttp.client_exceptions.ServerDisconnectedError: Server disconnected"
    assert error_summary("Bad Request: max_tokens must be positive") == "Bad Request: max_tokens must be positive"
    assert error_summary("  \n") == ""
