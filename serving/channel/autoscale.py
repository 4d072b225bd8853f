"""Serve's autoscaler for the tier deployments, fed by what the replicas report of the data plane.

Requests reach tier replicas over their data ports, not through Ray handles, so Serve's default policy would
count no ongoing request and keep an autoscaled tier at `min_replicas`. Each replica reports its own
(`TierServer.record_autoscaling_stats`: `ongoing`, `waiting`), and this policy asks for enough replicas to hold
the ongoing total at `target_ongoing_requests` each. Serve wraps it with the deployment's bounds, delays and
scaling factors, as it does its own policy.

Configured as `autoscaling_config.policy.policy_function: "serving.channel.autoscale:tier_policy"`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

POLICY = "serving.channel.autoscale:tier_policy"


def desired_replicas(ongoing_by_replica: Mapping[Any, float], target_per_replica: float, current: int) -> float:
    """Replicas that hold the reported ongoing requests at `target_per_replica` each; the current count while no
    replica has reported yet (a replica that just started has nothing to say)."""
    if not ongoing_by_replica:
        return float(current)
    total = sum(v for v in ongoing_by_replica.values() if math.isfinite(v) and v > 0)
    return total / target_per_replica


def tier_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's custom-policy entry point (`ray.serve.config.AutoscalingContext` in, desired replicas out)."""
    reported = (ctx.aggregated_metrics or {}).get("ongoing", {})
    return desired_replicas(reported, ctx.config.get_target_ongoing_requests(), ctx.current_num_replicas), {}
