"""CPU-only: which side of its engine vLLM's scheduler process runs on where every core is some engine's,
re-decided every second from how busy everything else keeps the other cores.

Off its engine's cores (with the replica) the scheduler's turn starts at once while those cores have room, and
its spinning never takes the worker's core: right at light load. Beside its worker is right once everything else
saturates the other cores, where the scheduler's turn would wait for a slot while the worker idles. `SchedulerSide`
starts off and moves the scheduler (every thread) by `next_side`, a pure function of the share of the off cores'
time that everything but the scheduler used, smoothed; the thresholds and the A/B behind them are in
benchmarks/cpu_placement.md.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Literal

import psutil

from serving.cpu.affinity import EnginePlacement, pin_threads

logger = logging.getLogger(__name__)

Side = Literal["off", "beside"]

BUSY_TO_BESIDE = 0.6
"""Share of the off cores' time used by everything but the scheduler at or above which the scheduler goes beside
its worker. On the 2-core box one stream kept core 1 34-52% busy second by second, 8 streams and more 58-99%
(32 streams: 70% with the scheduler there, 94% without it)."""

BUSY_TO_OFF = 0.5
"""The share at or below which it goes back off; the gap keeps a load near the line from moving it every second."""

SMOOTHING = 0.5
"""Weight of the newest one-second share in the share decided on (the rest is the previous one's): 4 streams kept
the other core 48-71% busy second by second, and unsmoothed the scheduler moved every few seconds."""


def next_side(side: Side, busy: float) -> Side:
    """Where the scheduler goes next, from where it is and how busy everything else kept the off cores (0-1)."""
    if side == "off" and busy >= BUSY_TO_BESIDE:
        return "beside"
    if side == "beside" and busy <= BUSY_TO_OFF:
        return "off"
    return side


def others_busy(cores_busy_s: float, scheduler_s: float, elapsed_s: float, n_cores: int) -> float:
    """The share of `n_cores` cores' time over `elapsed_s` that went to everything but the scheduler: the cores'
    busy seconds less `scheduler_s`, the scheduler's CPU seconds if it ran there (0 when it ran elsewhere)."""
    if elapsed_s <= 0 or n_cores <= 0:
        return 0.0
    return min(1.0, max(0.0, cores_busy_s - scheduler_s) / (elapsed_s * n_cores))


@dataclass(frozen=True)
class _Sample:
    at: float
    cores_busy_s: float
    scheduler_s: float


class SchedulerSide:
    """Moves an engine's scheduler process(es) between `off` and `beside` cores from a background thread."""

    def __init__(self, placement: EnginePlacement, what: str, *, interval_s: float = 1.0) -> None:
        self.pids, self.beside, self.off = placement.schedulers, placement.beside, placement.off
        self.what, self.interval_s = what, interval_s
        self.side: Side = "off"
        self.moves = 0
        """Moves since start (each is logged)."""
        self._procs: list[psutil.Process] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler-side", daemon=True)

    def start(self) -> SchedulerSide:
        """Place the scheduler off its engine's cores and start re-deciding (nothing to do if it is gone)."""
        try:
            self._procs = [psutil.Process(pid) for pid in sorted(self.pids)]
            self._move(self.side)
        except psutil.NoSuchProcess:
            logger.warning("%s: the engine's scheduler is gone; not placing it", self.what)
            return self
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    @property
    def active(self) -> bool:
        """Whether it is still re-deciding (it stops once the scheduler is gone)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            last, busy = self._sample(), None
            while not self._stop.wait(self.interval_s):
                now = self._sample()
                here = now.scheduler_s - last.scheduler_s if self.side == "off" else 0.0
                share = others_busy(now.cores_busy_s - last.cores_busy_s, here, now.at - last.at, len(self.off))
                busy = share if busy is None else SMOOTHING * share + (1 - SMOOTHING) * busy
                side = next_side(self.side, busy)
                if side != self.side:
                    self._move(side)
                    logger.info("%s: the other cores ran %.0f%% busy; scheduler %s moved %s its worker",
                                self.what, busy * 100, sorted(self.pids), "beside" if side == "beside" else "off")
                    self.side, self.moves = side, self.moves + 1
                last = now
        except psutil.NoSuchProcess:
            logger.info("%s: the engine's scheduler is gone; stopped placing it", self.what)
        except (psutil.Error, OSError):
            logger.exception("%s: stopped placing the engine's scheduler", self.what)

    def _move(self, side: Side) -> None:
        for proc in self._procs:
            # is_running() also tells a new process that took a dead scheduler's pid apart from it
            if not proc.is_running() or not pin_threads(proc.pid, self.beside if side == "beside" else self.off):
                raise psutil.NoSuchProcess(proc.pid)

    def _sample(self) -> _Sample:
        busy = cores_busy_s(self.off)
        sched = 0.0
        for proc in self._procs:
            if not proc.is_running():
                raise psutil.NoSuchProcess(proc.pid)
            t = proc.cpu_times()
            sched += t.user + t.system
        return _Sample(at=time.monotonic(), cores_busy_s=busy, scheduler_s=sched)


def cores_busy_s(cores: set[int], stat: str = "/proc/stat") -> float:
    """Seconds `cores` have not been idle since boot (guest time is already counted in user time)."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    with open(stat) as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu"):
                break  # the per-core lines come first; the long interrupt counts after them are not needed
            if name[3:].isdigit() and int(name[3:]) in cores:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[:8])
                busy += user + nice + system + irq + softirq + steal
    return busy / tick
