"""Placement around a CPU engine: the pure choice of cores, and the moves on a real process tree (stand-ins for
a tier replica, vLLM's EngineCore with a second thread, the Worker it spawns, and another helper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serving.config.cores import engine_cores, rank_cores
from serving.cpu.affinity import (
    placement_cores,
    scheduler_cores,
)


def test_engine_cores_parse_ranks_and_leave_auto_to_vllm() -> None:
    assert engine_cores("0-3|4-7") == set(range(8)) and engine_cores("1") == {1}
    assert rank_cores("0-1|4") == [{0, 1}, {4}]
    assert engine_cores("auto") is None and engine_cores("nobind") is None
    with pytest.raises(ValueError, match="'x'"):
        engine_cores("0|x")


def test_helpers_prefer_cores_no_engine_binds() -> None:
    mask = set(range(16))
    assert placement_cores(mask, own={0, 1, 2, 3, 4, 5, 6, 7}, other_engines={8, 9, 10, 11, 12, 13}) == {14, 15}
    # Every core is some engine's (the 2-core box): off its own engine's cores, onto the other engine's.
    assert placement_cores({0, 1}, own={0}, other_engines={1}) == {1}
    assert placement_cores({0, 1}, own={0, 1}, other_engines=set()) == set()


def test_the_load_places_the_scheduler_only_where_every_core_is_some_engines() -> None:
    assert scheduler_cores(set(range(16)), ranks=[set(range(8))], other_engines={8, 9}) == set(range(10, 16))
    assert scheduler_cores({0, 1}, ranks=[{0}], other_engines={1}) is None  # the 2-core box
    assert scheduler_cores(set(range(8)), ranks=[{0, 1}, {2, 3}], other_engines={4, 5, 6, 7}) is None
    assert scheduler_cores({0, 1}, ranks=[{0}, {1}], other_engines=set()) == {0}  # its engine has every core


# The "replica" starts a "scheduler" (inherits its mask) which starts a second thread, a "worker" that binds
# itself to core 0 as vLLM's Worker binds its OpenMP threads to `cpu_threads_bind`, and an unbound helper;
# then the replica places its tree: the scheduler starts off the worker's core with the rest (the load moves it
# later, see test_scheduler_side.py); a second call, with the scheduler already beside its worker, keeps the
# replica off and tells the scheduler apart from the worker.
TREE = """
import json, os, subprocess, sys, time
import psutil
from serving.cpu.affinity import pin_engine_processes
SCHEDULER = '''
import os, subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
worker = subprocess.Popen([sys.executable, "-c", "import os, time; os.sched_setaffinity(0, {0}); time.sleep(60)"])
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(worker.pid, helper.pid, flush=True)
time.sleep(60)
'''
sched = subprocess.Popen([sys.executable, "-c", SCHEDULER], stdout=subprocess.PIPE, text=True)
try:
    worker, helper = map(int, sched.stdout.readline().split())
    deadline = time.monotonic() + 20
    while (psutil.Process(worker).cpu_affinity() != [0] or psutil.Process(sched.pid).num_threads() < 2) \\
            and time.monotonic() < deadline:
        time.sleep(0.05)
    placement = pin_engine_processes("0", "test", other_engines={1})  # the 2-core box: core 1 is the other's
    os.sched_setaffinity(sched.pid, {0})  # as SchedulerSide moves it under load
    again = pin_engine_processes("0", "test", other_engines={1})
    assert placement == again and placement.schedulers == {sched.pid}, (placement, again)
    assert placement.beside == {0} and placement.off == os.sched_getaffinity(0) - {0}
    threads = {name: sorted({tuple(sorted(os.sched_getaffinity(int(t)))) for t in os.listdir(f"/proc/{pid}/task")})
               for name, pid in [("replica", os.getpid()), ("scheduler", sched.pid), ("worker", worker),
                                 ("helper", helper)]}
    print(json.dumps(threads))
finally:
    for child in psutil.Process().children(recursive=True):
        child.kill()
"""


@pytest.mark.skipif(not {0, 1} <= os.sched_getaffinity(0), reason="needs cores 0 and 1")
def test_the_scheduler_and_every_other_thread_leave_the_engine_core() -> None:
    out = subprocess.run([sys.executable, "-c", TREE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    placed = json.loads(out.stdout.strip().splitlines()[-1])
    off = [sorted(os.sched_getaffinity(0) - {0})]
    assert placed == {"replica": off, "scheduler": off, "worker": [[0]], "helper": off}
