"""Where vLLM's scheduler runs when every core is some engine's: the pure decision, the busy share it reads, and
the mover on real processes (a stand-in scheduler moved beside core 0 while a spinner saturates the other
cores, and back once the spinner stops)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.cpu.affinity import EnginePlacement
from serving.cpu.scheduler_side import (
    BUSY_TO_BESIDE,
    BUSY_TO_OFF,
    SchedulerSide,
    cores_busy_s,
    next_side,
    others_busy,
)


def test_the_scheduler_goes_beside_its_worker_only_once_the_other_cores_are_saturated() -> None:
    assert next_side("off", 0.40) == "off"  # one stream on the 2-core box
    assert next_side("off", 0.70) == "beside"  # 32 streams
    assert next_side("beside", 0.94) == "beside"
    assert next_side("beside", 0.42) == "off"  # back to one stream
    # Between the two lines it stays where it is, so a load near one does not move it every second.
    middle = (BUSY_TO_BESIDE + BUSY_TO_OFF) / 2
    assert next_side("off", middle) == "off" and next_side("beside", middle) == "beside"


def test_the_busy_share_leaves_out_the_schedulers_own_time() -> None:
    # One off core for 2 s, busy 1.9 s of it: 1.2 s the scheduler's spinning while it was there.
    assert others_busy(1.9, 1.2, 2.0, 1) == pytest.approx(0.35)
    assert others_busy(1.9, 0.0, 2.0, 1) == pytest.approx(0.95)  # the scheduler ran elsewhere
    assert others_busy(3.0, 0.0, 2.0, 2) == pytest.approx(0.75)
    assert others_busy(0.1, 0.5, 1.0, 1) == 0.0 and others_busy(5.0, 0.0, 1.0, 1) == 1.0
    assert others_busy(1.0, 0.0, 0.0, 1) == 0.0


def test_busy_seconds_come_from_the_named_cores_of_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    tick = os.sysconf("SC_CLK_TCK")
    #        user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(f"cpu  {9 * tick} 0 0 0 0 0 0 0 0 0\n"
                    f"cpu0 {tick} {tick} {tick} {50 * tick} {7 * tick} 0 0 0 0 0\n"
                    f"cpu1 {2 * tick} 0 {tick} {40 * tick} 0 {tick} {tick} {tick} {2 * tick} 0\n"
                    "intr 12345 0 0\n")
    assert cores_busy_s({0}, str(stat)) == pytest.approx(3.0)  # idle and iowait are not busy
    assert cores_busy_s({1}, str(stat)) == pytest.approx(6.0)  # guest is already inside user
    assert cores_busy_s({0, 1}, str(stat)) == pytest.approx(9.0)
    assert cores_busy_s({5}, str(stat)) == 0.0


def _affinity(pid: int) -> set[int]:
    return {cpu for tid in os.listdir(f"/proc/{pid}/task") for cpu in os.sched_getaffinity(int(tid))}


def _wait_for(pid: int, cores: set[int], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _affinity(pid) == cores:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs cores 0 and 1")
def test_the_scheduler_follows_the_load_on_the_other_cores() -> None:
    off = os.sched_getaffinity(0) - {0}
    # The stand-in scheduler spins with sched_yield as vLLM's does between steps, and has a second thread, as
    # vLLM's has its I/O threads: every thread must move.
    scheduler = subprocess.Popen([sys.executable, "-c", "import os, threading, time\n"
                                  "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
                                  "while True: os.sched_yield()"])
    spinners: list[subprocess.Popen] = []
    side = SchedulerSide(EnginePlacement(schedulers={scheduler.pid}, beside={0}, off=off), "test", interval_s=0.2)
    try:
        time.sleep(0.3)  # its second thread has started
        side.start()
        assert _wait_for(scheduler.pid, off), "the scheduler starts off its worker's core"
        time.sleep(1.0)  # five decisions: its own spinning keeps the other cores busy, and must not count
        assert side.moves == 0 and _affinity(scheduler.pid) == off
        spinners = [subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\n"
                                      "while True: pass"]) for core in sorted(off)]
        assert _wait_for(scheduler.pid, {0}), "with the other cores saturated it goes beside its worker"
        assert side.side == "beside" and side.moves == 1
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        assert _wait_for(scheduler.pid, off), "once they have room again it goes back off"
        scheduler.kill()
        scheduler.wait()
        deadline = time.monotonic() + 10
        while side.active and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not side.active, "it stops once the scheduler is gone"
        assert not SchedulerSide(EnginePlacement({scheduler.pid}, beside={0}, off=off), "test").start().active
    finally:
        side.close()
        for proc in [scheduler, *spinners]:
            proc.kill()
            proc.wait()
