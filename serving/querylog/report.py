"""Routing, escalation and GPU cost over time, from query-log records (`tierserve report`), and the rows
`train-router --from-querylog` and `calibrate --cascade --from-querylog` learn from."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from serving.plan.cost import FleetCost, TierCost, fleet_cost
from serving.querylog.log import QueryRecord


def records_frame(records: Sequence[QueryRecord]) -> pd.DataFrame:
    """One row per record with the columns the report and `train-router` use."""
    return pd.DataFrame(
        {
            "time": pd.to_datetime([r.timestamp for r in records], unit="s", utc=True),
            "router": [r.router for r in records],
            "tier": [r.tier for r in records],
            "first_tier": [r.tier_chain[0] if r.tier_chain else r.tier for r in records],
            "score": [np.nan if r.score is None else r.score for r in records],
            "escalated": [r.escalated for r in records],
            "latency_ms": [r.latency_ms for r in records],
            "tokens": [r.prompt_tokens + r.completion_tokens for r in records],
            "status": [r.status for r in records],
        }
    )


def routing_over_time(records: Sequence[QueryRecord], bucket: str = "1h") -> pd.DataFrame:
    """Per time bucket: requests, share served by each tier, escalation and error rates, score and latency.

    `bucket` is a pandas frequency ("15min", "1h", "1D"). Empty buckets are left out.
    """
    if not records:
        return pd.DataFrame(columns=["requests", "escalation_rate", "error_rate", "mean_score", "p50_latency_ms",
                                     "p95_latency_ms"])
    df = records_frame(records).set_index("time")
    grouped = df.groupby(pd.Grouper(freq=bucket))
    table = pd.DataFrame(
        {
            "requests": grouped.size(),
            "escalation_rate": grouped["escalated"].mean(),
            "error_rate": grouped["status"].agg(lambda s: float((s != "ok").mean()) if len(s) else np.nan),
            "mean_score": grouped["score"].mean(),
            "p50_latency_ms": grouped["latency_ms"].median(),
            "p95_latency_ms": grouped["latency_ms"].quantile(0.95),
        }
    )
    shares = pd.crosstab(df.index.floor(bucket), df["tier"], normalize="index")
    shares.columns = [f"share_{c}" for c in shares.columns]
    table = table.join(shares)
    return table[table["requests"] > 0]


def format_report(table: pd.DataFrame) -> str:
    """Fixed-width text of `routing_over_time`."""
    if table.empty:
        return "no query-log records in that window"
    shown = table.copy()
    for col in shown.columns:
        if col.endswith("_rate") or col.startswith("share_"):
            shown[col] = (shown[col] * 100).map(lambda v: f"{v:.1f}%")
        elif col != "requests":
            shown[col] = shown[col].map(lambda v: f"{v:.2f}" if pd.notna(v) else "-")
    shown.index = shown.index.strftime("%Y-%m-%d %H:%M")
    return shown.to_string()


def labelled_rows(records: Sequence[QueryRecord], *, small_tier: str | None = None) -> tuple[list[str], np.ndarray]:
    """(prompts, difficulty labels) usable to train the classifier from the log.

    A record counts when it stored its prompt and either carries an explicit `label`, or started on the
    cheapest tier (`small_tier`, default: the most common first tier) and the cascade decided: escalated
    means the small tier's answer was not good enough (label 1), accepted means it was (label 0).
    Requests routed straight to a bigger tier say nothing about the small one and are skipped.
    """
    firsts = [r.tier_chain[0] for r in records if r.tier_chain]
    if small_tier is None and firsts:
        small_tier = max(set(firsts), key=firsts.count)
    prompts, labels = [], []
    for r in records:
        if not r.prompt or r.status != "ok":
            continue
        if r.label is not None:
            prompts.append(r.prompt)
            labels.append(float(r.label))
        elif r.tier_chain and r.tier_chain[0] == small_tier:
            prompts.append(r.prompt)
            labels.append(1.0 if r.escalated else 0.0)
    return prompts, np.asarray(labels, dtype=float)


def logged_confidences(records: Sequence[QueryRecord], tier: str) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, confidences) of the cascade decisions on `tier`'s answers, oldest first."""
    times, conf = [], []
    for r in records:
        for d in r.cascade_decisions():
            if d.tier == tier:
                times.append(r.timestamp)
                conf.append(d.confidence)
    order = np.argsort(times, kind="stable")
    return np.asarray(times)[order], np.asarray(conf, dtype=float)[order]


def cascade_frame(records: Sequence[QueryRecord]) -> pd.DataFrame:
    """One row per cascade decision: time, tier, confidence, threshold (NaN if not logged), escalated."""
    rows = [(r.timestamp, d.tier, d.confidence, np.nan if d.threshold is None else d.threshold, d.escalated)
            for r in records for d in r.cascade_decisions()]
    frame = pd.DataFrame(rows, columns=["time", "tier", "confidence", "threshold", "escalated"])
    frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
    return frame


