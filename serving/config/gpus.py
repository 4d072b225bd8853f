"""Whether the GPUs of a cluster can hold every replica's `num_gpus`, checked the way Ray's scheduler places them
(fractions from one GPU, whole GPUs from one node, shares truncated to 1/10,000), before deploying."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.placement import Placement
from serving.config.app import AppConfig
from serving.config.placement import fits

_UNITS = 10_000
"""Ray accounts fractional resources in units of 1/10,000; shares are compared in those units."""


@dataclass(frozen=True)
class GpuReplica:
    """One replica that takes a GPU share: `num_gpus` < 1 from one GPU, or that many whole GPUs of one node."""

    field: str
    """The deployment, named as its config field: `tiers[small]`, `router`."""
    replica: int
    share: float
    placement: Placement


@dataclass(frozen=True)
class GpuSlot:
    """One GPU of one node and the replicas packed on it."""

    node: str
    """The node's address (`NodeManagerAddress` in `ray.nodes()`)."""
    index: int
    holds: tuple[GpuReplica, ...] = ()

    @property
    def used(self) -> float:
        return sum(_units(min(1, r.share)) for r in self.holds) / _UNITS


@dataclass(frozen=True)
class GpuPacking:
    """Where each GPU replica would go (first fit, largest share first) and what cannot go anywhere."""

    slots: tuple[GpuSlot, ...]
    problems: tuple[str, ...]

    def placed(self, field: str) -> list[GpuSlot]:
        """The GPUs that hold a replica of `field`."""
        return [s for s in self.slots if any(r.field == field for r in s.holds)]


def _units(share: float) -> int:
    # As Ray converts a request: its fixed point truncates (num_gpus 0.57 takes 0.5699 of a GPU).
    return int(share * _UNITS)


def gpu_replicas(config: AppConfig) -> list[GpuReplica]:
    """Every replica that takes a GPU share when the app starts: each tier's `num_replicas` (an autoscaled
    tier's `min_replicas`) and the router deployment's replicas when it has `router.num_gpus`."""
    replicas = []
    for tier in config.tiers:
        d = tier.deployment
        count = d.autoscaling.min_replicas if d.autoscaling else d.num_replicas
        if tier.resources.num_gpus > 0:
            replicas += [GpuReplica(f"tiers[{tier.name}]", i, tier.resources.num_gpus, tier.resources)
                         for i in range(count)]  # fmt: skip
    router = config.router
    if router.num_gpus > 0 and router.placement == "deployment" and router.default_router != "cheapest":
        replicas += [GpuReplica("router", i, router.num_gpus, router.resources) for i in range(router.num_replicas)]
    return replicas


def pack_gpus(config: AppConfig, nodes: list[Mapping[str, Any]]) -> GpuPacking:
    """Pack the GPU replicas of `config` onto the alive nodes of `nodes` (as `ray.nodes()` lists them) the way
    Ray's scheduler can: a fractional share from one GPU with that much left, a whole-GPU share from that many
    free GPUs of one node, only on nodes meeting the replica's `custom`/`node_labels`. A replica that fits
    nowhere is a problem naming its field, its share and what each GPU already holds."""
    alive = [n for n in nodes if n.get("Alive")]
    slots = {(str(n.get("NodeManagerAddress", n.get("NodeID"))), i): [] for n in alive
             for i in range(int((n.get("Resources") or {}).get("GPU", 0)))}  # fmt: skip
    by_node = {str(n.get("NodeManagerAddress", n.get("NodeID"))): n for n in alive}
    free = dict.fromkeys(slots, _UNITS)
    problems = []
    for replica in sorted(gpu_replicas(config), key=lambda r: -r.share):
        eligible = [key for key in slots if fits(replica.placement, by_node[key[0]])]
        if replica.share < 1:
            chosen = next(([key] for key in eligible if free[key] >= _units(replica.share)), None)
        else:
            chosen = _whole_gpus(eligible, free, int(replica.share))
        if chosen is None:
            problems.append(_no_room(replica, slots, free, len(eligible)))
            continue
        for key in chosen:
            slots[key].append(replica)
            free[key] -= _units(min(replica.share, 1))
    packed = tuple(GpuSlot(node, index, tuple(holds)) for (node, index), holds in slots.items())
    return GpuPacking(packed, tuple(problems))


def gpu_share_problems(config: AppConfig, nodes: list[Mapping[str, Any]]) -> list[str]:
    """One line per GPU replica the cluster's GPUs cannot hold (see `pack_gpus`); none when every share fits."""
    return list(pack_gpus(config, nodes).problems)


def _whole_gpus(eligible: list[tuple[str, int]], free: dict, count: int) -> list[tuple[str, int]] | None:
    for node in dict.fromkeys(key[0] for key in eligible):
        idle = [key for key in eligible if key[0] == node and free[key] == _UNITS]
        if len(idle) >= count:
            return idle[:count]
    return None


def _no_room(replica: GpuReplica, slots: dict, free: dict, eligible: int) -> str:
    what = f"{replica.share:g} of a GPU" if replica.share < 1 else f"{replica.share:g} whole GPUs on one node"
    head = f"{replica.field} replica {replica.replica + 1} needs {what} (num_gpus {replica.share:g})"
    if not slots:
        return f"{head}, but no alive node has a GPU; run it where Ray sees GPUs (`ray start --num-gpus`)."
    if eligible == 0:
        return f"{head}, but no node with a GPU meets its custom resources / node_labels."
    taken = "; ".join(
        f"GPU {index} of {node} holds "
        + (" + ".join(f"{r.field} {min(r.share, 1):g}" for r in holds) or "nothing")
        + f" ({free[(node, index)] / _UNITS:.2f} free)"
        for (node, index), holds in slots.items()
    )
    return (f"{head}, but no GPU has that much left: {taken}. Lower the shares (`tierserve plan` sizes them) "
            "or the replicas, or add GPUs.")
