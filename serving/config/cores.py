"""Core lists as the config writes them: `engine.cpu_threads_bind` ("0-3", "0-3|4-7", "auto") and
`ingress.cpu_affinity` ("1", "2-3"). Pure parsing, so validating a config never imports the CPU placement code."""

from __future__ import annotations


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
