"""What a self-hosted operator pays: GPU-seconds (and dollars) per 1k output tokens, per tier.

A replica holding `resources.num_gpus` GPUs and producing `tokens_per_s` output tokens per second spends
num_gpus x 1000 / tokens_per_s GPU-seconds per 1k output tokens (`serving.plan.memory.gpu_seconds_per_1k_tokens`);
`cost.usd_per_gpu_hour` turns that into dollars. Throughput comes from a measurement (`tierserve bench`
prints it; `cost.output_tokens_per_s` keeps it in the config). CPU tiers (num_gpus 0) have no GPU cost: they
are shown as "n/a (CPU)" rather than priced on a made-up CPU rate. `tierserve eval --config` prices the
evaluated policies the same way (`with_self_hosted`), beside the API-price view of `router.eval`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from serving.config import AppConfig
from serving.plan.memory import gpu_seconds_per_1k_tokens

if TYPE_CHECKING:
    from router.eval.runner import EvalReport

CPU_NA = "n/a (CPU)"


def usd(value: float) -> str:
    """Dollars to three significant digits, never in exponent form ("$0.0000868", "$3.6")."""
    if value <= 0:
        return "$0"
    decimals = max(2, 2 - math.floor(math.log10(value)))
    return "$" + f"{value:,.{decimals}f}".rstrip("0").rstrip(".")


@dataclass(frozen=True)
class TierCost:
    """One tier's GPU cost per 1k output tokens, or why it has none."""

    tier: str
    num_gpus: float
    tokens_per_s: float | None
    usd_per_gpu_hour: float | None

    @property
    def gpu_s_per_1k(self) -> float | None:
        """GPU-seconds per 1k output tokens (None: a CPU tier or no measured throughput)."""
        if self.num_gpus <= 0 or not self.tokens_per_s:
            return None
        return gpu_seconds_per_1k_tokens(self.tokens_per_s, self.num_gpus)

    @property
    def usd_per_1k(self) -> float | None:
        gpu_s = self.gpu_s_per_1k
        return None if gpu_s is None or self.usd_per_gpu_hour is None else gpu_s * self.usd_per_gpu_hour / 3600

    @property
    def missing(self) -> str | None:
        """Why there is no figure, in words a reader can act on (None: there is one)."""
        if self.num_gpus <= 0:
            return CPU_NA
        if not self.tokens_per_s:
            return f"no throughput: set cost.output_tokens_per_s.{self.tier} (`tierserve bench` measures it)"
        return None

    def label(self) -> str:
        """E.g. "0.417 GPU-s/1k tok ($0.00029)", or the reason there is none."""
        gpu_s = self.gpu_s_per_1k
        if gpu_s is None:
            return self.missing or "-"
        return f"{gpu_s:.3g} GPU-s/1k tok" + (f" ({usd(dollars)})" if (dollars := self.usd_per_1k) is not None else "")


def tier_costs(config: AppConfig, measured: Mapping[str, float] | None = None) -> dict[str, TierCost]:
    """Every tier's cost: throughput from `measured` where given, else from `cost.output_tokens_per_s`."""
    throughput = {**config.cost.output_tokens_per_s, **(measured or {})}
    return {
        t.name: TierCost(t.name, t.resources.num_gpus, throughput.get(t.name), config.cost.usd_per_gpu_hour)
        for t in config.tiers
    }


@dataclass(frozen=True)
class FleetCost:
    """GPU-seconds spent on output tokens per tier, against sending every answer to the `baseline` tier."""

    gpu_s: dict[str, float]
    baseline: str
    baseline_gpu_s: float
    usd_per_gpu_hour: float | None

    @property
    def total_gpu_s(self) -> float:
        return sum(self.gpu_s.values())

    @property
    def saved(self) -> float | None:
        """Share of the all-`baseline` GPU time saved (negative: routing cost more); None without a baseline."""
        return None if self.baseline_gpu_s <= 0 else 1.0 - self.total_gpu_s / self.baseline_gpu_s

    def usd(self, gpu_s: float) -> str:
        return "" if self.usd_per_gpu_hour is None else f" ({usd(gpu_s * self.usd_per_gpu_hour / 3600)})"


