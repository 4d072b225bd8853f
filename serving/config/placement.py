"""Placement in Ray's terms: a tier replica's Ray resources, a `router.placement.Placement` as
`ray_actor_options`, whether any node of the cluster can take a replica, and whether the cluster's GPUs can hold
every replica's GPU share (both checked before deploying, so a config that cannot be placed names its field
instead of leaving a deployment pending).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from router.placement import Placement


class ResourcesConfig(Placement):
    """Ray resources of one engine replica, and where it may run (`custom`, `node_labels`)."""

    num_cpus: float = Field(default=1.0, ge=0.0)
    """Logical CPUs reserved per replica."""
    num_gpus: float = Field(default=0.0, ge=0.0)
    """GPUs per replica; fractions let a small and a large tier share one GPU (e.g. 0.3 + 0.7)."""


def actor_options(placement: Placement) -> dict[str, Any]:
    """The `ray_actor_options` entries for the placement's constraints (none when unconstrained)."""
    options: dict[str, Any] = {}
    if placement.custom:
        options["resources"] = dict(placement.custom)
    if placement.node_labels:
        options["label_selector"] = dict(placement.node_labels)
    return options


def unmet(placement: Placement, nodes: list[Mapping[str, Any]]) -> str | None:
    """Why no alive node of `nodes` (as `ray.nodes()` lists them) could run a replica; None if one can."""
    if not placement.pinned:
        return None
    alive = [n for n in nodes if n.get("Alive")]
    if any(fits(placement, n) for n in alive):
        return None
    wants = []
    if placement.custom:
        wants.append(f"resources {placement.custom}")
    if placement.node_labels:
        wants.append(f"labels {placement.node_labels}")
    return f"no alive node of {len(alive)} offers {' and '.join(wants)}"


def fits(placement: Placement, node: Mapping[str, Any]) -> bool:
    resources = node.get("Resources") or {}
    if any(resources.get(name, 0.0) < amount for name, amount in placement.custom.items()):
        return False
    labels = node.get("Labels") or {}
    return all(_label_matches(labels.get(key), selector) for key, selector in placement.node_labels.items())


def _label_matches(value: str | None, selector: str) -> bool:
    negate = selector.startswith("!")
    selector = selector.removeprefix("!")
    if selector.startswith("in("):
        options = {v.strip() for v in selector[3:-1].split(",")}
    else:
        options = {selector}
    return (value in options) != negate


# ---- GPU shares: can the cluster's GPUs hold every replica's share? -------------------------------------------