def cascade_over_time(records: Sequence[QueryRecord], bucket: str = "1h", *, tier: str | None = None,
                      target: float | None = None) -> pd.DataFrame:
    """Per time bucket, for the cascade decisions on `tier`'s answers (default: the most frequent tier):
    decisions, escalation rate, confidence quantiles, mean threshold, and `drift` where the rate is off the
    calibrated `target` by more than chance allows (2 standard errors) and by more than 2 points."""
    frame = cascade_frame(records)
    columns = ["decisions", "escalation_rate", "target", "drift", "confidence_p10", "confidence_p50",
               "confidence_p90", "threshold"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    tier = tier or frame["tier"].mode().iloc[0]
    grouped = frame[frame["tier"] == tier].set_index("time").groupby(pd.Grouper(freq=bucket))
    table = pd.DataFrame(
        {
            "decisions": grouped.size(),
            "escalation_rate": grouped["escalated"].mean(),
            "confidence_p10": grouped["confidence"].quantile(0.1),
            "confidence_p50": grouped["confidence"].quantile(0.5),
            "confidence_p90": grouped["confidence"].quantile(0.9),
            "threshold": grouped["threshold"].mean(),
        }
    )
    table = table[table["decisions"] > 0]
    table.insert(2, "target", np.nan if target is None else target)
    if target is None:
        table.insert(3, "drift", "")
    else:
        se = np.sqrt(target * (1 - target) / table["decisions"])
        off = table["escalation_rate"] - target
        flag = (off.abs() > np.maximum(2 * se, 0.02))
        table.insert(3, "drift", np.where(flag, np.where(off > 0, "HIGH", "LOW"), ""))
    table.attrs["tier"] = tier
    return table


def format_cascade(table: pd.DataFrame) -> str:
    """Fixed-width text of `cascade_over_time`, with a one-line summary."""
    if table.empty:
        return "no cascade decisions in that window"
    tier = table.attrs.get("tier", "?")
    n = int(table["decisions"].sum())
    rate = float((table["escalation_rate"] * table["decisions"]).sum() / n)
    target = table["target"].iloc[0]
    head = f"cascade on {tier}: {n} decisions, {rate:.1%} escalated"
    head += f" against a calibrated target of {target:.1%}" if pd.notna(target) else " (no target in the config)"
    shown = table.copy()
    for col in ("escalation_rate", "target"):
        shown[col] = shown[col].map(lambda v: f"{v * 100:.1f}%" if pd.notna(v) else "-")
    for col in ("confidence_p10", "confidence_p50", "confidence_p90", "threshold"):
        shown[col] = shown[col].map(lambda v: f"{v:.3f}" if pd.notna(v) else "-")
    shown.index = shown.index.strftime("%Y-%m-%d %H:%M")
    return head + "\n" + shown.to_string()


def output_tokens_by_tier(records: Sequence[QueryRecord]) -> tuple[dict[str, float], float]:
    """Output tokens each tier produced, and how many of them are estimated.

    The log keeps the returned answer's length only; an escalated request's discarded answers (every tier
    in its chain before the last) are counted at that same length, an estimate reported as such.
    """
    tokens: dict[str, float] = {}
    estimated = 0.0
    for r in records:
        tokens[r.tier] = tokens.get(r.tier, 0.0) + r.completion_tokens
        for tier in r.tier_chain[:-1]:
            tokens[tier] = tokens.get(tier, 0.0) + r.completion_tokens
            estimated += r.completion_tokens
    return tokens, estimated


def format_cost(records: Sequence[QueryRecord], costs: Mapping[str, TierCost], baseline: str) -> str:
    """GPU-seconds (and dollars) the logged answers took per tier, against all of them on `baseline`."""
    tokens, estimated = output_tokens_by_tier(records)
    head = "self-hosted cost (GPU-seconds per 1k output tokens: resources.num_gpus x 1000 / cost.output_tokens_per_s)"
    if not tokens or not sum(tokens.values()):
        return head + "\n  no output tokens in that window"
    # On `baseline` alone nothing escalates: only the returned answers would be generated.
    fleet = fleet_cost(tokens, costs, baseline, baseline_tokens=sum(tokens.values()) - estimated)
    if not isinstance(fleet, FleetCost):
        return f"{head}\n  n/a: {fleet}"
    lines = [head]
    for tier, n in tokens.items():
        lines.append(f"  {tier:<12}{n:>12,.0f} output tok x {costs[tier].label():<28} = "
                     f"{_gpu_s(fleet.gpu_s[tier])} GPU-s{fleet.usd(fleet.gpu_s[tier])}")
    if estimated:
        lines.append(f"  ({estimated:,.0f} of those tokens are escalated answers' discarded drafts, counted at the "
                     "returned answer's length)")
    lines.append(f"  total {_gpu_s(fleet.total_gpu_s)} GPU-s{fleet.usd(fleet.total_gpu_s)}; all on {baseline}: "
                 f"{_gpu_s(fleet.baseline_gpu_s)} GPU-s{fleet.usd(fleet.baseline_gpu_s)}; saved {fleet.saved:.1%}")
    return "\n".join(lines)


def _gpu_s(value: float) -> str:
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"
