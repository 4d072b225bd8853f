"""Self-hosted cost: GPU-seconds (and dollars) per 1k output tokens per tier, and where it is printed."""

from __future__ import annotations

import numpy as np
import pytest

from router.eval.metrics import Curve, summarize
from router.eval.report import format_table
from router.eval.runner import EvalReport
from serving.bench.load import LoadResult, LoadSpec
from serving.bench.report import BenchCost, markdown
from serving.bench.sidebyside import BenchReport, Run
from serving.config import parse_config
from serving.plan.cost import (
    CPU_NA,
    FleetCost,
    TierCost,
    fleet_cost,
    format_self_hosted,
    tier_costs,
    usd,
    with_self_hosted,
)


def _gpu_config(**cost: object) -> dict:
    def tier(name: str, share: float) -> dict:
        return {"name": name, "model": f"/m/{name}", "resources": {"num_gpus": share},
                "engine": {"gpu_memory_utilization": share}}

    return {"device": "gpu", "tiers": [tier("small", 0.3), tier("large", 0.6)], "cost": cost}


def test_gpu_seconds_per_1k_tokens_from_the_gpu_share_and_measured_throughput() -> None:
    costs = tier_costs(parse_config(_gpu_config(usd_per_gpu_hour=3.6, output_tokens_per_s={"small": 1500})))
    small = costs["small"]
    assert small.gpu_s_per_1k == pytest.approx(0.3 * 1000 / 1500)  # 0.2 GPU-s
    assert small.usd_per_1k == pytest.approx(0.2 * 3.6 / 3600)  # $0.0002
    assert small.label() == "0.2 GPU-s/1k tok ($0.0002)"
    assert costs["large"].gpu_s_per_1k is None
    assert costs["large"].label() == ("no throughput: set cost.output_tokens_per_s.large (`tierserve bench` "
                                      "measures it)")


def test_a_measured_throughput_overrides_the_config_and_no_price_means_gpu_seconds_only() -> None:
    config = parse_config(_gpu_config(output_tokens_per_s={"small": 1500}))
    small = tier_costs(config, measured={"small": 3000})["small"]
    assert small.gpu_s_per_1k == pytest.approx(0.1) and small.usd_per_1k is None
    assert small.label() == "0.1 GPU-s/1k tok"


def test_cpu_tiers_have_no_gpu_cost() -> None:
    cpu = TierCost("small", num_gpus=0.0, tokens_per_s=900.0, usd_per_gpu_hour=2.5)
    assert cpu.gpu_s_per_1k is None and cpu.usd_per_1k is None and cpu.label() == CPU_NA == "n/a (CPU)"


def test_fleet_cost_against_all_on_the_largest_tier() -> None:
    costs = {"small": TierCost("small", 0.3, 1500.0, 3.6), "large": TierCost("large", 0.6, 500.0, 3.6)}
    fleet = fleet_cost({"small": 8000, "large": 2000}, costs, baseline="large")
    assert isinstance(fleet, FleetCost)
    assert fleet.gpu_s == pytest.approx({"small": 1.6, "large": 2.4})  # 8 x 0.2, 2 x 1.2
    assert fleet.baseline_gpu_s == pytest.approx(12.0)  # 10k tokens x 1.2
    assert fleet.saved == pytest.approx(1 - 4.0 / 12.0)
    assert fleet.usd(3600.0) == " ($3.6)"
    cpu = {**costs, "small": TierCost("small", 0.0, None, None)}
    assert fleet_cost({"small": 1, "large": 1}, cpu, "large") == "small: n/a (CPU)"


def test_config_refuses_unknown_tiers_and_bad_prices_by_field() -> None:
    from router.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cost.output_tokens_per_s names unknown tiers \['medium'\]"):
        parse_config(_gpu_config(output_tokens_per_s={"medium": 10}))
    with pytest.raises(ConfigError, match=r"cost\.output_tokens_per_s\.small: Input should be greater than 0"):
        parse_config(_gpu_config(output_tokens_per_s={"small": 0}))
    with pytest.raises(ConfigError, match=r"cost\.usd_per_gpu_hour: Input should be greater than or equal to 0"):
        parse_config(_gpu_config(usd_per_gpu_hour=-1))