def fleet_cost(
    output_tokens: Mapping[str, float], costs: Mapping[str, TierCost], baseline: str,
    baseline_tokens: float | None = None,
) -> FleetCost | str:
    """The GPU time `output_tokens` (per tier) took, and `baseline_tokens` (default: all of them) would take
    on `baseline`; a reason string when a tier with tokens, or the baseline, has no GPU cost."""
    lacking = {t: costs[t].missing for t in [*output_tokens, baseline] if t in costs and costs[t].missing}
    unknown = sorted(set(output_tokens) - set(costs))
    if unknown:
        return f"tiers {unknown} are not in the config"
    if lacking:
        return "; ".join(f"{t}: {why}" for t, why in lacking.items())
    per_k = {t: c.gpu_s_per_1k for t, c in costs.items()}
    gpu_s = {t: n / 1000 * per_k[t] for t, n in output_tokens.items()}
    total_tokens = sum(output_tokens.values()) if baseline_tokens is None else baseline_tokens
    usd = next(iter(costs.values())).usd_per_gpu_hour if costs else None
    return FleetCost(gpu_s, baseline, total_tokens / 1000 * per_k[baseline], usd)


def with_self_hosted(report: EvalReport, weak: TierCost, strong: TierCost) -> EvalReport:
    """The report with its policies also priced in GPU time, beside the API-price view: a weak call costs
    weak/strong GPU-seconds per 1k output tokens of a strong one (equal answer lengths assumed)."""
    # Imported here: pandas comes with it, and only the eval CLI prices reports.
    from router.eval.metrics import summarize

    view: dict = {"weak_tier": weak.tier, "strong_tier": strong.tier, "weak": weak.label(), "strong": strong.label()}
    if weak.gpu_s_per_1k is None or strong.gpu_s_per_1k is None:
        view["note"] = "; ".join(f"{c.tier}: {c.missing}" for c in (weak, strong) if c.missing)
        return replace(report, self_hosted=view)
    ratio = weak.gpu_s_per_1k / strong.gpu_s_per_1k
    policies = {}
    for name, m in [*report.routers.items(), ("oracle", report.oracle)]:
        priced = summarize(replace(m.curve, cost=None), report.strong_acc, report.weak_acc,
                           cost_ratio=ratio, kind=m.kind)
        gpu_s = (1.0 - priced.cost_saved_at_95) * strong.gpu_s_per_1k
        policies[name] = {"saved_at_95": round(priced.cost_saved_at_95, 4), "gpu_s_per_1k_at_95": round(gpu_s, 4)}
        if strong.usd_per_gpu_hour is not None:
            policies[name]["usd_per_1k_at_95"] = round(gpu_s * strong.usd_per_gpu_hour / 3600, 6)
    view.update(weak_call_ratio=round(ratio, 4), policies=policies)
    return replace(report, self_hosted=view)


def format_self_hosted(view: dict) -> list[str]:
    """The lines `tierserve eval` prints under its table for a report's `self_hosted` view."""
    head = (f"self-hosted cost (GPU time): weak {view['weak_tier']} {view['weak']}, strong {view['strong_tier']} "
            f"{view['strong']}")
    if "note" in view:
        return [head, f"  n/a: {view['note']}"]
    rows = [head + f"; a weak call = {view['weak_call_ratio']:.3g} x a strong one (equal answer lengths assumed)",
            f"  {'policy':<20}{'saved@95%':>10}{'GPU-s/1k tok':>14}{'$/1k tok':>11}"]
    for name, p in view["policies"].items():
        dollars = usd(p["usd_per_1k_at_95"]) if "usd_per_1k_at_95" in p else "-"
        saved = f"{p['saved_at_95'] * 100:.1f}%" if math.isfinite(p["saved_at_95"]) else "-"
        rows.append(f"  {name:<20}{saved:>10}{p['gpu_s_per_1k_at_95']:>14.3g}{dollars:>11}")
    return rows