def _result(tps: float) -> LoadResult:
    return LoadResult(output_tok_s=tps, request_s=1.0, completed=10, failed=0, ttft_p50_ms=5.0, ttft_p99_ms=9.0,
                      tpot_p50_ms=2.0, tpot_p99_ms=3.0, itl_p50_ms=2.0, e2el_p50_ms=50.0, e2el_p99_ms=90.0,
                      duration_s=1.0)


def test_bench_table_prices_each_throughput_and_says_what_to_put_in_the_config() -> None:
    c32, c128 = LoadSpec(concurrency=32), LoadSpec(concurrency=128)
    report = BenchReport("small", [Run("bare", 0, c32, _result(1000.0)), Run("tierserve", 0, c32, _result(800.0)),
                                   Run("tierserve", 0, c128, _result(2400.0))])
    cost = BenchCost(TierCost("small", 0.3, None, 3.6), replicas=2)
    table = markdown(report, cost)
    # 0.3 GPU x 2 replicas x 1000 / 800 tok/s = 0.75 GPU-s per 1k tokens; $0.00075 at $3.60/GPU-hour
    assert "| 0.75 GPU-s/1k tok ($0.00075) |" in table
    assert "| 0.6 GPU-s/1k tok ($0.0006) |" in table  # bare at 1000 tok/s
    assert "set cost.output_tokens_per_s.small: 1200 (per replica)" in table  # c=128: 2400 / 2 replicas
    cpu = markdown(report, BenchCost(TierCost("small", 0.0, None, None)))
    assert cpu.count("| n/a (CPU) |") == 3 and "CPU tier" in cpu
    assert "cost per 1k" not in markdown(report)


def _report() -> EvalReport:
    # A router that reaches 95% of strong quality with 40% strong calls.
    curve = Curve(np.array([0.0, 40.0, 100.0]), np.array([60.0, 76.0, 80.0]))
    knn = summarize(curve, 80.0, 60.0)
    return EvalReport("toy", "accuracy", 10, 10, 80.0, 60.0, {"knn": knn}, knn)


def test_eval_prices_the_policies_in_gpu_time_beside_the_api_view() -> None:
    weak, strong = TierCost("small", 0.3, 1500.0, 3.6), TierCost("large", 0.6, 500.0, 3.6)  # 0.2 vs 1.2 GPU-s
    report = with_self_hosted(_report(), weak, strong)
    view = report.self_hosted["policies"]["knn"]
    # 40% strong calls + 60% weak calls at 1/6 of a strong one = 50% of all-strong GPU time
    assert report.self_hosted["weak_call_ratio"] == pytest.approx(1 / 6, abs=1e-4)
    assert view["saved_at_95"] == pytest.approx(0.5, abs=1e-4)
    assert view["gpu_s_per_1k_at_95"] == pytest.approx(0.6, abs=1e-4)
    assert view["usd_per_1k_at_95"] == pytest.approx(0.0006, abs=1e-7)
    assert "cost: strong calls only" in format_table(report)  # the API-price view stays
    text = "\n".join(format_self_hosted(report.self_hosted))
    assert "self-hosted cost (GPU time): weak small 0.2 GPU-s/1k tok ($0.0002)" in text
    assert "knn" in text.split("self-hosted")[1] and "50.0%" in text.split("self-hosted")[1]
    assert report.to_json()["self_hosted"]["policies"]["knn"]["saved_at_95"] == pytest.approx(0.5, abs=1e-4)


def test_eval_on_cpu_tiers_says_na() -> None:
    report = with_self_hosted(_report(), TierCost("small", 0, None, None), TierCost("large", 0, None, None))
    assert "n/a: small: n/a (CPU); large: n/a (CPU)" in "\n".join(format_self_hosted(report.self_hosted))


@pytest.mark.parametrize(("value", "text"), [(8.68e-05, "$0.0000868"), (0.000585, "$0.000585"), (0.0123456, "$0.0123"),
                                             (2.5, "$2.5"), (0.0, "$0")])
def test_dollars_print_without_exponents(value: float, text: str) -> None:
    assert usd(value) == text
